"""Checkpoints of a whole run: trainer ranks, rollout bookkeeping, buffer contents, step and policy version.

Contract:
- `save(...)` writes into `<run>/checkpoints/step_XXXXXXXX.tmp/`, then, last, `manifest.json` (the sha256 and size
  of every other file, written atomically); only then is the directory renamed to `step_XXXXXXXX/` and `latest`
  atomically repointed. A crash mid-save leaves the last good checkpoint intact. The oldest checkpoints beyond
  `keep_last` are removed after the new one is complete.
- The driver state is JSON (`state.json`); buffered groups are msgpack (`buffer.msgpack`, the same Struct codec as
  the ZMQ transport); trainer ranks write their own files under `trainer/` (backend.save).
- `verify(path)` checks a checkpoint against its manifest (every listed file present, same size and sha256, no
  unlisted file) and that every torch DCP `.metadata` pickle references only torch's checkpoint classes (DCP
  unpickles it with plain `pickle.load`); `load(path)` verifies, then parses `state.json` (schema checked) and
  `buffer.msgpack`. Every problem raises `CheckpointError` naming the file. A checkpoint written before manifests
  existed loads with a warning (no checksums to check).
- `open_resume(run_dir, spec)` is what `checkpoint.resume` means: "" nothing; a path: that checkpoint or an error;
  `auto`: the newest intact checkpoint of the run (a corrupt newer one is skipped with a warning naming its bad
  file), None when the run has none, an error when every one is corrupt. Hashing is the cost: every byte of a
  checkpoint is read once more on save and on resume (on up to 8 threads).
- `latest_checkpoint(run_dir)` is the newest complete checkpoint directory (not verified; for messages).
- The loop's side: `resume_run` restores trainer ranks and buffer from the checkpoint `checkpoint.resume` names
  (`open_resume`) and returns (step, version, rollout state) (a fresh start: (0, 0, None)); `save_run` saves at
  the manager's consistent cut (its `pushed` count: groups pushed after it are regenerated on resume); `due` says
  when.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from pipeline.config import Config
from pipeline.contracts.records import Group

log = logging.getLogger("dapo")

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
_groups = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(list[Group])
# state.json: the keys resume reads, with their types.
_STATE_SCHEMA: dict[str, type] = {"step": int, "version": int, "rollout": dict, "buffer": dict}


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the checkpoint file at fault."""


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
    write_manifest(tmp, step)  # last: its presence says every other file is complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_atomic(root / "latest", final.name)
    _prune(root, keep_last)
    return final


def write_manifest(path: Path, step: int) -> None:
    files = _digests(path, _listing(path))
    _write_atomic(path / MANIFEST, json.dumps({"schema": MANIFEST_SCHEMA, "step": step, "files": files}, indent=1))


