"""The trained policy as a Hugging Face checkpoint: written during a run (`checkpoint.hf_every`) and offline
(`dapo export`), loaded by transformers and the CPU engine, evaluated with `dapo eval`, never half-written.

One short real run (Ray, the CPU engine, the fsdp trainer, float32) is shared by the fsdp tests. The policy starts
untrained (no warm start) and dynamic sampling is off: the soft overlong punishment alone makes the rewards of a
group differ, so the two steps move the weights (checked), and an export of the initial weights would fail."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.runtime import hf_export

ROOT = Path(__file__).resolve().parents[1]
TINY_CPU = ROOT / "configs" / "tiny-cpu.yaml"
RUN_OVERRIDES = [
    "trainer.total_steps=2", "trainer.batch_size=2", "rollout.n_samples_per_prompt=4", "trainer.micro_batch_size=8",
    "model.warm_start_steps=0", "algorithm.dynamic_sampling=false", "rollout.max_new_tokens=24",
    "algorithm.overlong.cache_len=16", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
    "checkpoint.every=1", "checkpoint.keep_last=1", "checkpoint.hf_every=1", "weight_sync.checksum=true",
    "engine.startup_timeout_s=120",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from pipeline.runtime.train import train

    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(TINY_CPU, [*RUN_OVERRIDES, f"logging.dir={root}", "logging.run_name=hf"])
    result = train(cfg)
    assert result.steps == 2 and result.version == 2
    return Path(result.run_dir)


def _load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _trainer_at_checkpoint(run_dir: Path):
    """The trainer's own state at the run's last checkpoint: a fresh fsdp backend loading it."""
    from engines.fsdp.backend import build_backend

    cfg = load_config(run_dir / "config.yaml")
    _, trainer_dir = hf_export.trainer_checkpoint(run_dir, None)
    backend = build_backend(cfg, 0, 1)
    backend.setup(str(run_dir / "init_model"))
    backend.load(str(trainer_dir))
    return cfg, backend


def _micro_batch(vocab: int):
    from pipeline.testing.megatron import random_micro_batches

    return random_micro_batches(1, rows=3, vocab_size=vocab, seed=1)


def _hf_logprobs(model: torch.nn.Module, mb, temperature: float) -> torch.Tensor:
    """(B, T) log-prob of token t given < t, aligned as the trainer's (position 0 is 0)."""
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits.float() / temperature
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, mb.input_ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1) * mb.attention_mask


