"""Checkpoints of a whole run: trainer ranks, rollout bookkeeping, buffer contents, step and policy version.

Contract:
- `save(...)` writes into `<run>/checkpoints/step_XXXXXXXX.tmp/`, and only when every part is on disk renames it
  to `step_XXXXXXXX/` and atomically repoints `latest`; a crash mid-save leaves the last good checkpoint intact.
  The oldest checkpoints beyond `keep_last` are removed after the new one is complete.
- The driver state is JSON (`state.json`); buffered groups are msgpack (`buffer.msgpack`, the same Struct codec as
  the ZMQ transport); trainer ranks write their own files under `trainer/` (backend.save).
- `latest_checkpoint(run_dir)` finds what `checkpoint.resume=auto` resumes from.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from pipeline.types import Group

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