def verify(path: str | os.PathLike) -> None:
    """Raise CheckpointError naming the first file that does not match the manifest (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint directory there")
    listed = _read_manifest(path)
    present = set(_listing(path))
    if listed is not None:
        missing = sorted(set(listed) - present)
        if missing:
            raise CheckpointError(f"{path / missing[0]}: missing (listed in {MANIFEST})")
        digests = _digests(path, sorted(listed))
        for rel, want in sorted(listed.items()):
            got = digests[rel]
            if got["bytes"] != want.get("bytes"):
                raise CheckpointError(f"{path / rel}: {got['bytes']} bytes, {MANIFEST} says {want.get('bytes')}")
            if got["sha256"] != want.get("sha256"):
                raise CheckpointError(f"{path / rel}: sha256 does not match {MANIFEST} (corrupt or modified)")
        extra = sorted(present - set(listed))
        if extra:
            raise CheckpointError(f"{path / extra[0]}: not listed in {MANIFEST} (planted or left over); refused")
    else:
        log.warning("%s: no %s (a checkpoint from before checksums): its files are not verified", path, MANIFEST)
    for rel in sorted(present):
        if rel.endswith(".metadata"):
            _check_dcp_metadata(path / rel)


def load(path: str | os.PathLike) -> tuple[dict[str, Any], list[Group]]:
    """(state, buffered groups) of a verified checkpoint; CheckpointError naming the file otherwise."""
    path = Path(path)
    verify(path)
    state = _read_state(path / "state.json")
    try:
        buffered = _groups[1].decode((path / "buffer.msgpack").read_bytes())
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise CheckpointError(f"{path / 'buffer.msgpack'}: unreadable: {e}") from None
    return state, buffered


def open_resume(run_dir: str | os.PathLike, spec: str) -> tuple[Path, dict[str, Any], list[Group]] | None:
    """(checkpoint, state, buffered groups) that `checkpoint.resume = spec` resumes from, or None (fresh start)."""
    if not spec:
        return None
    if spec != "auto":
        if not Path(spec).is_dir():
            raise CheckpointError(f"checkpoint.resume: no checkpoint directory at {spec}")
        return Path(spec), *load(spec)
    candidates = _complete(checkpoint_root(run_dir))[::-1]  # newest first
    errors = []
    for path in candidates:
        try:
            return path, *load(path)
        except CheckpointError as e:
            log.warning("checkpoint.resume=auto: skipping %s: %s", path.name, e)
            errors.append(str(e))
    if errors:
        raise CheckpointError(
            f"checkpoint.resume=auto: no intact checkpoint in {checkpoint_root(run_dir)}: {errors[0]}"
        )
    return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    done = _complete(root)
    return done[-1] if done else None


# --------------------------------------------------------------------------------------------------- helpers
def _complete(root: Path) -> list[Path]:
    """Renamed (complete) checkpoint directories, oldest first."""
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def _listing(path: Path) -> list[str]:
    """Every file under path except the manifest, as sorted POSIX relative paths."""
    out = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()]
    return sorted(rel for rel in out if rel != MANIFEST)


def _digests(root: Path, rels: list[str]) -> dict[str, dict[str, Any]]:
    """{rel: digest}, hashed on a few threads (hashlib releases the GIL): checkpoints of large models are big."""
    with cf.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(rels, pool.map(lambda rel: _digest(root / rel), rels), strict=True))


def _digest(file: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    n = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": n}


def _read_manifest(path: Path) -> dict[str, dict[str, Any]] | None:
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if manifest.get("schema") != MANIFEST_SCHEMA or not isinstance(files, dict):
            raise ValueError(f"schema {manifest.get('schema')!r}, expected {MANIFEST_SCHEMA}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: unreadable manifest: {e}") from None
    return files


def _read_state(file: Path) -> dict[str, Any]:
    try:
        state = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(state).__name__}")
    for key, kind in _STATE_SCHEMA.items():
        if key not in state:
            raise CheckpointError(f"{file}: missing key {key!r} (not a checkpoint of this version?)")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{file}: {key!r} must be {kind.__name__}; got {type(state[key]).__name__}")
    return state


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Resolves only what a torch.distributed.checkpoint `.metadata` file holds: classes (never functions) of torch's
    and megatron-core's modules, torch dtypes, paths; anything else (os.system, builtins.eval, ...) is refused before
    it can run."""

    _MODULES = ("torch.", "megatron.core.")
    _PLAIN = {
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co by name
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._PLAIN:
            return super().find_class(module, name)
        if module.startswith(self._MODULES) or module == "torch":
            found = super().find_class(module, name)
            import torch

            if isinstance(found, type | torch.dtype):
                return found
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a DCP metadata file never does")


def _check_dcp_metadata(file: Path) -> None:
    try:
        _DCPMetadataUnpickler(io.BytesIO(file.read_bytes())).load()
    except Exception as e:  # noqa: BLE001 - any failure to read it safely is a refusal
        raise CheckpointError(f"{file}: refused: {type(e).__name__}: {e}") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    done = _complete(root)
    for old in done[: max(len(done) - max(keep_last, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def resume_run(
    cfg: Config, run_dir: Path, trainers: Any, buffer: Any, found: Any = "open"
) -> tuple[int, int, dict | None]:
    """(step, version, rollout state) of the checkpoint named by checkpoint.resume, or a fresh start. `found`:
    what `open_resume` returned, when the caller verified the checkpoint before starting the cluster."""
    if isinstance(found, str):
        found = open_resume(run_dir, cfg.checkpoint.resume)  # verified; auto skips corrupt ones
    if found is None:  # no resume, or auto and nothing saved yet
        return 0, 0, None
    path, state, buffered = found
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