def test_run_writes_hf_checkpoints_keeping_the_newest(run_dir):
    assert [p.name for p in hf_export.hf_steps(run_dir)] == ["step_2"]  # step_1 pruned (checkpoint.keep_last=1)
    out = run_dir / "hf" / "step_2"
    index = json.loads((out / hf_export.INDEX).read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embedding: HF re-ties it
    assert "model.embed_tokens.weight" in index["weight_map"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    for name in ("generation_config.json", "tokenizer_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not [p for p in (run_dir / "hf").iterdir() if p.name.startswith(".")]  # no temporary left
    n_params = sum(p.numel() for p in _load_hf(out).parameters())
    assert index["metadata"]["total_size"] == 4 * n_params  # float32, the tied head stored once


def test_export_round_trips_logits_and_engine_checksum(run_dir, tmp_path):
    from engines.local.engine import Engine
    from pipeline.contracts.weight_wire import weights_checksum

    out = hf_export.export_run(run_dir, tmp_path / "exported")
    assert out == tmp_path / "exported"
    exported, online = _load_hf(out), _load_hf(run_dir / "hf" / "step_2")
    init = _load_hf(run_dir / "init_model")
    moved = [n for n, t in exported.state_dict().items() if not torch.equal(t, init.state_dict()[n])]
    assert len(moved) > 10  # the run trained: not the initial weights
    for name, t in online.state_dict().items():  # offline (DCP) and in-run (weight-sync path) exports agree
        assert torch.equal(t, exported.state_dict()[name]), name

    cfg, backend = _trainer_at_checkpoint(run_dir)
    mb = _micro_batch(exported.config.vocab_size)
    with torch.no_grad():
        ref = backend.forward_logprobs(mb)[0]
        got = _hf_logprobs(exported, mb[0], cfg.rollout.temperature)
    mask = mb[0].attention_mask.bool()
    mask[:, 0] = False
    torch.testing.assert_close(got[mask], ref[mask], rtol=0, atol=1e-5)

    trainer_named = list(backend.named_hf_weights())
    engine = Engine(exported)
    assert engine.checksum([n for n, _ in trainer_named]) == weights_checksum(trainer_named)


def test_dapo_export_cli_and_errors(run_dir, tmp_path, capsys):
    from pipeline.tools.cli import main

    assert main(["export", str(run_dir), "--step", "2", "--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert (tmp_path / "cli" / hf_export.INDEX).is_file()
    assert main(["export", str(run_dir), "--step", "7"]) == 2
    assert "--step 7: no complete checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "mine")]) == 2
    assert "mine: exists and is not a Hugging Face export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_export_refuses_a_corrupt_checkpoint_naming_the_file(run_dir, tmp_path, capsys):
    import shutil

    from pipeline.runtime import checkpoint

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shard = next((checkpoint.latest_checkpoint(copy) / "trainer").rglob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert hf_export.export_main([str(copy), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"dapo export: {shard}: ")
    assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_no_directory(run_dir, tmp_path, monkeypatch):
    target = tmp_path / "out"
    calls = []
    real = hf_export._copy_model_files

    def fail_after_shards(*args):  # the shards are on disk, the index is not: then the process fails
        calls.append(list(args[1].iterdir()))
        real(*args)
        raise OSError("disk full")

    monkeypatch.setattr(hf_export, "_copy_model_files", fail_after_shards)
    with pytest.raises(OSError, match="disk full"):
        hf_export.export_run(run_dir, target)
    assert calls and any(p.suffix == ".safetensors" for p in calls[0])  # it failed mid-write
    assert sorted(os.listdir(tmp_path)) == []  # neither `out` nor its temporary
    # An older export under the same name survives a failed overwrite.
    monkeypatch.setattr(hf_export, "_copy_model_files", real)
    hf_export.export_run(run_dir, target)
    monkeypatch.setattr(hf_export, "_copy_model_files", fail_after_shards)
    with pytest.raises(OSError):
        hf_export.export_run(run_dir, target)
    assert sorted(os.listdir(tmp_path)) == ["out"] and (target / hf_export.INDEX).is_file()


def test_dapo_eval_runs_on_the_export(run_dir, tmp_path, capsys):
    from pipeline.tools.cli import main

    out = hf_export.export_run(run_dir, tmp_path / "model")
    argv = [
        "eval", str(TINY_CPU), f"model.path={out}", f"model.tokenizer={out}", "data.eval_path=synthetic:arith?split=test&n=4",
        "eval.n_samples=1", "rollout.max_new_tokens=8", "algorithm.overlong.cache_len=4", f"logging.dir={tmp_path}", "logging.run_name=ev",
        "engine.startup_timeout_s=120",
    ]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [(m["n_prompts"], m["k"]) for m in saved.values()] == [(4, 1)]


def test_hf_every_schedule_and_config_errors():
    from pipeline.config import ConfigError

    def due(every: int, total: int = 5) -> list[int]:
        cfg = load_config(TINY_CPU, [f"checkpoint.hf_every={every}"])
        return [s for s in range(1, total + 1) if hf_export.hf_due(cfg, s, last=s == total)]

    assert (due(0), due(2), due(-1)) == ([5], [2, 4, 5], [])
    with pytest.raises(ConfigError, match="checkpoint.hf_dtype: must be bfloat16, float16, float32 or empty"):
        load_config(TINY_CPU, ["checkpoint.hf_dtype=int8"])


def test_stages_sharded_in_bf16_load_as_one_model(tmp_path):
    """Two 'stages' (disjoint halves of the weights), small shards, bfloat16: one loadable model, index complete."""
    from transformers import AutoModelForCausalLM

    from pipeline.testing.tiny_models import tiny_config

    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(tiny_config(tie=False)).eval()
    src.save_pretrained(tmp_path / "start")
    named = list(src.state_dict().items())
    out = tmp_path / "tmp"
    out.mkdir()
    half = len(named) // 2
    parts = [
        hf_export.write_rank_shards(named[:half], out, "rank00000", torch.bfloat16, tied=False, shard_bytes=20_000),
        hf_export.write_rank_shards(named[half:], out, "rank00002", torch.bfloat16, tied=False, shard_bytes=20_000),
    ]
    final = hf_export.finalize(out, tmp_path / "final", parts, str(tmp_path / "start"), torch.bfloat16)
    index = json.loads((final / hf_export.INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == {n for n, _ in named}  # untied: lm_head.weight is written
    assert index["metadata"]["total_size"] == 2 * sum(t.numel() for _, t in named)
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(final).state_dict()
    for name, t in named:
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], t.to(torch.bfloat16)), name
    assert not out.exists()


def _fsdp_rank(rank: int, world: int, port: int, tmp: str) -> None:
    """Two fsdp ranks (FSDP2 over gloo): one step, the in-run shards, a DCP checkpoint."""
    from engines.fsdp.backend import build_backend
    from engines.megatron.launch import init_dist
    from pipeline.algorithm.losses import make_loss_fn
    from pipeline.testing.megatron import random_micro_batches

    init_dist(rank, world, port)
    cfg = load_config(Path(tmp) / "run" / "config.yaml")
    backend = build_backend(cfg, rank, world)
    backend.setup(str(Path(tmp) / "init"))
    mbs = random_micro_batches(2, 3, 128, seed=1)[rank::world]
    backend.train_minibatch(mbs, make_loss_fn(cfg.algorithm))
    part = hf_export.write_backend_shards(backend, str(Path(tmp) / "init"), str(Path(tmp) / "online"), torch.float32)
    (Path(tmp) / f"part{rank}.json").write_text(json.dumps(part))
    backend.save(str(Path(tmp) / "run" / "checkpoints" / "step_00000001" / "trainer"))


@pytest.mark.slow
def test_fsdp_two_ranks_export_from_the_sharded_dcp(tmp_path):
    """A DCP checkpoint written by 2 FSDP ranks (sharded parameters) exports, in one process, to exactly what the
    in-run path (the weight sync's full state dict on the source rank) writes."""
    from engines.megatron.launch import spawn
    from pipeline.config import to_yaml
    from pipeline.testing.tiny_models import save_tiny_model

    save_tiny_model(tmp_path / "init", seed=2)
    cfg = load_config(TINY_CPU, ["trainer.world_size=2", f"model.path={tmp_path / 'init'}", "model.warm_start_steps=0"])
    (tmp_path / "run" / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(to_yaml(cfg))
    (tmp_path / "run" / "checkpoints" / "step_00000001" / "state.json").write_text(json.dumps({"step": 1}))
    (tmp_path / "online").mkdir()
    spawn(_fsdp_rank, 2, str(tmp_path), timeout_s=120)
    parts = [json.loads((tmp_path / f"part{r}.json").read_text()) for r in range(2)]
    assert bool(parts[0]) and not parts[1]  # rank 0 is the source
    online = hf_export.finalize(tmp_path / "online", tmp_path / "a", parts, str(tmp_path / "init"), torch.float32)
    offline = hf_export.export_run(tmp_path / "run", tmp_path / "b")
    a, b, init = _load_hf(online).state_dict(), _load_hf(offline).state_dict(), _load_hf(tmp_path / "init").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert sum(not torch.equal(a[n], init[n]) for n in a) > 10
