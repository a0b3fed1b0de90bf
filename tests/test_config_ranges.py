"""Config hardening (issue #22): impossible values are refused naming the key path; YAML syntax, encoding and
top-level errors are config errors naming the file and line (exit 2, no traceback); local paths and the reward
function's module are checked before anything starts; a non-UTF-8 data file names its file and line."""

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, check_local_paths, load_config
from pipeline.flow.data import DataError, load_rows
from pipeline.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny-cpu.yaml"


@pytest.mark.parametrize(
    "override, key",
    [
        # the examples: each was accepted
        ("rollout.temperature=-1", "rollout.temperature"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.top_p=5", "rollout.top_p"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("trainer.lr=-1", "trainer.lr"),
        ("trainer.lr=nan", "trainer.lr"),
        ("trainer.lr=inf", "trainer.lr"),
        ("checkpoint.every=-1", "checkpoint.every"),
        ("trainer.betas=[0.9]", "trainer.betas"),
        ("trainer.betas=[0.9,1.0]", "trainer.betas"),
        ("trainer.betas=[0.9,nan]", "trainer.betas"),
        # the rest of the fields with a range
        ("rollout.top_k=0", "rollout.top_k"),
        ("rollout.buffer_capacity=-1", "rollout.buffer_capacity"),
        ("algorithm.eps_low=nan", "algorithm.eps_low"),
        ("algorithm.eps_high=inf", "algorithm.eps_high"),
        ("algorithm.is_cap=0", "algorithm.is_cap"),
        ("algorithm.log_ratio_clamp=-1", "algorithm.log_ratio_clamp"),
        ("algorithm.kl_coef=-0.1", "algorithm.kl_coef"),
        ("algorithm.entropy_coef=-0.1", "algorithm.entropy_coef"),
        ("algorithm.overlong.factor=-1", "algorithm.overlong.factor"),
        ("algorithm.reward_timeout_s=0", "algorithm.reward_timeout_s"),
        ("algorithm.reward_workers=0", "algorithm.reward_workers"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
        ("trainer.warmup_steps=-1", "trainer.warmup_steps"),
        ("trainer.weight_decay=-0.1", "trainer.weight_decay"),
        ("trainer.grad_clip=0", "trainer.grad_clip"),
        ("trainer.threads=0", "trainer.threads"),
        ("trainer.max_tokens_per_micro_batch=-1", "trainer.max_tokens_per_micro_batch"),
        ("trainer.gpus_per_rank=-1", "trainer.gpus_per_rank"),
        ("engine.mem_fraction=0", "engine.mem_fraction"),
        ("engine.mem_fraction=1.5", "engine.mem_fraction"),
        ("engine.startup_timeout_s=0", "engine.startup_timeout_s"),
        ("engine.request_timeout_s=-5", "engine.request_timeout_s"),
        ("engine.max_retries=-1", "engine.max_retries"),
        ("engine.max_restarts=-1", "engine.max_restarts"),
        ("engine.base_port=70000", "engine.base_port"),
        ("engine.threads=0", "engine.threads"),
        ("engine.random_seed=-2", "engine.random_seed"),
        ("engine.gpus_per_engine=-1", "engine.gpus_per_engine"),
        ("weight_sync.prefetch=-1", "weight_sync.prefetch"),
        ("weight_sync.master_port=-1", "weight_sync.master_port"),
        ("weight_sync.dtype=fp8", "weight_sync.dtype"),
        ("weight_sync.bucket_mb=nan", "weight_sync.bucket_mb"),
        ("cluster.num_cpus=-1", "cluster.num_cpus"),
        ("cluster.placement_timeout_s=0", "cluster.placement_timeout_s"),
        ("logging.level=LOUD", "logging.level"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("eval.every=-1", "eval.every"),
        ("eval.n_samples=0", "eval.n_samples"),
        ("eval.max_prompts=-1", "eval.max_prompts"),
        ("eval.temperature=-0.5", "eval.temperature"),
        ("model.warm_start_steps=-1", "model.warm_start_steps"),
        ("model.tiny.hidden_size=0", "model.tiny.hidden_size"),
        ("model.tiny.num_key_value_heads=3", "model.tiny.num_key_value_heads"),
        ("model.tiny.rope_theta=0", "model.tiny.rope_theta"),
        ("data.synthetic_size=0", "data.synthetic_size"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_boundary_values_are_accepted():
    cfg = load_config(
        TINY,
        ["rollout.top_p=1", "rollout.top_k=1", "trainer.betas=[0,0.999]", "checkpoint.every=0", "eval.temperature=0"],
    )
    assert cfg.rollout.top_p == 1.0 and cfg.trainer.betas == [0.0, 0.999]


def test_reward_module_that_does_not_exist_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^algorithm\.reward_fn: cannot import module 'no_such_reward_mod'"):
        load_config(TINY, ["algorithm.reward_fn=no_such_reward_mod:score"])
    with pytest.raises(
        ConfigError, match=r"^algorithm\.reward_fn: module 'pipeline.flow.rewards' has no function 'nope'"
    ):
        load_config(TINY, ["algorithm.reward_fn=pipeline.flow.rewards:nope"])
    with pytest.raises(ConfigError, match=r"^eval\.reward_fn: cannot import module"):
        load_config(TINY, ["eval.reward_fn=no_such_reward_mod:score"])


@pytest.mark.parametrize(
    "content, words",
    [
        (b"trainer:\n  lr: [1e-6\n  batch_size: 2\n", r"line \d+: invalid YAML"),
        (b"trainer:\n  lr: 1e-6\n\tbatch_size: 2\n", r"line 3: invalid YAML"),
        (b"data:\n  train_path: synthetic:arith\nmodel:\n  path: caf\xe9\n", r"line 4: not UTF-8 text \(byte 0xe9\)"),
        (b"- trainer\n- data\n", r"the top level must be a mapping"),
    ],
    ids=["unclosed", "tab", "latin1", "list"],
)
def test_bad_yaml_is_a_config_error_naming_file_and_line(tmp_path, capsys, content, words):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^{bad}: {words}"):
        load_config(bad)
    assert main(["config", "show", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dapo: config error: {bad}:") and "Traceback" not in err and err.count("\n") == 1


def test_local_paths_are_checked_before_anything_starts(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    cfg = load_config(TINY, [f"data.train_path={missing}"])  # presets carry placeholders: validate() lets it pass
    with pytest.raises(ConfigError, match=rf"^data\.train_path: dataset file not found: {missing}"):
        check_local_paths(cfg)
    cfg = load_config(TINY, [f"data.eval_path=synthetic:arith,{missing}?template=dapo"])
    with pytest.raises(ConfigError, match=rf"^data\.eval_path: dataset file not found: {missing}$"):
        check_local_paths(cfg)
    cfg = load_config(TINY, [f"model.path={tmp_path}/model", "model.tokenizer=builtin:char"])
    with pytest.raises(ConfigError, match=r"^model\.path: .* is not a directory"):
        check_local_paths(cfg)
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match=r"^model\.path: .* has no config\.json"):
        check_local_paths(cfg)
    check_local_paths(load_config(TINY, ["model.tokenizer=builtin:char"]))  # synthetic sources: nothing to check
    (tmp_path / "model" / "config.json").write_text("{}")
    cfg = load_config(TINY, [f"model.path={tmp_path}/model", f"model.tokenizer={tmp_path}/tok"])
    with pytest.raises(ConfigError, match=r"^model\.tokenizer: .*tok': no such file or directory"):
        check_local_paths(cfg)
    check_local_paths(load_config(TINY, [f"model.path={tmp_path}/model", "model.tokenizer=Qwen/Qwen2.5-0.5B"]))
    cfg = load_config(TINY, [f"data.train_path={missing}"])
    check_local_paths(cfg, train=False)  # `dapo eval` does not read the training set
    # the CLI: one line, exit 2, before Ray (a train that got that far would take seconds and print far more)
    assert main(["train", str(TINY), f"data.train_path={missing}", f"logging.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err == f"dapo: config error: data.train_path: dataset file not found: {missing}\n"


def test_non_utf8_data_file_names_file_and_line(tmp_path):
    data = tmp_path / "rows.jsonl"
    good = json.dumps({"prompt": "1+1", "answer": "2"}).encode()
    data.write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "caf\xe9", "answer": "1"}\n')
    cfg = load_config(TINY, [f"data.train_path={data}"])
    with pytest.raises(DataError, match=rf"^{data}: line 3: not UTF-8 text \(byte 0xe9\)"):
        load_rows(str(data), cfg.data, 0)
