"""Config loading, validation errors naming key paths, presets with `base:`, and the CLI's `config show`."""

from pathlib import Path

import pytest

from pipeline.config import ConfigError, layout, load_config
from pipeline.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"


def test_defaults_and_overrides():
    cfg = load_config(TINY, ["trainer.lr=2e-6", "rollout.max_staleness=0"])
    assert cfg.trainer.lr == 2e-6
    assert cfg.rollout.max_staleness == 0
    assert cfg.trainer.parallel.dp == 1  # derived: world_size / (tp*pp*cp)
    assert cfg.algorithm.eps_low == 0.2 and cfg.algorithm.eps_high == 0.28  # DAPO defaults


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.lrr=1", "trainer.lrr"),  # unknown key
        ("trainer.lr=fast", "trainer.lr"),  # wrong type
        ("algorithm.eps_high=0.1", "algorithm.eps_high"),  # eps_high < eps_low
        ("trainer.micro_batch_size=3", "trainer.micro_batch_size"),  # 64 samples not divisible by 3
        ("trainer.backend=jax", "trainer.backend"),  # not a choice
        ("algorithm.dual_clip_c=0.5", "algorithm.dual_clip_c"),
        ("rollout.max_staleness=-1", "rollout.max_staleness"),
        ("engine.health_timeout_s=0", "engine.health_timeout_s"),
        ("weight_sync.timeout_s=-1", "weight_sync.timeout_s"),
        ("rollout.over_admission=-0.5", "rollout.over_admission"),
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value).startswith(key), str(e.value)


