"""The weight-sync process group and tensor (de)serialisation, shared by the engine and the trainer-side sender.

Contract (docs/DESIGN.md, Contracts; mirrors SGLang's `init_custom_process_group`, checked against sglang 0.5.5 and
0.5.23, `sglang/srt/utils/common.py` and `model_runner_components/weight_updater.py`):

- `create_sync_group` builds a NEW process group beside any default group: a TCP rendezvous at
  `tcp://master_address:master_port` (rank 0 hosts the TCPStore), the store wrapped in a `PrefixStore` named
  `group_name`, the group made by `_new_process_group_helper`, and the group's rank map set to the identity so
  `broadcast(src=0, group=pg)` means group rank 0 in every process, whatever its default-group rank.
  The trainer's source rank calls it with rank 0; an engine calls it with rank `rank_offset` (+ its TP rank).
  It blocks until all `world_size` ranks have joined (or `timeout_s` passes). No default group is needed.
- Per-tensor protocol: one `broadcast` from rank 0 per tensor, in the order of `names`.
  `flattened_bucket` protocol (SGLang's `load_format="flattened_bucket"`): one uint8 broadcast per request,
  the tensors' raw bytes concatenated in `names` order (`flatten_bucket` / `unflatten_bucket`).
- `byte_region` views tensors that lie back to back in memory as one flattened bucket (zero-copy send/receive).
- `weights_checksum` is what `POST /weights_checksum` (our extension) answers, so a sender can compare.
- `/update_weights_from_tensor` on the CPU engine takes base64 safetensors bytes (`encode_named_tensors`), not
  SGLang's pickled `MultiprocessingSerializer` payload: no pickle crosses a socket here.
- Safetensors files for /update_weights_from_disk: `write_safetensors` writes the standard format (8-byte header
  length, JSON header, raw bytes in order) straight from the tensors' memory with one write per tensor, and
  `read_safetensors_into` reads one tensor's bytes straight into a destination tensor's memory; on tmpfs each is
  a single memcpy (safetensors' own save/load measured 1.3 and 1.5 GB/s here, these 2.1 and 6.9 GB/s: see the
  weight-sync benchmark). Files are validated by `safetensors.safe_open` before their offsets are trusted.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

SAFETENSORS_FORMAT = "safetensors"
FLATTENED_BUCKET_FORMAT = "flattened_bucket"


def create_sync_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str = "gloo",
    timeout_s: float = 600.0,
) -> dist.ProcessGroup:
    """Join (rank > 0) or host (rank 0) the weight-sync group; blocks until all ranks are in."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    if not group_name:
        raise ValueError("create_sync_group: group_name must not be empty")
    if not 0 <= rank < world_size:
        raise ValueError(f"create_sync_group: rank {rank} outside world_size {world_size}")
    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, backend_options=None, timeout=timeout
    )
    # Identity rank map (as SGLang does) so src=0 names the trainer in every process.
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16' or 'torch.bfloat16' -> torch.bfloat16; anything else raises naming the string."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling SGLang's `getattr(torch, dtype)` expects)."""
    return str(dtype).removeprefix("torch.")


def flatten_bucket(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Raw bytes of `tensors`, concatenated in order, as one uint8 tensor (SGLang's FlattenedTensorBucket layout)."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def bucket_nbytes(dtypes: list[torch.dtype], shapes: list[list[int]]) -> int:
    return sum(torch.Size(s).numel() * d.itemsize for d, s in zip(dtypes, shapes, strict=True))


def unflatten_bucket(
    buf: torch.Tensor, names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]]
) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `flatten_bucket`: views into `buf`, one per name."""
    out, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        size = torch.Size(shape).numel() * dtype.itemsize
        if offset % dtype.itemsize:
            raise ValueError(f"tensor {name}: byte offset {offset} not aligned to {dtype}")
        out.append((name, buf[offset : offset + size].view(dtype).reshape(shape)))
        offset += size
    if offset != buf.numel():
        raise ValueError(f"bucket holds {buf.numel()} bytes but the metadata describes {offset}")
    return out


def byte_region(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One uint8 view over the bytes of `tensors` if they already form a flattened bucket: each contiguous, all back
    to back in one storage in this order (a lone tensor, or parameters kept in one flat buffer); else None. Writing
    into the view writes the tensors (the weight-sync receiver lands buckets in place; the sender sends from it)."""
    first = tensors[0]
    storage = first.untyped_storage()
    expected = first.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() != expected or t.untyped_storage().data_ptr() != storage.data_ptr():
            return None
        expected += t.numel() * t.element_size()
    start, nbytes = first.data_ptr() - storage.data_ptr(), expected - first.data_ptr()
    with torch.no_grad():
        return torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, start, (nbytes,))


def encode_named_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """One `serialized_named_tensors` entry for the CPU engine: base64 of safetensors bytes."""
    data = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    return base64.b64encode(data).decode("ascii")


def decode_named_tensors(payload: str | bytes) -> dict[str, torch.Tensor]:
    """Inverse of `encode_named_tensors`; raises ValueError on anything that is not base64 safetensors."""
    try:
        return st_load(base64.b64decode(payload, validate=True))
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad request
        raise ValueError(f"serialized_named_tensors: not base64 safetensors bytes ({e})") from None


def weights_checksum(named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> str:
    """sha256 over (name, raw bytes) in the given order; tensors cast to `dtype` first when given.

    Our extension (`POST /weights_checksum`), not SGLang's. A sender holding bf16 weights passes dtype=bfloat16
    so an engine that stores them in float32 hashes the same bytes.
    """
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        h.update(name.encode())
        h.update(b"\0")
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no extra copy
    return h.hexdigest()


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (writable when the tensor is)."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: str | Path, names: list[str], tensors: list[torch.Tensor]) -> int:
    """Save contiguous CPU tensors as a safetensors file, in the given order; returns the bytes of tensor data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in zip(names, tensors, strict=True):
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"{name}: write_safetensors needs a contiguous CPU tensor of a plain dtype")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensor data starts 8-byte aligned
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            if t.numel():
                _write_all(fd, _bytes_of(t))
    finally:
        os.close(fd)
    return offset


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def safetensors_layout(path: str | Path) -> tuple[int, list[tuple[str, torch.dtype, torch.Size, int, int]]]:
    """(where the data starts, [(name, dtype, shape, begin, end)] in file order) of a safetensors file that
    `safe_open` accepts (it checks that offsets, shapes and dtypes agree); ValueError for a dtype torch lacks."""
    with safe_open(path, framework="pt"):
        pass
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    entries = []
    for name, meta in header.items():
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: {name} has dtype {meta['dtype']}, which the CPU engine does not load")
        entries.append((name, dtype, torch.Size(meta["shape"]), *meta["data_offsets"]))
    return 8 + length, sorted(entries, key=lambda e: e[3])


def read_safetensors_into(f, start: int, begin: int, end: int, dest: torch.Tensor) -> None:
    """Read bytes [begin, end) of the data section of the open file `f` into the contiguous CPU tensor `dest`."""
    view = _bytes_of(dest)
    if len(view) != end - begin:
        raise ValueError(f"{end - begin} bytes in the file for a {len(view)}-byte tensor")
    f.seek(start + begin)
    while view:
        n = f.readinto(view)
        if not n:
            raise ValueError(f"{f.name}: file ends {len(view)} bytes early")
        view = view[n:]
