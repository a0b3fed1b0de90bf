"""Bucketing and preparation of the tensors a weight sync sends, pipelined with the wire.

Contract:
- `plan_buckets(named, bucket_bytes, dtype, align)` groups CONSECUTIVE (name, tensor) pairs, in the given order,
  into buckets of at most `bucket_bytes` bytes counted in the dtype they will be sent in; a tensor larger than a
  bucket goes alone. With `align` (flattened buckets) a bucket also closes where the next tensor would start at a
  byte offset that is not a multiple of its element size (a receiver views the uint8 buffer as that dtype, which
  needs the alignment). It pulls one tensor ahead of the bucket it yields, so each `BucketPlan.last` is exact.
- `prepare_bucket` moves each tensor to the wire device (None: where the bucket's first tensor is), casts floating tensors to `dtype`, makes them
  contiguous and, with `flatten`, writes them into ONE uint8 buffer back to back (SGLang's FlattenedTensorBucket
  layout: the raw bytes of each tensor in names order, no padding), in a single copy per tensor. A bucket whose
  tensors already ARE that layout (each contiguous, on the device, in the wire dtype, back to back in one storage
  in order: a lone tensor, or parameters kept in one flat buffer) is sent as a uint8 view of their memory, without
  a copy (`zero_copy`, on by default).
- `BucketStream` yields prepared buckets in order. With `prefetch` > 0 a producer thread walks the source
  iterator (which may run collectives, e.g. a TP gather) and prepares up to `prefetch` buckets ahead of the one
  the consumer holds; the consumer hands each bucket back with `release()`, so at most prefetch + 1 prepared
  buckets are alive. Errors in the source or the preparation are re-raised in the consumer. `close()` stops the
  producer, which then drains the source without preparing (so peers of a collective in the source never hang).
- `BufferPool` keeps the flattened buckets' buffers for reuse, within a sync and across syncs (at most prefetch + 1
  buffers of the largest bucket): fresh CPU memory costs a page fault per 4 KiB on first touch, which on the
  benchmark VM made filling a fresh buffer ~6x slower than refilling a used one.
- `Checksums` hashes the prepared tensors per dtype exactly like the CPU engine's `/weights_checksum`
  (sha256 over name, NUL, raw bytes, in order).
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from pipeline.contracts.weight_wire import byte_region

MiB = 1 << 20


@dataclass
class BucketPlan:
    """Which tensors go together (raw, as the source yielded them) and whether this is the final bucket."""

    index: int
    items: list[tuple[str, torch.Tensor]]
    nbytes: int  # in the dtype they will be sent in
    last: bool


@dataclass
class Bucket:
    """A prepared bucket: what goes on the wire, and the metadata the engines need to receive it."""

    index: int
    names: list[str]
    tensors: list[torch.Tensor]  # prepared (device, dtype, contiguous); views into `flat` when flattened
    nbytes: int
    last: bool
    flat: torch.Tensor | None = None  # uint8, all tensors back to back
    base: torch.Tensor | None = field(default=None, repr=False)  # the pooled buffer `flat` is a prefix of
    payload: list[list[str]] | None = None  # colocated mode: per engine, its serialized_named_tensors entries
    load_format: str | None = None  # colocated mode: how the engines decode `payload`
    ready: torch.cuda.Event | None = field(default=None, repr=False)  # CUDA: set when preparation finished

    @property
    def dtypes(self) -> list[torch.dtype]:
        return [t.dtype for t in self.tensors]

    @property
    def shapes(self) -> list[list[int]]:
        return [list(t.shape) for t in self.tensors]


def wire_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is sent in: floating tensors take `dtype` when given; integer/bool tensors never change."""
    if dtype is not None and tensor.is_floating_point():
        return dtype
    return tensor.dtype


def plan_buckets(
    named: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
    align: bool = True,
) -> Iterator[BucketPlan]:
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0; got {bucket_bytes}")
    items: list[tuple[str, torch.Tensor]] = []
    size, index = 0, 0
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight sync: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        wd = wire_dtype(tensor, dtype)
        nbytes = tensor.numel() * wd.itemsize
        fits = size + nbytes <= bucket_bytes and not (align and size % wd.itemsize)
        if items and not fits:
            yield BucketPlan(index, items, size, last=False)
            items, size, index = [], 0, index + 1
        items.append((name, tensor))
        size += nbytes
    if items:
        yield BucketPlan(index, items, size, last=True)


def wire_device(backend: str) -> torch.device:
    """Where tensors must be for the group's backend: the current CUDA device for nccl, else the CPU."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class BufferPool:
    """Keeps up to `size` uint8 buffers for reuse: a request takes the smallest free one that is large enough (else
    a fresh one of exactly its size); when more than `size` are free, the smallest is dropped. So it holds at most
    `size` x the largest bucket, and a steady stream of same-sized buckets never allocates after the first ones."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = size
            self._free.sort(key=torch.Tensor.numel)
            del self._free[: max(0, len(self._free) - size)]

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.device == device and b.numel() >= nbytes]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)
            if len(self._free) > self.size:  # (list.remove would compare tensors by value)
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


