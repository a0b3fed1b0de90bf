"""Measured peak memory of a trainer step on CPU, to calibrate memory.py (tests/test_plan_calibration.py).

Contract:
- `cpu_peak_bytes(fn)`: runs fn() under torch.profiler with profile_memory and returns the peak, over the call, of
  the bytes the CPU allocator has handed out since the call began (the profiler's "[memory]" events carry the
  running total), i.e. the transient peak of fn. Deterministic, unlike the process RSS.
- `state_bytes(backend)`: bytes of the tensors that persist across steps (parameters, Megatron's gradient buffers,
  optimizer state), by walking them.
- `measure_step(backend, micro_batches, loss_fn)` -> state bytes + transient peak of one train_minibatch (after a
  warm-up step that creates the optimizer state): what `trainer_peak_memory(...)["allocated"]` predicts.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch


def random_micro_batch(rows: int, T: int, vocab: int, response_from: int) -> Any:
    """A seeded (rows, T) micro-batch of random tokens whose loss positions start at `response_from`: the load
    both the CPU calibration and the GPU check measure a step on."""
    from pipeline.contracts.backend import MicroBatch

    g = torch.Generator().manual_seed(0)
    loss_mask = torch.zeros(rows, T)
    loss_mask[:, response_from:] = 1
    return MicroBatch(
        input_ids=torch.randint(2, vocab, (rows, T), generator=g),
        attention_mask=torch.ones(rows, T, dtype=torch.long),
        position_ids=torch.arange(T).expand(rows, T).contiguous(),
        loss_mask=loss_mask,
        old_logprobs=torch.full((rows, T), -5.0),
        advantages=torch.randn(rows, 1, generator=g).expand(rows, T).contiguous(),
        global_tokens=float(loss_mask.sum()),
        global_seqs=float(rows),
        max_new_tokens=T,
    )


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not mem:
        return 0
    # "Total Allocated" counts from the start of profiling; the first event's total already includes its own bytes.
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return int(max(e["args"]["Total Allocated"] for e in mem) - start)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def state_bytes(backend: Any) -> int:
    """Parameters, persistent gradient buffers and optimizer state, each storage counted once."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            local = t._local_tensor if hasattr(t, "_local_tensor") else t
            seen[local.untyped_storage().data_ptr()] = _tensor_bytes(local)

    modules = getattr(backend, "chunks", None) or [backend.model]
    compute = getattr(backend, "compute", None)  # FSDP on one rank in bf16: a compute copy of the fp32 master
    if isinstance(compute, torch.nn.Module) and compute is not backend.model:
        modules = [*modules, compute]
    for mod in modules:
        for p in mod.parameters():
            add(p)
            add(getattr(p, "main_grad", None))
        for buf in torch.nn.Module.buffers(mod):
            add(buf)
        for gb in getattr(mod, "buffers", []) if isinstance(getattr(mod, "buffers", None), list) else []:
            add(getattr(gb, "grad_data", None))  # Megatron DDP's contiguous fp32 gradient buffer
            add(getattr(gb, "param_data", None))
    opt = backend.optimizer
    for o in getattr(opt, "chained_optimizers", [opt]):
        inner = getattr(o, "optimizer", o)
        for st in inner.state.values():
            for v in st.values():
                add(v)
        for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):  # Megatron's fp32 masters
            for group in getattr(o, attr, []) or []:
                for t in group:
                    add(t)
    return sum(seen.values())


def measure_step(backend: Any, micro_batches: list, loss_fn: Any) -> dict[str, int]:
    """{"state": bytes, "transient": bytes, "allocated": state + transient} of one train_minibatch."""
    backend.train_minibatch(micro_batches, loss_fn)  # creates the optimizer state
    transient = cpu_peak_bytes(lambda: backend.train_minibatch(micro_batches, loss_fn))
    state = state_bytes(backend)
    return {"state": state, "transient": transient, "allocated": state + transient}
