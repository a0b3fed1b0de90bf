"""Trainer-side weight sync: bucketed broadcast from a source rank to SGLang-protocol engines (DESIGN contract 2).

Protocol (SGLang's; the CPU engine serves the same routes):
0. negotiate: each engine's SGLang release is read once (`EngineClient.protocol`); an unsupported one fails the
   sync naming the supported releases. Flattened buckets are sent only if every engine's release takes
   `load_format` (0.5.23), else one broadcast per tensor (0.5.5), whatever weight_sync.flatten says.
1. pause: POST /pause_generation {mode} on every engine, then /flush_cache?timeout=<s> (SGLang refuses a flush
   while requests still run; the timeout lets it wait for them, at most min(30 s, what is left of the sync); a
   release without the parameter is retried until then). Not with mode in_place: its paused requests keep their
   KV cache and SGLang refuses to flush under them, so in_place runs need SGLang's radix cache off
   (`colocated.engine_args` adds --disable-radix-cache for launched SGLang servers): otherwise new prompts after
   the update would reuse prefixes computed with the old weights.
2. group (`connect()`, once per sender, again after `reconnect()`): this process calls
   `create_sync_group(..., rank=0, world_size=1 + sum(engine_tp))` while every engine gets, concurrently,
   POST /init_weights_update_group with rank_offset = 1 + the TP sizes of the engines before it; all block until
   the group has formed. Backend: weight_sync.backend, where auto means nccl if CUDA is available, else gloo.
3. session (SGLang 0.5.23): POST /begin_weight_update on every engine, awaited before any bucket: a refusal
   (e.g. a session left open) fails the sync at once, naming the engine and its message, before any broadcast
   starts. POST /end_weight_update closes it on every engine that opened one, after the last bucket and on
   every error path too (try/finally). Releases without sessions (0.5.5) skip both.
4. per bucket: POST /update_weights_from_distributed {names, dtypes, shapes, group_name, load_format,
   flush_cache and weight_version=str(version) on the last bucket only} to every engine without awaiting, then
   broadcast from group rank 0 (one uint8 tensor per bucket when flattened, else one per tensor in names
   order) while WATCHING the HTTP answers: an engine that answers an error before the broadcast completed has
   refused the bucket and will not join it, so the broadcast is abandoned at once (the group is dropped and
   rebuilt by the next sync) and the sync fails within seconds with the engine's message, instead of blocking
   until weight_sync.timeout_s. Then every answer is awaited; success=false fails the sync naming the engine and
   its message. The next bucket is posted only after every engine answered (requests on separate connections may
   be reordered). Meanwhile a producer thread prepares the following bucket (see buckets.py).
5. resume: POST /continue_generation on every engine, then each engine must report `weight_version == str(version)`
   (GET /model_info, /get_model_info on 0.5.5); the rollout manager stamps that version on new samples.
Colocated mode (weight_sync.mode = colocated) needs no group; steps 2-3 become, by weight_sync.colocated_transport
(`transport`; auto = disk where CUDA is available, else tensor):
- tensor: one POST /update_weights_from_tensor per bucket and engine (safetensors payloads, colocated.py; CPU
  engine only), inside a weight-update session like step 4;
- disk: every bucket is written as a safetensors file into a fresh directory under weight_sync.disk_dir (disk.py;
  the producer thread moves and casts the next bucket meanwhile), then every engine gets one POST
  /update_weights_from_disk {model_path, load_format="safetensors", weight_version, flush_cache}; the directory is
  removed (on a background thread) once they answered, also when the sync fails.
Colocated engines can give their memory back while the trainer trains: `release_memory(tags)` pauses them and posts
/release_memory_occupation {tags}; `resume_memory(tags)` posts /resume_memory_occupation and leaves them paused
(the caller syncs, or calls `resume(version)`).

Memory: the sender keeps up to prefetch + 1 flattened-bucket buffers between syncs (reused; `close()` frees them);
a bucket whose tensors are already wire-ready and back to back in memory (a lone tensor, or parameters in one
flat buffer) is sent as a view, without a copy. `cfg` is read at each sync, so
bucket_mb, flatten, dtype, prefetch, checksum, colocated_transport, disk_dir and timeout_s may change between syncs (backend and master_* take
effect at the next `connect()`; the HTTP client keeps the timeout it was built with as its per-request limit).

Optional checks: with weight_sync.checksum, after the last bucket each engine's POST /weights_checksum {names,
dtype} (CPU engine extension) must equal the sha256 computed here over the sent bytes, one check per wire dtype.

Timeouts and failures: weight_sync.timeout_s bounds one `connect()` and one `sync()` (pause to verified version).
An engine that errors, dies or does not answer in time fails the call with `WeightSyncError` naming it (`.urls`).
After a failed broadcast, or an engine that gave no answer, the group is dropped (its state is unknown); the next `sync()` rebuilds it (`connect()`), which fails, naming
the engine, while that engine is down. A failed sync leaves the engines paused with possibly partly updated
weights: the caller retries the sync or restarts the engines. An engine that restarted cannot rejoin an existing
process group (its membership is fixed), so `reconnect(urls)` rebuilds the whole group, optionally with new URLs.

Several sources (pipeline parallelism): each PP stage's source rank owns a sender with `stage=s`; its group is
named `dapo_wsync_s{s}_<nonce>` on port weight_sync.master_port + s (or a free port), so engines hold one group
per stage. Stages must sync ONE AFTER ANOTHER (an engine receives on one group at a time, so concurrent stages
can deadlock): call `pause()` once, then `sync(tensors_of_stage, version, pause=False)` per stage in order, then
`resume(version)`. A single source just calls `sync(named_tensors, version)`.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import ConfigError, WeightSyncConfig
from pipeline.contracts.engine_api import EngineError
from pipeline.contracts.weight_wire import (
    FLATTENED_BUCKET_FORMAT,
    SAFETENSORS_FORMAT,
    create_sync_group,
    dtype_name,
    parse_dtype,
)
from pipeline.runtime.weight_sync.buckets import Bucket, BucketStream, BufferPool, Checksums, MiB, wire_device
from pipeline.runtime.weight_sync.colocated import colocated_encoder
from pipeline.runtime.weight_sync.disk import DiskStaging, StagedCheckpoint
from pipeline.runtime.wiring import engine_client, free_port

log = logging.getLogger(__name__)

WIRE_DTYPES = ("bfloat16", "float16", "float32")
FLUSH_WINDOW_S = 30.0  # the longest a pause waits for the engines' schedulers to become idle before flushing
_POLL_S = 0.0002  # first interval at which a running broadcast checks its completion (doubles up to 1 ms)


class WeightSyncError(RuntimeError):
    """A weight sync failed; the message names the engines involved, also listed in `.urls`."""

    def __init__(self, message: str, urls: Iterable[str] = (), unanswered: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.urls = list(urls)
        self.unanswered = list(unanswered)  # engines that gave no HTTP answer (dead, hung, too slow)


@dataclass
class SyncStats:
    seconds: float  # wall time of the whole sync (pause to verified version)
    bytes: int  # payload bytes sent once (not multiplied by the number of engines)
    buckets: int
    gbps: float  # GB/s: bytes / seconds / 1e9
    version: int = 0


class WeightSyncSender:
    def __init__(
        self,
        engine_urls: list[str],
        cfg: WeightSyncConfig,
        api_key: str = "",
        engine_tp: list[int] | None = None,
        stage: int = 0,
        model_dir: str = "",
        admin_api_key: str | None = None,
    ) -> None:
        self.urls = [u.rstrip("/") for u in engine_urls]
        if not self.urls:
            raise ValueError("WeightSyncSender: no engine URLs")
        self.engine_tp = list(engine_tp) if engine_tp is not None else [1] * len(self.urls)
        if len(self.engine_tp) != len(self.urls) or any(tp < 1 for tp in self.engine_tp):
            raise ValueError(f"engine_tp {self.engine_tp} must hold one size >= 1 per engine ({len(self.urls)})")
        if stage < 0:
            raise ValueError(f"stage must be >= 0; got {stage}")
        _check_config(cfg)
        self.cfg, self.stage, self._api_key, self._admin_api_key = cfg, stage, api_key, admin_api_key
        self.client = self._new_client()
        self.group: dist.ProcessGroup | None = None
        self.group_name = ""
        self.backend = ""
        self.master_port = 0
        self.pool = BufferPool()  # flattened-bucket buffers, reused across syncs (freed by close())
        self.zero_copy = True  # send buckets whose tensors already lie back to back as views (benchmarks: False)
        self.model_dir = model_dir  # the engines' model directory: its config files go with a staged checkpoint
        self._staging: DiskStaging | None = None
        if self.transport == "disk":
            self._disk_staging()  # checks weight_sync.disk_dir now rather than at the first sync

    def _new_client(self) -> Any:
        return engine_client(
            self.urls, api_key=self._api_key, timeout_s=self.cfg.timeout_s, max_retries=2,
            admin_api_key=self._admin_api_key,
        )  # fmt: skip

    def __repr__(self) -> str:  # never shows the API key
        return f"WeightSyncSender(urls={self.urls}, stage={self.stage}, group={self.group_name or None})"

    # ------------------------------------------------------------------ layout
    @property
    def world_size(self) -> int:
        return 1 + sum(self.engine_tp)

    @property
    def rank_offsets(self) -> list[int]:
        """Group rank of each engine's first TP rank: 1 + the TP sizes of the engines before it."""
        offsets, nxt = [], 1
        for tp in self.engine_tp:
            offsets.append(nxt)
            nxt += tp
        return offsets

    @property
    def colocated(self) -> bool:
        return self.cfg.colocated

    @property
    def transport(self) -> str:
        """distributed (a process group) | tensor | disk (colocated; see weight_sync.colocated_transport)."""
        if not self.colocated:
            return "distributed"
        if self.cfg.colocated_transport == "auto":
            return "disk" if torch.cuda.is_available() else "tensor"
        return self.cfg.colocated_transport

    def _disk_staging(self) -> DiskStaging:
        if self._staging is None or str(self._staging.root) != self.cfg.disk_dir:
            if self._staging is not None:
                self._staging.close()
            self._staging = DiskStaging(self.cfg.disk_dir, self.model_dir, self.stage)
        return self._staging

    # ------------------------------------------------------------------ group
    def connect(self) -> None:
        """Form the sync group with every engine (idempotent; colocated mode needs none)."""
        if self.colocated or self.group is not None:
            return
        cfg = self.cfg
        backend = self._wire_backend()
        port = cfg.master_port + self.stage if cfg.master_port else free_port(cfg.master_address)
        name = f"dapo_wsync_s{self.stage}_{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + cfg.timeout_s
        # A daemon thread: if an engine never joins, it stays blocked until the store times out, and must not
        # hold up the interpreter's exit.
        pg_future: cf.Future = cf.Future()
        args = (cfg.master_address, port, 0, self.world_size, name, backend, cfg.timeout_s)
        threading.Thread(target=_run_into, args=(pg_future, create_sync_group, args), daemon=True).start()
        inits = {
            url: self.client.submit(
                self.client.init_weights_update_group(
                    url, cfg.master_address, port, offset, self.world_size, name, backend
                )
            )
            for url, offset in zip(self.urls, self.rank_offsets, strict=True)
        }
        self._await(inits, deadline, f"joining sync group {name!r} ({backend}, port {port})")
        try:
            group = pg_future.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise WeightSyncError(f"sync group {name!r}: the trainer side failed to form it: {e}", self.urls) from e
        self.group, self.group_name, self.backend, self.master_port = group, name, backend, port
        log.info("weight sync group %s (%s, world %d) formed on port %d", name, backend, self.world_size, port)

    def _wire_backend(self) -> str:
        """The group's backend: the formed group's, else the configured one (auto: nccl with CUDA, else gloo)."""
        if self.group is not None:
            return self.backend
        return self.cfg.backend if self.cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")

    def reconnect(self, engine_urls: list[str] | None = None, engine_tp: list[int] | None = None) -> None:
        """Rebuild the whole group (e.g. after an engine restart), optionally with new engine URLs."""
        self.close_group()
        if engine_urls is not None:
            self.urls = [u.rstrip("/") for u in engine_urls]
            self.engine_tp = list(engine_tp) if engine_tp is not None else [1] * len(self.urls)
            self.client.close_sync()
            self.client = self._new_client()
        for url in self.urls:
            self.client.add_url(url)  # a restarted engine comes back into rotation
        self.connect()

    def close_group(self) -> None:
        """Leave the group: engines destroy theirs (best effort), then ours is destroyed."""
        group, name = self.group, self.group_name
        self.group, self.group_name = None, ""
        if group is None:
            return
        futures = {u: self.client.submit(self.client.destroy_weights_update_group(u, name)) for u in self.urls}
        for url, fut in futures.items():
            try:
                fut.result(timeout=10)
            except Exception as e:  # noqa: BLE001 - the engine may be gone; nothing to undo there
                log.debug("destroy_weights_update_group on %s: %s", url, e)
        self._destroy(group)

    def _abandon(self, reason: str) -> None:
        """Give up a broadcast in flight: abort the group where the backend can (unblocks its pending work), else
        just forget it; the next sync builds a fresh one."""
        group = self.group
        self._drop_group(reason)
        if group is not None:
            try:
                group.abort()
            except Exception as e:  # noqa: BLE001 - not every backend can abort; the group is forgotten anyway
                log.debug("abort of the abandoned sync group: %s", e)

    def _drop_group(self, reason: str) -> None:
        """After a failed or timed-out broadcast the group's state is unknown: forget it (rebuilt on next sync)."""
        if self.group is not None:
            log.warning("weight sync group %s dropped: %s", self.group_name, reason)
        self.group, self.group_name = None, ""

    @staticmethod
    def _destroy(group: dist.ProcessGroup) -> None:
        try:
            dist.destroy_process_group(group)
        except Exception as e:  # noqa: BLE001 - already torn down
            log.debug("destroy_process_group: %s", e)

    def close(self) -> None:
        self.close_group()
        self.pool.clear()
        if self._staging is not None:
            self._staging.close(final=True)
        self.client.close_sync()

    # ------------------------------------------------------------------ pause / resume
    def pause(self, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.cfg.timeout_s
        self._check_alive()
        self._call_all(self.client.pause_generation(self.cfg.pause_mode), deadline, "pause_generation")
        if self.cfg.pause_mode != "in_place":
            self._flush(deadline)

    def _flush(self, deadline: float) -> None:
        """/flush_cache on every engine, letting each wait for its scheduler to become idle: with ?timeout= where the
        release offers it, else by retrying a refused (400) flush until the window passes."""
        window = min(FLUSH_WINDOW_S, max(0.0, deadline - time.monotonic()))
        until = time.monotonic() + window
        while True:
            try:
                self._call_all(self.client.flush_cache(timeout_s=window), deadline, "flush_cache")
                return
            except WeightSyncError as e:
                refused = isinstance(e.__cause__, EngineError) and all(
                    getattr(x, "status", None) == 400 for x in (getattr(e.__cause__, "failures", None) or {}).values()
                )
                if not refused or time.monotonic() + 0.5 >= until:
                    raise
            time.sleep(0.5)

    def resume(self, version: int, deadline: float | None = None) -> None:
        """Continue generation on every engine, then check each reports `version`."""
        deadline = deadline or time.monotonic() + self.cfg.timeout_s
        self._call_all(self.client.continue_generation(), deadline, "continue_generation")
        self.verify_version(version, deadline)

    def release_memory(self, tags: list[str], deadline: float | None = None) -> None:
        """Pause every engine, then have it give back the memory of `tags` (/release_memory_occupation)."""
        deadline = deadline or time.monotonic() + self.cfg.timeout_s
        self.pause(deadline)
        self._call_all(self.client.release_memory_occupation(list(tags)), deadline, "release_memory_occupation")

    def resume_memory(self, tags: list[str], deadline: float | None = None) -> None:
        """Every engine takes the memory of `tags` back (/resume_memory_occupation); they stay paused."""
        deadline = deadline or time.monotonic() + self.cfg.timeout_s
        self._call_all(self.client.resume_memory_occupation(list(tags)), deadline, "resume_memory_occupation")

    def verify_version(self, version: int, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.cfg.timeout_s
        futures = {u: self.client.submit(self.client.get_weight_version(u)) for u in self.urls}
        got = self._await(futures, deadline, "get_weight_version")
        wrong = {u: v for u, v in got.items() if v != str(version)}
        if wrong:
            detail = "; ".join(f"{u} reports {v!r}" for u, v in wrong.items())
            raise WeightSyncError(f"weight version {version} not reported after the sync: {detail}", wrong)

    # ------------------------------------------------------------------ sync
    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, pause: bool = True) -> SyncStats:
        """Send every (HF name, tensor) to every engine as weight version `version`; blocking."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.cfg.timeout_s
        checksums = Checksums() if self.cfg.checksum else None
        # Created first, so that a failure anywhere below still drains `named_tensors` (stream.close()): on TP
        # ranks its iteration is a collective that the other ranks of the stage are running too.
        stream = self._stream(named_tensors, checksums)
        staged = self._stage(version) if self.transport == "disk" else None
        nbytes = nbuckets = 0
        opened: list[str] = []
        try:
            protocols = self.negotiate(deadline)
            if stream.flatten and not all(p.flat_buckets for p in protocols.values()):
                stream.flatten = False  # e.g. SGLang 0.5.5 would read a flat buffer as per-tensor broadcasts
            if pause:
                self.pause(deadline)
            self.connect()
            if staged is None:
                opened = self._begin_session(deadline)
            for bucket in stream:
                if staged is not None:
                    self._write_bucket(staged, bucket)
                elif self.colocated:
                    self._send_tensor_bucket(bucket, version, deadline)
                else:
                    self._send_distributed_bucket(bucket, version, deadline)
                nbytes += bucket.nbytes
                nbuckets += 1
                stream.release(bucket)
            if nbuckets == 0:
                raise ValueError("weight sync: no tensors to send")
            if staged is not None:
                self._load_from_disk(staged, version, deadline)
        except BaseException:
            self._end_session(opened, deadline, failing=True)
            raise
        else:
            self._end_session(opened, deadline, failing=False)
        finally:
            stream.close()
            if staged is not None:
                staged.remove_later()  # off the critical path; the next sync and close() wait for it
        if checksums is not None:
            self.verify_checksums(checksums, deadline)
        if pause:
            self.resume(version, deadline)
        else:
            self.verify_version(version, deadline)
        seconds = time.perf_counter() - t0
        return SyncStats(seconds, nbytes, nbuckets, nbytes / seconds / 1e9, version)

    def negotiate(self, deadline: float | None = None) -> dict:
        """Every engine's protocol (`engines.sglang.protocol.Protocol`), read once per engine by the client."""
        deadline = deadline or time.monotonic() + self.cfg.timeout_s
        futures = {u: self.client.submit(self.client.protocol(u)) for u in self.urls}
        return self._await(futures, deadline, "reading the engines' SGLang version")

    def _begin_session(self, deadline: float) -> list[str]:
        """Open the weight-update session on every engine; returns those that opened one. A refusal anywhere closes
        the ones that opened and fails before any bucket is sent."""
        futures = {u: self.client.submit(self.client.begin_weight_update(u)) for u in self.urls}
        try:
            self._await(futures, deadline, "begin_weight_update")
        except WeightSyncError as e:
            # Close where a session may be open: opened, or no answer (the begin may still land). Not where the
            # engine refused: a session open there is not ours (e.g. another stage's sender running concurrently).
            maybe = [u for u, f in futures.items() if f.cancelled() or not f.done() or f.exception() is None]
            self._end_session(sorted(set(maybe) | set(e.unanswered)), deadline, failing=True)
            raise
        return list(self.urls)

    def _end_session(self, urls: list[str], deadline: float, failing: bool) -> None:
        """Close the session on `urls`. While another error propagates (`failing`) a failure here is only logged."""
        if not urls:
            return
        futures = {u: self.client.submit(self.client.end_weight_update(u)) for u in urls}
        # Even after the sync's deadline: an engine left with an open session refuses the next sync's begin.
        grace = max(deadline, time.monotonic() + 10.0) if failing else deadline
        try:
            self._await(futures, grace, "end_weight_update")
        except WeightSyncError as e:
            if not failing:
                raise
            log.warning("after a failed weight sync: %s", e)

    def _stream(self, named: Iterable[tuple[str, torch.Tensor]], checksums: Checksums | None) -> BucketStream:
        cfg = self.cfg
        dtype = parse_dtype(cfg.dtype) if cfg.dtype else None
        bucket_bytes = max(1, int(cfg.bucket_mb * MiB))
        if self.transport == "disk":  # the producer moves and casts the next bucket while this one is written
            return BucketStream(named, bucket_bytes, torch.device("cpu"), dtype, False, cfg.prefetch, checksums)
        if not self.colocated:
            device = wire_device(self._wire_backend())
            self.pool.resize(cfg.prefetch + 1)
            return BucketStream(
                named, bucket_bytes, device, dtype, cfg.flatten, cfg.prefetch, checksums, pool=self.pool,
                zero_copy=self.zero_copy,
            )  # fmt: skip
        # Colocated: tensors stay where they are; CUDA ones travel as SGLang IPC handles, CPU ones as safetensors.
        encode = colocated_encoder(self.engine_tp)
        return BucketStream(named, bucket_bytes, None, dtype, False, cfg.prefetch, checksums, encode=encode, align=True)

    def _update_kwargs(self, bucket: Bucket, version: int) -> dict:
        flush = bucket.last and self.cfg.pause_mode != "in_place"
        return {"flush_cache": flush, "weight_version": str(version) if bucket.last else None}

    def _send_distributed_bucket(self, bucket: Bucket, version: int, deadline: float) -> None:
        load_format = FLATTENED_BUCKET_FORMAT if bucket.flat is not None else None
        names, dtypes, shapes = bucket.names, [dtype_name(d) for d in bucket.dtypes], bucket.shapes
        kwargs = self._update_kwargs(bucket, version)
        futures = {
            url: self.client.submit(
                self.client.update_weights_from_distributed(
                    url, names, dtypes, shapes, self.group_name, load_format=load_format, **kwargs
                )
            )
            for url in self.urls
        }
        what = f"bucket {bucket.index} ({len(names)} tensors, {bucket.nbytes / MiB:.1f} MiB) of version {version}"
        try:
            self._broadcast(bucket, deadline, futures)
        except _Refused as e:
            self._abandon(str(e))
            self._await(futures, time.monotonic() + 2.0, what, cause="the broadcast was abandoned")
            raise AssertionError("unreachable: a refusal is an answered error") from e
        except Exception as e:  # noqa: BLE001 - name the engines that failed, if they told us
            self._drop_group(str(e))
            grace = min(5.0, max(0.0, deadline - time.monotonic()))
            self._await(futures, time.monotonic() + grace, what, cause=f"broadcast failed ({e})")
            raise WeightSyncError(
                f"{what}: broadcast failed ({e}); engines that did not finish: {', '.join(self.urls)}", self.urls
            ) from e
        try:
            self._await(futures, deadline, what)
        except WeightSyncError as e:
            if e.unanswered:  # an engine may still be inside the collective: the group's state is unknown
                self._drop_group(str(e))
            raise

    def _broadcast(self, bucket: Bucket, deadline: float, answers: dict[str, cf.Future] | None = None) -> None:
        """Broadcast the bucket; while it runs, an error answer in `answers` (an engine refused the bucket, so it
        will not join) raises `_Refused` at once instead of waiting for the collective's timeout."""
        tensors = [bucket.flat] if bucket.flat is not None else bucket.tensors
        if bucket.ready is not None:  # CUDA: the producer's side stream finished this bucket
            torch.cuda.current_stream().wait_event(bucket.ready)
        works = [dist.broadcast(t, group_src=0, group=self.group, async_op=True) for t in tensors]
        answered = threading.Event()  # an HTTP answer wakes the wait at once
        for fut in (answers or {}).values():
            fut.add_done_callback(lambda _f: answered.set())
        poll = _POLL_S
        # is_completed() is the non-blocking test on both backends (on NCCL it queries the CUDA events; the work's
        # future would report completion at enqueue time); polled at <= 1 ms, so it adds at most that per bucket.
        while not all(w.is_completed() for w in works):
            refused = _refusals(answers or {})
            if refused:
                raise _Refused("; ".join(f"{u}: {_message(e, u)}" for u, e in refused.items()))
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no broadcast progress within weight_sync.timeout_s={self.cfg.timeout_s}s")
            if answered.wait(poll):
                answered.clear()  # checked at the top of the next round; a success answer must not make this spin
            poll = min(poll * 2, 0.001)
        for work in works:  # completed: re-raises a failed collective's error
            work.wait(timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())))
        if tensors[0].is_cuda:
            # The bucket is freed after this returns; NCCL must be done reading it.
            torch.cuda.current_stream().synchronize()

    def _send_tensor_bucket(self, bucket: Bucket, version: int, deadline: float) -> None:
        assert bucket.payload is not None
        kwargs = self._update_kwargs(bucket, version)
        futures = {
            url: self.client.submit(
                self.client.update_weights_from_tensor(url, payload, load_format=bucket.load_format, **kwargs)
            )
            for url, payload in zip(self.urls, bucket.payload, strict=True)
        }
        what = (
            f"bucket {bucket.index} ({len(bucket.names)} tensors, {bucket.nbytes / MiB:.1f} MiB) of version {version}"
        )
        self._await(futures, deadline, what)

    def _stage(self, version: int) -> StagedCheckpoint:
        try:
            return self._disk_staging().open(version)
        except OSError as e:
            raise WeightSyncError(str(e)) from e

    @staticmethod
    def _write_bucket(staged: StagedCheckpoint, bucket: Bucket) -> None:
        try:
            staged.write(bucket.names, bucket.tensors)
        except OSError as e:
            raise WeightSyncError(f"bucket {bucket.index} of {staged.path}: {e}") from e

    def _load_from_disk(self, staged: StagedCheckpoint, version: int, deadline: float) -> None:
        staged.finish()
        flush = self.cfg.pause_mode != "in_place"
        futures = {
            url: self.client.submit(
                self.client.update_weights_from_disk(
                    url, str(staged.path), SAFETENSORS_FORMAT, weight_version=str(version), flush_cache=flush
                )
            )
            for url in self.urls
        }
        what = f"loading {staged.path} ({staged.files} files, {staged.nbytes / MiB:.1f} MiB) as version {version}"
        self._await(futures, deadline, what)

    # ------------------------------------------------------------------ checks
    def verify_checksums(self, checksums: Checksums, deadline: float | None = None) -> None:
        deadline = deadline or time.monotonic() + self.cfg.timeout_s
        for dtype, expected in checksums.hexdigests().items():
            names = checksums.names[dtype]
            futures = {u: self.client.submit(self.client.weights_checksum(u, names, dtype)) for u in self.urls}
            got = self._await(futures, deadline, f"weights_checksum ({dtype_name(dtype)})")
            bad = [u for u, c in got.items() if c != expected]
            if bad:
                raise WeightSyncError(
                    f"checksum mismatch on {', '.join(bad)} over {len(names)} {dtype_name(dtype)} tensors "
                    f"(expected {expected[:16]}..; an engine storing a lower precision than sent also differs: "
                    "set weight_sync.dtype to the engine's dtype)",
                    bad,
                )

    def _check_alive(self) -> None:
        dead = [u for u in self.urls if u not in self.client.alive_urls]
        if dead:
            raise WeightSyncError(f"engines marked dead by an earlier failure: {', '.join(dead)}", dead)

    # ------------------------------------------------------------------ helpers
    def _call_all(self, coro, deadline: float, what: str) -> None:
        try:
            self.client.run_sync(coro, timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise WeightSyncError(
                f"{what}: engines did not answer within {self.cfg.timeout_s}s: {', '.join(self.urls)}", self.urls
            ) from None
        except EngineError as e:
            failures = getattr(e, "failures", None) or {e.url or "?": e}
            unanswered = [u for u, x in failures.items() if getattr(x, "status", None) is None]
            raise WeightSyncError(f"{what}: {e}", failures, unanswered) from e

    def _await(self, futures: dict[str, cf.Future], deadline: float, what: str, cause: str = "") -> dict:
        """Every future's result by URL; else WeightSyncError naming the engines that failed or did not finish.

        One failure usually stalls the others (they wait in a collective that will not complete), so after the
        first failure the rest get a short grace period, not the whole timeout."""
        remaining = max(0.0, deadline - time.monotonic())
        done, waiting = cf.wait(futures.values(), timeout=remaining, return_when=cf.FIRST_EXCEPTION)
        if waiting and any(f.exception() for f in done):
            cf.wait(waiting, timeout=min(2.0, max(0.0, deadline - time.monotonic())))
        failed = {u: f.exception() for u, f in futures.items() if f.done() and f.exception() is not None}
        pending = [u for u, f in futures.items() if not f.done()]
        if not failed and not pending:
            return {u: f.result() for u, f in futures.items()}
        parts = [f"{u}: {_message(e, u)}" for u, e in failed.items()]
        if pending:
            state = "still busy" if failed else f"no answer within weight_sync.timeout_s={self.cfg.timeout_s}s"
            parts.append(f"{state}: {', '.join(pending)}")
        if cause:
            parts.append(cause)
        unanswered = pending + [u for u, e in failed.items() if getattr(e, "status", None) is None]
        for url in pending:
            futures[url].cancel()  # drop the request on our side; the engine finds out through its group timeout
            futures[url].add_done_callback(_consume)  # a late failure is already reported: keep it out of the logs
        raise WeightSyncError(f"{what} failed: " + "; ".join(parts), failed or pending, unanswered)


class _Refused(RuntimeError):
    """An engine answered an error while the broadcast of its bucket was running."""


def _refusals(answers: dict[str, cf.Future]) -> dict[str, BaseException]:
    return {u: f.exception() for u, f in answers.items() if f.done() and not f.cancelled() and f.exception()}


def _consume(future: cf.Future) -> None:
    if not future.cancelled():
        future.exception()


def _run_into(future: cf.Future, fn, args: tuple) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - handed to the waiter
        future.set_exception(e)


def _message(exc: BaseException, url: str) -> str:
    text = str(exc)
    return text if url in text else f"{type(exc).__name__}: {text}"


def _check_config(cfg: WeightSyncConfig) -> None:
    if cfg.dtype and cfg.dtype not in WIRE_DTYPES:
        raise ConfigError(f"weight_sync.dtype: must be empty or one of {', '.join(WIRE_DTYPES)}; got {cfg.dtype!r}")
    if cfg.bucket_mb <= 0:
        raise ConfigError(f"weight_sync.bucket_mb: must be > 0; got {cfg.bucket_mb}")
    if cfg.prefetch < 0:
        raise ConfigError(f"weight_sync.prefetch: must be >= 0; got {cfg.prefetch}")
    if cfg.mode not in ("disaggregated", "colocated"):
        raise ConfigError(f"weight_sync.mode: must be disaggregated or colocated; got {cfg.mode!r}")
    if cfg.colocated_transport not in ("auto", "tensor", "disk"):
        raise ConfigError(
            f"weight_sync.colocated_transport: must be auto, tensor or disk; got {cfg.colocated_transport!r}"
        )
