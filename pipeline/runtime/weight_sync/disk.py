"""Colocated weight sync through a memory filesystem (weight_sync.colocated_transport = disk).

Why: SGLang's colocated route (/update_weights_from_tensor) takes a base64 pickle of CUDA-IPC handles, and no pickle
crosses a socket here. /update_weights_from_disk takes a path instead: the trainer writes the HF-named weights as
safetensors into a memory filesystem on its node, and every engine there loads them (one write, N reads, no
network, no pickle). It is SGLang's own checkpoint loader reading a checkpoint directory, so it works with any
engine TP size.

Contract:
- `DiskStaging(root, model_dir, stage)`: `root` (weight_sync.disk_dir) must be a writable directory (ConfigError
  naming the key otherwise). Directories that earlier processes on this host left behind when they died are
  removed (their names carry host and pid), so a crash does not pin GBs of RAM in /dev/shm for good.
- `open(version)` creates `<root>/dapo-wsync-<host>-<pid>-s<stage>-v<version>-<random>/` (mode 0700) and links the
  non-weight files of `model_dir` into it (config.json, generation_config.json, tokenizer files; not *.safetensors,
  *.bin, *.pt or index files), so that once written it is a loadable HF checkpoint directory.
- `StagedCheckpoint.write(names, tensors)` saves one bucket (CPU tensors, HF names) as `model-<n>.safetensors`;
  `finish()` writes model.safetensors.index.json (weight_map, total_size; both SGLang and the CPU engine load the
  files it names); `remove_later()` deletes the directory on a background thread (freeing GBs of tmpfs pages took
  0.5 s per 3 GB here), `remove()` now (waiting for a removal under way; idempotent). The sender removes it as soon
  as the engines have loaded it, also when the sync fails; the next `open()` and `DiskStaging.close()` wait until
  it is gone: at most one staged checkpoint per sender exists, and only during a sync and the moment after. It
  holds the model once in the wire dtype.
- Writing fails with an OSError naming weight_sync.disk_dir and its free space (e.g. a container's 64 MB /dev/shm).
- `private_run_root(base) -> Path` creates the run's private staging root `<base>/dapo-run-<host>-<pid>-<random>/`
  (mode 0700, created fresh by mkdtemp: never an existing directory another user could have planted or can write),
  `remove_run_root(path)` removes it. pipeline/runtime/run_security.py makes it weight_sync.disk_dir for the run, so
  per-sync directories live inside it and CPU engines load only from it. On another node (the trainer's, when the
  driver runs elsewhere) `DiskStaging` makes the same-named root itself (0700; an existing one must be a private
  directory of ours) and removes it at `close(final=True)`. `reap_orphans` also removes run roots of
  dead processes. DiskStaging refuses a root that other users can write to (mode & 0o022) unless it is sticky
  (like /dev/shm, /tmp), where mkdtemp's 0700 directories are still private.
- Engines must see the directory: `check_engines_see(root, source_node, engine_nodes)` fails (ConfigError naming
  the engines) when an engine runs on another node than the sync source and `root` is not on a shared filesystem
  (NFS, Lustre, GPFS, CephFS, a FUSE mount, ...; judged from /proc/mounts).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.contracts.weight_wire import write_safetensors

log = logging.getLogger(__name__)

PREFIX = "dapo-wsync-"
RUN_PREFIX = "dapo-run-"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())


class StagedCheckpoint:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = 0
        self.nbytes = 0
        self.weight_map: dict[str, str] = {}
        self._removal: threading.Thread | None = None

    def write(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        name = f"model-{self.files:05d}.safetensors"
        try:
            self.nbytes += write_safetensors(self.path / name, names, tensors)
        except OSError as e:
            raise _disk_error(self.path, f"writing {name} failed ({e})") from e
        self.files += 1
        self.weight_map.update(dict.fromkeys(names, name))

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.nbytes}, "weight_map": self.weight_map}
        (self.path / INDEX_FILE).write_text(json.dumps(index))

    def remove_later(self) -> None:
        if self._removal is None:
            args = (self.path, True)  # ignore_errors
            self._removal = threading.Thread(target=shutil.rmtree, args=args, name="weight-sync-rm", daemon=True)
            self._removal.start()

    def remove(self) -> None:
        if self._removal is not None:
            self._removal.join()
        shutil.rmtree(self.path, ignore_errors=True)


class DiskStaging:
    def __init__(self, root: str, model_dir: str = "", stage: int = 0) -> None:
        self._made_root = _ensure_run_root(root)
        if not os.path.isdir(root):
            raise ConfigError(f"weight_sync.disk_dir: {root!r} is not a directory")
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(f"weight_sync.disk_dir: {root!r} is not writable")
        mode = os.stat(root).st_mode
        if mode & 0o022 and not mode & 0o1000:  # others could swap our staged files (sticky dirs protect them)
            raise ConfigError(
                f"weight_sync.disk_dir: {root!r} is writable by other users and not sticky (mode {mode & 0o7777:o})"
            )
        self.root, self.model_dir, self.stage = Path(root), model_dir, stage
        self._open: list[StagedCheckpoint] = []
        reap_orphans(self.root)

    def open(self, version: int) -> StagedCheckpoint:
        self.close()  # the previous sync's checkpoint is gone before a new one takes the space
        prefix = f"{PREFIX}{_host()}-{os.getpid()}-s{self.stage}-v{version}-"
        try:
            staged = StagedCheckpoint(Path(tempfile.mkdtemp(prefix=prefix, dir=self.root)))
        except OSError as e:
            raise _disk_error(self.root, f"creating a directory failed ({e})") from e
        self._open = [staged]
        if self.model_dir:
            for src in Path(self.model_dir).iterdir():
                if src.is_file() and not _is_weight_file(src.name) and not src.name.startswith("."):
                    os.symlink(src.resolve(), staged.path / src.name)
        return staged

    def close(self, final: bool = False) -> None:
        """Remove the staged checkpoint; `final` (the sender is done) also removes a run root made here."""
        for staged in self._open:
            staged.remove()
        self._open = []
        if final and self._made_root:
            remove_run_root(self.root)
            self._made_root = False


def _ensure_run_root(root: str) -> bool:
    """A run root (`dapo-run-...`, named by the driver) on a node other than the driver's does not exist yet: make
    it here, 0700 (True). An existing one must be ours and private: one planted by another user (its name shows in
    the engines' command lines) is refused."""
    path = Path(root)
    if not path.name.startswith(RUN_PREFIX):
        return False
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        pass
    except OSError:
        return False  # no parent, not writable: the checks that follow name the problem
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ConfigError(f"weight_sync.disk_dir: {root!r} exists but is not a private (0700) directory of ours")
    return False


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _disk_error(where: Path, what: str) -> OSError:
    try:
        free = f"{shutil.disk_usage(where).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    return OSError(
        f"weight_sync.disk_dir: {what} in {where} ({free}); a sync stages the whole model once in the wire dtype: "
        "enlarge the memory filesystem (e.g. docker --shm-size) or point weight_sync.disk_dir elsewhere"
    )