COLOCATED = ["weight_sync.mode=colocated"]


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (COLOCATED + ["weight_sync.colocated_transport=shm"], "weight_sync.colocated_transport", "auto, tensor"),
        (
            COLOCATED + ["weight_sync.colocated_transport=tensor", "engine.backend=sglang"],
            "weight_sync.colocated_transport",
            "only the CPU engine",
        ),
        (COLOCATED + ["weight_sync.release_memory=[kv_cache,gpu]"], "weight_sync.release_memory", "'gpu'"),
        (["weight_sync.release_memory=[kv_cache]"], "weight_sync.release_memory", "only with weight_sync.mode"),
        (
            COLOCATED + ["weight_sync.release_memory=[weights]", "weight_sync.every=2"],
            "weight_sync.release_memory",
            "weight_sync.every must be 1",
        ),
        (COLOCATED + ["weight_sync.disk_dir=''"], "weight_sync.disk_dir", "empty"),
    ],
)
def test_colocated_options_are_checked(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert str(e.value).startswith(key) and words in str(e.value), str(e.value)


def test_colocated_release_of_weights_with_a_cpu_backup_may_skip_syncs():
    backup = ["engine.extra_args=[--enable-weights-cpu-backup]", "weight_sync.every=2"]
    cfg = load_config(TINY, COLOCATED + ["weight_sync.release_memory=[weights,kv_cache]"] + backup)
    assert cfg.weight_sync.release_memory == ["weights", "kv_cache"]
    assert cfg.weight_sync.colocated_transport == "auto" and cfg.weight_sync.disk_dir == "/dev/shm"


@pytest.mark.parametrize(
    "overrides, parts",
    [
        ([], 1),  # one mini-batch: nothing to stream
        (["trainer.num_minibatches=4"], 4),
        (["trainer.num_minibatches=4", "trainer.stream_minibatches=false"], 1),
        (["trainer.num_minibatches=4", "algorithm.off_policy=decoupled"], 1),  # prox log-probs before any update
        (["trainer.num_minibatches=4"] + COLOCATED, 4),
        (["trainer.num_minibatches=4", "weight_sync.release_memory=[kv_cache]"] + COLOCATED, 1),  # engines paused
    ],
)
def test_which_steps_stream_their_minibatches(overrides, parts):
    assert layout(load_config(TINY, ["trainer.micro_batch_size=2"] + overrides)).stream_parts == parts


def test_parallel_product_must_match_world_size(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text(f"base: {TINY}\ntrainer: {{backend: megatron, world_size: 8, parallel: {{tp: 2, pp: 2, dp: 3}}}}\n")
    with pytest.raises(
        ConfigError, match=r"^trainer.parallel.dp: tp\*pp\*cp\*dp = 2\*2\*1\*3 = 12 != trainer.world_size = 8"
    ):
        load_config(y)
    y.write_text(f"base: {TINY}\ntrainer: {{backend: megatron, world_size: 8, parallel: {{tp: 3}}}}\n")
    with pytest.raises(ConfigError, match=r"^trainer.parallel: tp\*pp\*cp = 3 does not divide"):
        load_config(y)
    y.write_text(f"base: {TINY}\ntrainer: {{backend: megatron, world_size: 8, parallel: {{tp: 2, pp: 2}}}}\n")
    assert load_config(y).trainer.parallel.dp == 2


def test_base_chain_and_missing_file(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {TINY}\ntrainer: {{total_steps: 3}}\n")
    cfg = load_config(child)
    assert cfg.trainer.total_steps == 3 and cfg.data.train_path == "synthetic:arith?split=train&slip=0.3"
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"^data.train_path: required"):
        load_config(None)


def test_cli_config_show(capsys):
    assert main(["config", "show", str(TINY), "trainer.lr=3e-6", "engine.api_key=hunter2"]) == 0
    out = capsys.readouterr().out
    assert "lr: 3.0e-06" in out or "lr: 3e-06" in out
    assert "hunter2" not in out  # secrets are masked


def test_cli_config_error_exit_code(capsys):
    assert main(["config", "show", str(TINY), "trainer.nope=1"]) == 2
    assert "trainer.nope" in capsys.readouterr().err


def test_resource_check_names_what_is_missing():
    from pipeline.runtime.cluster import check_resources

    cfg = load_config(
        TINY,
        [
            "trainer.world_size=8",
            "trainer.gpus_per_rank=1",
            "engine.num_engines=8",
            "engine.gpus_per_engine=1",
            "trainer.batch_size=16",
            "trainer.micro_batch_size=2",
        ],
    )
    with pytest.raises(ConfigError, match=r"^cluster: the run needs 16 GPUs .* the Ray cluster has 8"):
        check_resources(cfg, {"GPU": 8.0, "CPU": 64.0})
    check_resources(cfg, {"GPU": 16.0})  # enough: no error


def test_expert_parallel_must_fit_the_ranks_of_a_stage():
    moe = ["trainer.backend=megatron", "trainer.world_size=8", "trainer.parallel.tp=4", "trainer.parallel.pp=2"]
    cfg = load_config(TINY, [*moe, "trainer.parallel.ep=4"])  # etp = 1: ep*etp = 4 divides tp*cp*dp = 4
    assert (cfg.trainer.parallel.dp, cfg.trainer.parallel.etp) == (1, 1)
    with pytest.raises(ConfigError, match=r"trainer.parallel.ep: ep\*etp = 4\*4 must divide .* tp\*cp\*dp = 4\*1\*1"):
        load_config(TINY, [*moe, "trainer.parallel.ep=4", "trainer.parallel.etp=4"])  # megatron's etp = tp default
    with pytest.raises(ConfigError, match=r"trainer.parallel.ep: ep\*etp = 8\*1"):
        load_config(TINY, [*moe, "trainer.parallel.ep=8"])


@pytest.mark.parametrize("te", [False, True])
def test_context_parallelism_on_gpus_needs_transformer_engine(monkeypatch, te):
    import importlib.util

    real = importlib.util.find_spec
    fake = object() if te else None

    def find_spec(name: str, *args):
        return fake if name == "transformer_engine" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    cp = ["trainer.backend=megatron", "trainer.world_size=2", "trainer.parallel.cp=2"]
    cfg = load_config(TINY, cp)  # CPU (gpus_per_rank = 0): our attention, TE or not
    assert (cfg.trainer.parallel.cp, cfg.trainer.parallel.dp) == (2, 1)
    load_config(TINY, ["trainer.backend=megatron", "trainer.world_size=2", "trainer.gpus_per_rank=1"])  # cp = 1
    if not te:
        with pytest.raises(ConfigError, match=r"^trainer.parallel.cp: .* on GPUs needs transformer-engine"):
            load_config(TINY, [*cp, "trainer.gpus_per_rank=1"])
        return
    cfg = load_config(TINY, [*cp, "trainer.gpus_per_rank=1"])
    assert (cfg.trainer.parallel.cp, cfg.trainer.parallel.dp) == (2, 1)