@torch.no_grad()
def prepare_bucket(
    plan: BucketPlan,
    device: torch.device | None,
    dtype: torch.dtype | None = None,
    flatten: bool = True,
    pool: BufferPool | None = None,
    zero_copy: bool = True,
) -> Bucket:
    names = [n for n, _ in plan.items]
    device = device or plan.items[0][1].device
    if not flatten:
        tensors = [t.detach().to(device=device, dtype=wire_dtype(t, dtype)).contiguous() for _, t in plan.items]
        return Bucket(plan.index, names, tensors, plan.nbytes, plan.last)
    if zero_copy:
        tensors = [t.detach() for _, t in plan.items]
        ready = all(t.dtype == wire_dtype(t, dtype) and t.device == device for t in tensors)
        region = byte_region(tensors) if ready else None
        if region is not None:
            return Bucket(plan.index, names, tensors, plan.nbytes, plan.last, flat=region)
    base = (
        pool.take(plan.nbytes, device)
        if pool is not None
        else torch.empty(plan.nbytes, dtype=torch.uint8, device=device)
    )
    flat = base[: plan.nbytes]
    tensors, offset = [], 0
    for _, t in plan.items:
        wd = wire_dtype(t, dtype)
        n = t.numel() * wd.itemsize
        view = flat[offset : offset + n].view(wd).view(t.shape)
        view.copy_(t.detach())  # move + cast + flatten in one copy
        tensors.append(view)
        offset += n
    return Bucket(plan.index, names, tensors, plan.nbytes, plan.last, flat=flat, base=base)


class Checksums:
    """sha256 per wire dtype over (name, NUL, raw bytes), in send order: the CPU engine's `weights_checksum`."""

    def __init__(self) -> None:
        self.names: dict[torch.dtype, list[str]] = {}
        self._hash: dict[torch.dtype, hashlib._Hash] = {}

    def update(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        for name, t in zip(names, tensors, strict=True):
            h = self._hash.setdefault(t.dtype, hashlib.sha256())
            self.names.setdefault(t.dtype, []).append(name)
            h.update(name.encode())
            h.update(b"\0")
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def hexdigests(self) -> dict[torch.dtype, str]:
        return {d: h.hexdigest() for d, h in self._hash.items()}


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


class BucketStream:
    """Prepared buckets in order; a producer thread keeps up to `prefetch` of them ready ahead of the consumer."""

    def __init__(
        self,
        named: Iterable[tuple[str, torch.Tensor]],
        bucket_bytes: int,
        device: torch.device | None,
        dtype: torch.dtype | None = None,
        flatten: bool = True,
        prefetch: int = 1,
        checksums: Checksums | None = None,
        encode: Callable[[Bucket], list[list[str]]] | None = None,
        align: bool | None = None,
        pool: BufferPool | None = None,
        zero_copy: bool = True,
    ) -> None:
        self._plans = plan_buckets(named, bucket_bytes, dtype, align=flatten if align is None else align)
        self.device, self.dtype, self.flatten = device, dtype, flatten
        self.prefetch = max(0, int(prefetch))
        self.checksums = checksums
        self.encode = encode
        self.pool = pool
        self.zero_copy = zero_copy
        self._stop = threading.Event()
        self._slots = threading.Semaphore(self.prefetch + 1)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ preparation (producer side)
    def _prepare(self, plan: BucketPlan) -> Bucket:
        if (self.device or plan.items[0][1].device).type == "cuda":
            return self._prepare_cuda(plan)
        bucket = prepare_bucket(plan, self.device, self.dtype, self.flatten, self.pool, self.zero_copy)
        return self._finish(bucket)

    def _prepare_cuda(self, plan: BucketPlan) -> Bucket:
        # A side stream, so the copies overlap the NCCL broadcast of the previous bucket; it first waits for the
        # trainer's pending work on the current stream. The consumer waits on `ready` before broadcasting.
        device = self.device or plan.items[0][1].device
        side = getattr(self, "_side", None) or torch.cuda.Stream(device)
        self._side = side
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            bucket = prepare_bucket(plan, self.device, self.dtype, self.flatten, self.pool, self.zero_copy)
            bucket = self._finish(bucket)
            bucket.ready = torch.cuda.Event()
            bucket.ready.record(side)
        return bucket

    def _finish(self, bucket: Bucket) -> Bucket:
        if self.checksums is not None:
            self.checksums.update(bucket.names, bucket.tensors)
        if self.encode is not None:
            bucket.payload = self.encode(bucket)
        return bucket

    def _produce(self, cuda_device: int | None) -> None:
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)  # the current device is per thread
        try:
            for plan in self._plans:
                self._slots.acquire()
                if self._stop.is_set():
                    break
                self._queue.put(self._prepare(plan))
                del plan
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put(_Failure(e))
            return
        if self._stop.is_set():
            self._drain()
        self._queue.put(_DONE)

    def _drain(self) -> None:
        try:
            for _ in self._plans:
                pass
        except Exception:  # noqa: BLE001 - the sync already failed; this only keeps collective peers moving
            pass

    # ------------------------------------------------------------------ consumer side
    def __iter__(self) -> Iterator[Bucket]:
        if self.prefetch == 0:
            for plan in self._plans:
                yield self._prepare(plan)
            return
        on_cuda = self.device.type == "cuda" if self.device is not None else torch.cuda.is_available()
        cuda_device = torch.cuda.current_device() if on_cuda else None
        self._thread = threading.Thread(
            target=self._produce, args=(cuda_device,), name="weight-sync-prepare", daemon=True
        )
        self._thread.start()
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def release(self, bucket: Bucket) -> None:
        """The consumer is done with `bucket` (its broadcast finished): the producer may prepare another."""
        bucket.tensors.clear()
        if bucket.base is not None and self.pool is not None:
            self.pool.give(bucket.base)
        bucket.flat = bucket.base = None
        bucket.payload = None
        self._slots.release()

    def close(self) -> None:
        """Stop the producer (it drains the source without preparing) and drop queued buckets."""
        self._stop.set()
        self._slots.release()
        if self._thread is None:  # no producer: drain here, on a thread (a dead collective peer must not block us)
            threading.Thread(target=self._drain, name="weight-sync-drain", daemon=True).start()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