def private_run_root(base: str | Path) -> Path:
    """A fresh 0700 directory `<base>/dapo-run-<host>-<pid>-<random>/` (ConfigError naming weight_sync.disk_dir
    when it cannot be made). Run roots that dead processes of this user left in `base` are removed first."""
    base = Path(base)
    if not base.is_dir():
        raise ConfigError(f"weight_sync.disk_dir: {str(base)!r} is not a directory")
    reap_orphans(base)
    try:
        path = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{_host()}-{os.getpid()}-", dir=base))
    except OSError as e:
        raise ConfigError(f"weight_sync.disk_dir: cannot create the run's staging directory in {base} ({e})") from e
    os.chmod(path, 0o700)  # mkdtemp already does; explicit, as the guarantee is the point
    return path


def remove_run_root(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def reap_orphans(root: Path) -> list[Path]:
    """Remove staging directories (per sync and per run) under `root` whose process (on this host, of this user) is
    gone."""
    removed = []
    host, uid = _host(), os.getuid()
    entries = [(PREFIX, e) for e in root.glob(f"{PREFIX}{host}-*")]
    entries += [(RUN_PREFIX, e) for e in root.glob(f"{RUN_PREFIX}{host}-*")]
    for prefix, entry in entries:
        pid = entry.name[len(prefix) + len(host) + 1 :].split("-", 1)[0]
        try:
            if not pid.isdigit() or int(pid) == os.getpid() or entry.lstat().st_uid != uid or _alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.warning("removed %s, left behind by process %s (gone)", entry, pid)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p", "virtiofs")


def filesystem_type(path: str | Path, mounts: str | None = None) -> str:
    """The type of the filesystem holding `path` (the longest mount point above it in /proc/mounts)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target, best, kind = os.path.realpath(path), -1, ""
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), parts[2]
    return kind


def check_engines_see(root: str, source_node: str, engine_nodes: dict[str, str], mounts: str | None = None) -> None:
    """ConfigError when an engine (url -> node) runs on another node than the source and `root` is node-local."""
    elsewhere = [url for url, node in engine_nodes.items() if node != source_node]
    kind = filesystem_type(root, mounts)
    if not elsewhere or kind in SHARED_FILESYSTEMS or kind.startswith("fuse."):
        return
    raise ConfigError(
        f"weight_sync.disk_dir: {root} ({kind or 'unknown'} filesystem) is local to the sync source's node, but "
        f"engines {', '.join(elsewhere)} run on other nodes and would not find the staged checkpoint; keep each "
        "engine on its sync source's node (colocated: one node, cluster.placement_strategy=STRICT_PACK) or set "
        "weight_sync.disk_dir to a directory on a filesystem shared by the nodes"
    )
