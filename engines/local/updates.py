"""Weight updates of the CPU engine: SGLang's /init_weights_update_group, /update_weights_from_distributed,
/update_weights_from_tensor and /destroy_weights_update_group, as blocking functions returning (success, message).

Contract (what a trainer-side sender must do, identical to driving SGLang):
1. POST /init_weights_update_group {master_address, master_port, rank_offset, world_size, group_name, backend}
   while the sender itself calls `create_sync_group(..., rank=0, ...)`; the engine joins as rank `rank_offset`.
2. For each bucket: POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache,
   weight_version, load_format} and, concurrently, broadcast from group rank 0: one tensor per name in `names`
   order (default), or one uint8 tensor holding all of them back to back (`load_format="flattened_bucket"`).
   The engine checks names and shapes against the model's HF parameter names (tied lm_head/embedding: either
   name works) from the metadata BEFORE the broadcast; it always receives every byte (so the collective never
   hangs), and a bad request is received into scratch memory only, changes nothing and answers success=false
   naming the tensor. `weight_version` is set after every tensor of the request is in place; send it with the
   last bucket.
3. POST /destroy_weights_update_group {group_name} when done with the group (optional; frees the receive buffer).
Receiving and copying run on the engine thread between decode steps (the engine is normally paused then).

/update_weights_from_disk {model_path, load_format, weight_version} (`update_from_disk`) loads a directory of
safetensors files the way SGLang's DefaultModelLoader picks them: the files named in model.safetensors.index.json
if there is one, else every *.safetensors file. model_path must be an existing directory, inside `allowed_root`
when one is set (symlinked files may not lead out of it either). Every file's header is checked against the model
(names, shapes) before any tensor is read: a bad checkpoint changes nothing; then the files are loaded one after
another, each tensor read straight into its parameter where dtype and layout allow (else into the receive buffer,
then copied and cast), and `weight_version` is set after the last, all in one engine operation (no forward sees a
mix).

Receive path (why it is shaped like this: on a CPU host the wire is memcpy-bound, so every extra pass over the
bytes, or first-touch page faults of fresh memory, costs a large fraction of the sync):
- zero copy: a tensor whose parameter is contiguous and of the wire dtype is broadcast straight into the
  parameter (per-tensor format); a flattened bucket whose parameters lie back to back in one storage, in `names`
  order and in the wire dtype, is broadcast straight into that memory region as one uint8 view.
- otherwise the bytes land in one receive buffer kept between requests (grown only when a request needs more),
  and are then copied (and cast) into the parameters in place, one copy per tensor.
- a broadcast that fails half-way may leave the tensors of that request partly written (as a failed sync leaves
  earlier buckets applied): the sender retries the sync or restarts the engine.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from engines.local.engine import Engine
from pipeline.contracts.weight_wire import (
    FLATTENED_BUCKET_FORMAT,
    SAFETENSORS_FORMAT,
    bucket_nbytes,
    byte_region,
    create_sync_group,
    decode_named_tensors,
    parse_dtype,
    read_safetensors_into,
    safetensors_layout,
    unflatten_bucket,
)

DISK_LOAD_FORMATS = (None, "auto", SAFETENSORS_FORMAT)
INDEX_FILE = "model.safetensors.index.json"


class WeightReceiver:
    def __init__(self, engine: Engine, group_timeout_s: float = 600.0, allowed_root: str = "") -> None:
        self.engine = engine
        self.group_timeout_s = group_timeout_s
        self.allowed_root = os.path.realpath(allowed_root) if allowed_root else ""
        self.groups: dict[str, dist.ProcessGroup] = {}
        self._lock = threading.Lock()
        self.direct = True  # receive straight into the parameters where their layout allows (off: always copy)
        # Called on the engine thread with (name, tensor as received) for every tensor of a successful request
        # (in the zero-copy path: the parameter itself). Benchmarks hash what arrived with it.
        self.on_received: Callable[[list[tuple[str, torch.Tensor]]], None] | None = None
        self._buffer: torch.Tensor | None = None  # uint8 receive buffer, kept between requests

    # Runs on a worker thread: it blocks until every rank has joined.
    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
        timeout_s: float | None = None,
    ) -> tuple[bool, str]:
        """Join the group, waiting at most `timeout_s` (default: group_timeout_s) for the other ranks."""
        if not group_name:
            return False, "group_name must not be empty"
        if backend == "nccl" and not torch.cuda.is_available():
            return False, "backend 'nccl' needs CUDA; the CPU engine joins with backend 'gloo'"
        with self._lock:
            if group_name in self.groups:
                return False, f"group {group_name!r} already exists; destroy it first"
        try:
            pg = create_sync_group(
                master_address, int(master_port), int(rank_offset), int(world_size), group_name, backend,
                self.group_timeout_s if timeout_s is None else timeout_s,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported to the caller
            return False, f"Failed to initialize custom process group {group_name!r}: {type(e).__name__}: {e}"
        with self._lock:
            self.groups[group_name] = pg
        return True, "Succeeded to initialize custom process group."

    # The following run on the engine thread (Engine.call).
    def destroy_group(self, group_name: str = "weight_update_group") -> tuple[bool, str]:
        with self._lock:
            pg = self.groups.pop(group_name, None)
            if not self.groups:
                self._buffer = None  # no more syncs expected: give the receive buffer back
        if pg is None:
            return False, "The group to be destroyed does not exist."
        dist.destroy_process_group(pg)
        return True, "Succeeded to destroy custom process group."

    def receive_buffer(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of the kept uint8 receive buffer, grown (never shrunk) when a request needs more."""
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None  # free the old one before allocating its successor
            self._buffer = torch.empty(nbytes, dtype=torch.uint8)
        return self._buffer[:nbytes]

    @torch.no_grad()
    def update_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str = "weight_update_group",
        weight_version: str | None = None,
        load_format: str | None = None,
    ) -> tuple[bool, str]:
        with self._lock:
            pg = self.groups.get(group_name)
        if pg is None:
            return False, f"group {group_name!r} does not exist; call /init_weights_update_group first"
        if not (len(names) == len(dtypes) == len(shapes)) or not names:
            return (
                False,
                f"names, dtypes, shapes must be non-empty and equally long ({len(names)}, {len(dtypes)}, {len(shapes)})",
            )
        try:
            torch_dtypes = [parse_dtype(d) for d in dtypes]
        except ValueError as e:
            return False, f"dtypes: {e}"
        if load_format not in (None, "", "auto", FLATTENED_BUCKET_FORMAT):
            return False, f"load_format {load_format!r} is not supported (use none or {FLATTENED_BUCKET_FORMAT!r})"
        # Checked before the bytes arrive, so good requests can land in place and bad ones touch nothing.
        problems = self.engine.check_tensors(zip(names, (torch.Size(s) for s in shapes), strict=True))
        if load_format == FLATTENED_BUCKET_FORMAT:
            received, copies = self._receive_flat(pg, names, torch_dtypes, shapes, in_place=not problems)
        else:
            received, copies = self._receive_each(pg, names, torch_dtypes, shapes, in_place=not problems)
        if problems:
            return False, "Failed to update weights, nothing changed: " + "; ".join(problems[:5])
        return self._finish(received, copies, weight_version)

    def _receive_flat(
        self, pg, names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]], in_place: bool
    ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
        """One uint8 broadcast; returns (everything as received, what still has to be copied into parameters)."""
        nbytes = bucket_nbytes(dtypes, shapes)
        region = self._param_region(names, dtypes, nbytes) if in_place else None
        if region is not None:
            dist.broadcast(region, group_src=0, group=pg)
            return [(n, self.engine.params[n]) for n in names], []
        buf = self.receive_buffer(nbytes)
        dist.broadcast(buf, group_src=0, group=pg)
        views = unflatten_bucket(buf, names, dtypes, shapes)
        return views, views

    def _receive_each(
        self, pg, names: list[str], dtypes: list[torch.dtype], shapes: list[list[int]], in_place: bool
    ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
        """One broadcast per tensor, in `names` order: into the parameter when it is contiguous and of the wire
        dtype, else into the receive buffer (each slot aligned to 64 bytes) for a copy afterwards."""
        params = self.engine.params
        targets: list[torch.Tensor | None] = []
        slots, offset = [], 0
        for name, dtype in zip(names, dtypes, strict=True):
            p = params.get(name) if in_place and self.direct else None
            direct = p is not None and p.dtype == dtype and p.is_contiguous()
            targets.append(p.detach() if direct else None)
            if not direct:
                slots.append(offset)
                offset += -(-torch.Size(shapes[len(targets) - 1]).numel() * dtype.itemsize // 64) * 64
        buf = self.receive_buffer(offset) if slots else None
        received, copies, k = [], [], 0
        for name, dtype, shape, target in zip(names, dtypes, shapes, targets, strict=True):
            if target is None:
                size = torch.Size(shape).numel() * dtype.itemsize
                target = buf[slots[k] : slots[k] + size].view(dtype).view(shape)
                k += 1
                copies.append((name, target))
            dist.broadcast(target, group_src=0, group=pg)
            received.append((name, target))
        return received, copies

    def _param_region(self, names: list[str], dtypes: list[torch.dtype], nbytes: int) -> torch.Tensor | None:
        """A uint8 view over the parameters `names` if the flattened bucket's bytes are exactly their memory (back to
        back in this order, contiguous, of the wire dtypes); else None."""
        if not self.direct:
            return None
        params = [self.engine.params[n] for n in names]
        if any(p.dtype != d for p, d in zip(params, dtypes, strict=True)):
            return None
        region = byte_region(params)
        return region if region is not None and region.numel() == nbytes else None

    def update_from_tensor(
        self,
        serialized_named_tensors: list[str],
        load_format: str | None = None,
        weight_version: str | None = None,
    ) -> tuple[bool, str]:
        if load_format not in (None, SAFETENSORS_FORMAT):
            return (
                False,
                f"load_format {load_format!r}: the CPU engine takes base64 safetensors ('{SAFETENSORS_FORMAT}')",
            )
        if len(serialized_named_tensors) != 1:
            return False, f"serialized_named_tensors must hold one entry (tp=1), got {len(serialized_named_tensors)}"
        try:
            tensors = list(decode_named_tensors(serialized_named_tensors[0]).items())
        except ValueError as e:
            return False, str(e)
        problems = self.engine.check_tensors((n, t.shape) for n, t in tensors)
        if problems:
            return False, "Failed to update weights, nothing changed: " + "; ".join(problems[:5])
        return self._finish(tensors, tensors, weight_version)

    def update_from_disk(
        self, model_path: str, load_format: str | None = None, weight_version: str | None = None
    ) -> tuple[bool, str]:
        if load_format not in DISK_LOAD_FORMATS:
            return False, f"load_format {load_format!r}: the CPU engine loads safetensors files (auto or safetensors)"
        try:
            layouts = [(f, *safetensors_layout(f)) for f in checkpoint_files(model_path, self.allowed_root)]
        except Exception as e:  # noqa: BLE001 - a missing, unreadable or corrupt checkpoint is a bad request
            return False, f"Failed to get weights iterator: {e}"
        metas = [(name, shape) for _, _, entries in layouts for name, _, shape, _, _ in entries]
        if not metas:
            return False, f"Failed to update weights: no tensors in the safetensors files of {model_path}"
        problems = self.engine.check_tensors(metas)
        if problems:
            return False, "Failed to update weights, nothing changed: " + "; ".join(problems[:5])
        try:
            for path, start, entries in layouts:
                with open(path, "rb", buffering=0) as f:
                    for name, dtype, shape, begin, end in entries:
                        self._read_tensor(f, start, name, dtype, shape, begin, end)
        except (OSError, ValueError) as e:
            return False, f"Failed to update weights, some may be updated: {e}"
        finally:
            if not self.groups:
                self._buffer = None
        self.engine.load_tensors([], weight_version)
        msg = f"Succeeded to update {len(metas)} tensors from {len(layouts)} files."
        return True, msg + (f" Weight version updated to {weight_version}." if weight_version is not None else "")

    def _read_tensor(self, f, start: int, name: str, dtype: torch.dtype, shape, begin: int, end: int) -> None:
        """Straight into the parameter when it is contiguous and of the file's dtype, else via the receive buffer."""
        param = self.engine.params[name]
        if self.direct and param.dtype == dtype and param.is_contiguous():
            read_safetensors_into(f, start, begin, end, param.detach())
            self._finish([(name, param)], [], None)
            return
        target = self.receive_buffer(end - begin).view(dtype).view(shape)
        read_safetensors_into(f, start, begin, end, target)
        self._finish([(name, target)], [(name, target)], None)

    def _finish(
        self,
        received: list[tuple[str, torch.Tensor]],
        copies: list[tuple[str, torch.Tensor]],
        weight_version: str | None,
    ) -> tuple[bool, str]:
        if self.on_received is not None:
            self.on_received(received)
        self.engine.load_tensors(copies, weight_version)  # an empty list only sets the version
        msg = f"Succeeded to update {len(received)} tensors."
        if weight_version is not None:
            msg += f" Weight version updated to {weight_version}."
        return True, msg


def checkpoint_files(model_path: str, allowed_root: str = "") -> list[Path]:
    """The safetensors files SGLang would load from `model_path`; ValueError naming what is wrong with it."""
    if not isinstance(model_path, str) or not model_path:
        raise ValueError("model_path must be a non-empty string")
    real = os.path.realpath(model_path)
    if allowed_root and not _inside(real, allowed_root):
        raise ValueError(f"model_path {model_path!r} is outside the directory this engine loads from ({allowed_root})")
    if not os.path.exists(real):
        raise ValueError(f"model_path {model_path!r} does not exist")
    if not os.path.isdir(real):
        raise ValueError(f"model_path {model_path!r} is not a directory")
    root = Path(real)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{INDEX_FILE} has no weight_map")
        files = [root / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_path}")
    for f in files:
        target = os.path.realpath(f)
        if allowed_root and not _inside(target, allowed_root):
            raise ValueError(f"{f.name} leads outside the directory this engine loads from ({allowed_root})")
        if not os.path.isfile(target):
            raise ValueError(f"{f.name}: no such file in {model_path}")
    return files


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)
