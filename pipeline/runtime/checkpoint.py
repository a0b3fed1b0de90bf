"""Checkpoints of a whole run: trainer ranks, rollout bookkeeping, buffer contents, step and policy version.

Contract:
- `save(...)` writes into `<run>/checkpoints/step_XXXXXXXX.tmp/`, and only when every part is on disk renames it
  to `step_XXXXXXXX/` and atomically repoints `latest`; a crash mid-save leaves the last good checkpoint intact.
  The oldest checkpoints beyond `keep_last` are removed after the new one is complete.
- The driver state is JSON (`state.json`); buffered groups are msgpack (`buffer.msgpack`, the same Struct codec as
  the ZMQ transport); trainer ranks write their own files under `trainer/` (backend.save).
- `latest_checkpoint(run_dir)` finds what `checkpoint.resume=auto` resumes from.
- The loop's side: `resume_run` restores trainer ranks and buffer from the checkpoint `checkpoint.resume` names and
  returns (step, version, rollout state) (a fresh start: (0, 0, None)); `save_run` saves at the manager's
  consistent cut (its `pushed` count: groups pushed after it are regenerated on resume); `due` says when.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from pipeline.config import Config, ConfigError
from pipeline.contracts.records import Group

log = logging.getLogger("dapo")

_groups = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(list[Group])


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save(
    run_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    buffered: list[Group],
    save_trainer: Callable[[str], None],
    keep_last: int,
) -> Path:
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "trainer").mkdir(parents=True)
    save_trainer(str(tmp / "trainer"))
    (tmp / "buffer.msgpack").write_bytes(_groups[0].encode(buffered))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(root / "latest", final.name)
    _prune(root, keep_last)
    return final


def load(path: str | os.PathLike) -> tuple[dict[str, Any], list[Group]]:
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    buffered = _groups[1].decode((path / "buffer.msgpack").read_bytes())
    return state, buffered


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp") and (p / "state.json").is_file())
    return done[-1] if done else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))
    for old in done[: max(len(done) - max(keep_last, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def resume_run(cfg: Config, run_dir: Path, trainers: Any, buffer: Any) -> tuple[int, int, dict | None]:
    """(step, version, rollout state) of the checkpoint named by checkpoint.resume, or a fresh start."""
    spec = cfg.checkpoint.resume
    if not spec:
        return 0, 0, None
    path = latest_checkpoint(run_dir) if spec == "auto" else Path(spec)
    if path is None:  # auto, and nothing saved yet
        return 0, 0, None
    if not (path / "state.json").is_file():
        raise ConfigError(f"checkpoint.resume: no checkpoint at {path}")
    state, buffered = load(path)
    trainers.load(str(path / "trainer"))
    buffer.restore(buffered)
    buffer.load_state_dict(state["buffer"])
    log.info("resumed from %s (step %d, weights v%d)", path, state["step"], state["version"])
    return state["step"], state["version"], state["rollout"]


def due(cfg: Config, step: int, stopping: bool) -> bool:
    every = cfg.checkpoint.every
    return bool(every and step % every == 0 or stopping or step == cfg.trainer.total_steps)


def save_run(cfg: Config, run_dir: Path, step: int, version: int, trainers: Any, rollout: Any, buffer: Any) -> None:
    rollout_state = rollout.state_dict()
    cut = rollout_state["pushed"]  # the consistent cut: groups pushed after it are regenerated on resume
    state = {"version": version, "rollout": rollout_state, "buffer": buffer.state_dict(cut)}
    save(run_dir, step, state, buffer.snapshot(cut), trainers.save, cfg.checkpoint.keep_last)
