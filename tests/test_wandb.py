"""Weights & Biases beside TensorBoard: one MetricsLogger feeds both the same names, steps and values (an evaluation
at its `eval/step`). Offline mode in a temporary WANDB_DIR; the offline run file is read back record by record
(a LevelDB-style log of `wandb_internal_pb2.Record`s after a 7-byte `:W&B` header)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runtime.metrics import MetricsLogger, make_sinks

wandb = pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = 32768


def read_history(path: Path) -> list[dict[str, float]]:
    """The history rows (`_step` and the logged values) of an offline .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def tensorboard_scalars(logdir: Path) -> set[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {(tag, e.step, round(e.value, 6)) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_wandb_offline_gets_what_tensorboard_gets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "runs" / "my-run"
    cfg = load_config(
        ROOT / "configs" / "tiny-cpu.yaml", ["logging.wandb.project=dapo-test", "engine.api_key=s3cret-key"]
    )
    logger = MetricsLogger(str(run_dir / "tb"), 3, console=False, sinks=make_sinks(cfg, run_dir))
    logger.log(1, {"reward/mean": 0.5, "time/step(s)": 1.25, "train/bad": float("nan")})
    logger.log(2, {"reward/mean": -0.25, "time/step(s)": 1.5})
    logger.log_eval({"eval/step": 1, "eval/acc": 0.75, "eval/weight_version": 1})  # finished at step 2
    logger.log(3, {"reward/mean": 0.125})
    logger.close()

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-my-run-*.wandb")  # named after the run directory
    rows = read_history(run_file)
    got = set()
    for row in rows:
        for k, v in row.items():
            if not k.startswith("_"):
                x = row["eval/step"] if k.startswith("eval/") else row["_step"]  # define_metric's x-axis
                got.add((k, int(x), round(v, 6)))
    assert got == tensorboard_scalars(run_dir / "tb")
    assert ("eval/acc", 1, 0.75) in got and ("reward/mean", 3, 0.125) in got
    assert not any("train/bad" in row for row in rows)  # non-finite values are dropped, as for TensorBoard
    assert [r["_step"] for r in rows] == [1, 2, 3]
    raw = b"".join(p.read_bytes() for p in run_file.parent.rglob("*") if p.is_file())
    assert b"dapo-test" in raw and b"s3cret-key" not in raw  # the config goes along, secrets masked


def test_no_project_no_wandb():
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml")
    assert make_sinks(cfg, "runs/x") == []
    cfg.logging.wandb.project, cfg.logging.wandb.mode = "p", "disabled"
    assert make_sinks(cfg, "runs/x") == []
