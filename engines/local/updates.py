"""Weight updates of the CPU engine: SGLang's /init_weights_update_group, /update_weights_from_distributed,
/update_weights_from_tensor and /destroy_weights_update_group, as blocking functions returning (success, message).

Contract (what a trainer-side sender must do, identical to driving SGLang):
1. POST /init_weights_update_group {master_address, master_port, rank_offset, world_size, group_name, backend}
   while the sender itself calls `create_sync_group(..., rank=0, ...)`; the engine joins as rank `rank_offset`.
2. For each bucket: POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache,
   weight_version, load_format} and, concurrently, broadcast from group rank 0: one tensor per name in `names`
   order (default), or one uint8 tensor holding all of them back to back (`load_format="flattened_bucket"`).
   The engine receives everything first (so the collective never hangs), then checks names and shapes against
   the model's HF parameter names (tied lm_head/embedding: either name works) and only then copies, so a bad
   request changes nothing and answers success=false naming the tensor. `weight_version` is set after a
   successful copy; send it with the last bucket.
3. POST /destroy_weights_update_group {group_name} when done with the group (optional).
Receiving and copying run on the engine thread between decode steps (the engine is normally paused then).
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from engines.local.dist import (
    FLATTENED_BUCKET_FORMAT,
    SAFETENSORS_FORMAT,
    bucket_nbytes,
    create_sync_group,
    decode_named_tensors,
    parse_dtype,
    unflatten_bucket,
)
from engines.local.engine import Engine


class WeightReceiver:
    def __init__(self, engine: Engine, group_timeout_s: float = 600.0) -> None:
        self.engine = engine
        self.group_timeout_s = group_timeout_s
        self.groups: dict[str, dist.ProcessGroup] = {}
        self._lock = threading.Lock()

    # Runs on a worker thread: it blocks until every rank has joined.
    def init_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> tuple[bool, str]:
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
                self.group_timeout_s,
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
        if pg is None:
            return False, "The group to be destroyed does not exist."
        dist.destroy_process_group(pg)
        return True, "Succeeded to destroy custom process group."

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
        if load_format == FLATTENED_BUCKET_FORMAT:
            buf = torch.empty(bucket_nbytes(torch_dtypes, shapes), dtype=torch.uint8)
            dist.broadcast(buf, group_src=0, group=pg)
            received = unflatten_bucket(buf, names, torch_dtypes, shapes)
        elif load_format in (None, "", "auto"):
            received = []
            for name, dtype, shape in zip(names, torch_dtypes, shapes, strict=True):
                t = torch.empty(shape, dtype=dtype)
                dist.broadcast(t, group_src=0, group=pg)
                received.append((name, t))
        else:
            return False, f"load_format {load_format!r} is not supported (use none or {FLATTENED_BUCKET_FORMAT!r})"
        return self._apply(received, weight_version)

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
            tensors = decode_named_tensors(serialized_named_tensors[0])
        except ValueError as e:
            return False, str(e)
        return self._apply(list(tensors.items()), weight_version)

    def _apply(self, received: list[tuple[str, torch.Tensor]], weight_version: str | None) -> tuple[bool, str]:
        problems = self.engine.check_tensors((n, t.shape) for n, t in received)
        if problems:
            return False, "Failed to update weights, nothing changed: " + "; ".join(problems[:5])
        self.engine.load_tensors(received, weight_version)
        msg = f"Succeeded to update {len(received)} tensors."
        if weight_version is not None:
            msg += f" Weight version updated to {weight_version}."
        return True, msg
