"""The one scoped CUDA -> CPU compatibility layer that lets megatron-core 0.16 train on CPU (gloo) in CI.

Contract:
- `enable_cpu_compat()` is a no-op when `torch.cuda.is_available()`; on a GPU machine nothing is patched.
- Otherwise it makes megatron-core's hard-coded CUDA calls land on the CPU:
  * a `TorchFunctionMode` rewrites `device="cuda"` / `device=<int>` / `torch.device("cuda", i)` arguments of
    tensor factories and of `Tensor.to` to the CPU, turns `Tensor.cuda()` into a no-op and makes `Tensor.type()`
    (no argument) report `torch.cuda.*Tensor`, because megatron's optimizer and gradient clipping classify and
    assert parameters by that string;
  * `torch.cuda.{current_device, synchronize, device_count, current_stream, default_stream, Stream, stream, Event,
    empty_cache, memory_allocated, max_memory_allocated}` become CPU stubs;
  * the "cuda" RNG is the CPU generator: `torch.cuda.{get_rng_state, set_rng_state, manual_seed}`
    and megatron's `tensor_parallel.random._{get,set}_cuda_rng_state`, so megatron's RNG tracker
    (`model_parallel_cuda_manual_seed`, `get_cuda_rng_tracker().fork()`) forks and restores the CPU generator;
  * the MoE alltoall token dispatcher's device-to-host copy of its split sizes (`maybe_move_tensor_to_cpu`, as bound
    in `token_dispatcher`) returns numpy arrays for CPU tensors too, as it does for GPU tensors: gloo's
    `all_to_all_single` takes them, and EP > 1 runs on gloo.
- Idempotent: the process-wide patches are applied once; the function mode is pushed once per thread (torch keeps
  the function-mode stack per thread), so call it at the top of every entry point that may run on a new thread.
- Nothing else in the repository patches CUDA. Only the megatron backend and its tests call this.
- `cpu_compat_enabled()` says whether the patches are active in this process.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_patched = False
_patch_lock = threading.Lock()
_thread = threading.local()


def _is_gpu_device(d: Any) -> bool:
    """A device argument that means a GPU: 'cuda', 'cuda:1', torch.device('cuda'), or a bare ordinal."""
    if isinstance(d, bool):
        return False
    if isinstance(d, int):
        return True
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites GPU device arguments to the CPU; see the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _is_gpu_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) and len(args) > 1:
            # Tensor.to(device, ...) with the device given positionally (Tensor.to(0) is a device ordinal).
            if func is torch.Tensor.to and _is_gpu_device(args[1]):
                args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _Stream:
    """A CPU stand-in for torch.cuda.Stream: every operation is synchronous already."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any) -> _Event:
        return _Event()

    def query(self) -> bool:
        return True


class _Event:
    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: _Event) -> float:
        return 0.0


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_process() -> None:
    """Process-wide patches of torch.cuda and megatron's RNG helpers (once)."""
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.device_count = lambda: 1
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed  # not manual_seed_all: torch.manual_seed itself calls that one
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state

    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _cpu_move_to_host


def _cpu_move_to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """megatron's `maybe_move_tensor_to_cpu` for tensors that already live on the CPU: its GPU path returns the
    MoE dispatcher's all-to-all split sizes as numpy arrays, which torch.distributed takes as a list of ints; the
    original leaves a CPU tensor as is, which `all_to_all_single` rejects."""
    if as_numpy and isinstance(tensor, torch.Tensor):
        return tensor.numpy()
    return tensor


def cpu_compat_enabled() -> bool:
    return _patched


def enable_cpu_compat() -> None:
    """Apply the CPU compatibility layer (no-op with CUDA; idempotent). See the module docstring."""
    global _patched
    if torch.cuda.is_available():
        return
    with _patch_lock:
        if not _patched:
            _patch_process()
            _patched = True
    if not getattr(_thread, "mode", None):
        mode = _CudaToCpuMode()
        mode.__enter__()  # stays on this thread's function-mode stack for the life of the thread
        _thread.mode = mode
