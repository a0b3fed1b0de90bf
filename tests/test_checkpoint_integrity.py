"""Checkpoint integrity (issue #22): a manifest of sha256 checksums written last, verified on resume; a corrupt or
planted file is refused naming it; `checkpoint.resume=auto` falls back to the newest intact checkpoint; the torch
trainer's extra state loads with weights_only=True, so a planted pickle never runs."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from engines.fsdp.backend import build_backend
from pipeline.config import load_config
from pipeline.contracts.records import Group, Sample
from pipeline.runtime import checkpoint
from pipeline.runtime.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling it creates `marker`: proof that the pickle ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    hf = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    Qwen2ForCausalLM(hf).save_pretrained(tmp / "m")
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml")
    b = build_backend(cfg, 0, 1)
    b.setup(str(tmp / "m"))
    return b


def _group(i: int) -> Group:
    s = Sample(prompt_id=f"p{i}", group_id=f"g{i}", index=0, prompt_ids=[1, 2], response_ids=[3], logprobs=[-0.5],
               versions=[0], reward=1.0, acc=True)  # fmt: skip
    return Group(prompt_id=f"p{i}", group_id=f"g{i}", samples=[s])


def _state(step: int) -> dict:
    return {"version": step, "rollout": {"pushed": step}, "buffer": {"kept": step}}


@pytest.fixture
def run(tmp_path, backend):
    """A run directory with checkpoints at steps 1 and 2."""
    for step in (1, 2):
        checkpoint.save(tmp_path, step, _state(step), [_group(step)], backend.save, keep_last=3)
    return tmp_path


def _ckpt(run, step: int) -> Path:
    return checkpoint.checkpoint_root(run) / f"step_{step:08d}"


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def test_intact_checkpoints_verify_and_load(run):
    manifest = json.loads((_ckpt(run, 2) / "manifest.json").read_text())
    assert {"state.json", "buffer.msgpack", "trainer/extra_rank0.pt", "trainer/dcp/.metadata"} <= set(manifest["files"])
    path, state, buffered = checkpoint.open_resume(run, "auto")
    assert path == _ckpt(run, 2) and state["step"] == 2 and [g.prompt_id for g in buffered] == ["p2"]


@pytest.mark.parametrize("rel", ["state.json", "buffer.msgpack", "trainer/extra_rank0.pt", "DCP_SHARD"])
def test_truncated_file_is_named_and_auto_falls_back(run, rel):
    newest = _ckpt(run, 2)
    if rel == "DCP_SHARD":
        rel = next(p for p in newest.rglob("*.distcp")).relative_to(newest).as_posix()
    _truncate(newest / rel)
    with pytest.raises(CheckpointError, match=str(newest / rel).replace(".", r"\.")):
        checkpoint.load(newest)
    path, state, _ = checkpoint.open_resume(run, "auto")
    assert path == _ckpt(run, 1) and state["step"] == 1
    with pytest.raises(CheckpointError, match=rel.replace(".", r"\.")):
        checkpoint.open_resume(run, str(newest))  # an explicit path does not fall back


def test_wrong_schema_state_is_named(run):
    newest = _ckpt(run, 2)
    (newest / "state.json").write_text(json.dumps({"step": "two", "version": 2, "rollout": {}, "buffer": {}}))
    checkpoint.write_manifest(newest, 2)  # checksums made to match: the schema check still refuses it
    with pytest.raises(CheckpointError, match=r"state\.json: 'step' must be int"):
        checkpoint.load(newest)
    (newest / "state.json").write_text("[1, 2]")
    checkpoint.write_manifest(newest, 2)
    with pytest.raises(CheckpointError, match=r"state\.json: expected a JSON object"):
        checkpoint.load(newest)
    assert checkpoint.open_resume(run, "auto")[0] == _ckpt(run, 1)


def test_every_checkpoint_corrupt_is_an_error_and_none_is_a_fresh_start(run, tmp_path_factory):
    for step in (1, 2):
        _truncate(_ckpt(run, step) / "buffer.msgpack")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        checkpoint.open_resume(run, "auto")
    assert checkpoint.open_resume(tmp_path_factory.mktemp("empty"), "auto") is None
    assert checkpoint.open_resume(run, "") is None


def test_a_planted_unlisted_file_is_refused(run):
    (_ckpt(run, 2) / "trainer" / "extra_rank1.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"extra_rank1\.pt: not listed"):
        checkpoint.load(_ckpt(run, 2))


def test_planted_pickle_in_extra_state_never_runs(run, backend, tmp_path):
    """Issue #22: extra_rank0.pt was loaded with weights_only=False, so a planted pickle ran on resume. Even with the
    manifest rewritten to match (an attacker who can write the directory), the backend's load refuses it."""
    marker = tmp_path / "pwned"
    newest = _ckpt(run, 2)
    torch.save({"scheduler": _Payload(str(marker)), "rng": torch.get_rng_state(), "optimizer_steps": 0},
               newest / "trainer" / "extra_rank0.pt")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"extra_rank0\.pt: (sha256 does not match|\d+ bytes, manifest)"):
        checkpoint.load(newest)
    checkpoint.write_manifest(newest, 2)
    checkpoint.load(newest)  # the manifest matches now: the backend is the last line
    with pytest.raises(pickle.UnpicklingError):
        backend.load(str(newest / "trainer"))
    assert not marker.exists()


def test_planted_dcp_metadata_pickle_never_runs(run, tmp_path):
    """DCP reads `.metadata` with plain pickle.load: a planted one is refused before DCP sees it."""
    marker = tmp_path / "pwned"
    newest = _ckpt(run, 2)
    (newest / "trainer" / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    checkpoint.write_manifest(newest, 2)
    with pytest.raises(CheckpointError, match=r"\.metadata: refused: UnpicklingError: refers to posix\.mkdir"):
        checkpoint.load(newest)
    assert not marker.exists()


def test_resume_loads_the_trainer_state_saved(run, backend):
    before = {k: v.clone() for k, v in backend.named_hf_weights()}
    backend.load(str(_ckpt(run, 2) / "trainer"))
    after = dict(backend.named_hf_weights())
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_explicit_resume_path_that_is_not_a_checkpoint_names_the_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"^checkpoint\.resume: no checkpoint directory at .*nope"):
        checkpoint.open_resume(tmp_path, str(tmp_path / "nope"))
