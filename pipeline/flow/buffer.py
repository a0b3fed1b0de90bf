"""RolloutBuffer: finished groups from the transport -> exact batches within the staleness bound.

Contract:
- `make_buffer(layout, receiver)` is the one way the loop and the simulator build it: batch size, staleness bound,
  sync period and capacity all come from the run's `pipeline.config.Layout`.
- A background thread pulls frames from a `GroupReceiver`, counts each group by the dynamic-sampling decision the
  manager made and sent in the frame header (`drop_reason`: the filter is decided once, in the rollout; a header
  without payload and without a reason counts as `no_payload`) and keeps the kept groups with their payload still
  encoded (the received frame, zero-copy; decoded only when handed out). Waiters are woken once per burst of
  frames (`wait_received` only when its target is reached). It stops pulling while `capacity` kept groups are
  held, so ZMQ's high-water marks push back on the senders. The capacity is raised to (max_staleness + 1) * sync_every *
  batch_size when smaller: the admission rule lets that many kept groups exist unconsumed, and fewer would let a
  full buffer block the frame of an older group it has to hand out first.
- `get_batch(trainer_version, timeout_s, size=batch_size)` returns EXACTLY `size` groups whose samples all satisfy
  trainer_version - sample.min_version <= max_staleness, their per-token fields numpy views of the received
  payloads (`decode_group(arrays=True)`: no per-token Python objects; the samples' min versions were computed on
  receipt).
  `size` < batch_size hands a step's batch out in parts (the loop streams mini-batches: it trains the first while
  the last are still generating); the bound and the EDF check below count groups, so parts and whole batches give
  the same groups in the same order. Groups already too stale are dropped first (reason `stale`, a terminal
  "filtered" outcome; with the manager's admission rule this does not happen in steady state).
  The batch is the `size` oldest groups (by start version, then arrival), returned at once unless taking a
  group younger than a still-unresolved older one (known from the manager's status) could make some group miss
  its deadline (earliest-deadline-first feasibility, worst case every unresolved group that may still be kept --
  the manager's reservations, pipeline/flow/admission.py -- is kept); then it waits.
  With the manager's rule no trained sample ever exceeds the bound; `TimeoutError` after timeout_s (with the
  buffer's view in the message).
- Accounting (docs/DESIGN.md, Contracts), checked exactly because every frame carries the manager's counters as of
  that frame (an ordered stream gives a consistent cut):
      drawn == trained + filtered + requeued + in_flight + buffered
  drawn, requeued, in_flight: the manager's (latest status); trained: groups handed out by get_batch; filtered:
  the buffer's drops by reason (all_correct, all_wrong, empty, stale, malformed, no_payload) plus the manager's
  `gave_up` (reason max_gen_rounds); buffered: kept groups held. `lost` = group frames the manager pushed that
  never arrived (rejected frames): it must be 0. `accounting()` returns the terms and `balanced`.
- Checkpoints: `state_dict(pushed)` / `snapshot(pushed)` give the counters and the buffered groups as of the
  manager's cut `pushed` (the manager's state_dict()["pushed"]), waiting for in-transit frames; groups that arrive
  later are in the manager's saved in-flight list and are regenerated on resume. `restore` + `load_state_dict`.
- Metrics (namespaced): buffer/* (with the last get_batch's staleness and wait: buffer/staleness_mean,
  buffer/staleness_max, buffer/wait_s; the step's own staleness/* over all its parts is the runtime's), filter/*
  (kept, dropped, drop_<reason>), transport/*, accounting/*.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.algorithm.filters import DROP_REASONS
from pipeline.config import Layout
from pipeline.contracts.records import Group
from pipeline.flow.transport import (
    Frame,
    GroupMeta,
    GroupReceiver,
    RolloutStatus,
    TransportError,
    decode_group,
    encode_group,
    group_meta,
    payload_buffer,
)

log = logging.getLogger(__name__)

_OUTCOME_LOG = 100_000  # recent frame outcomes kept to compute counters at a checkpoint cut
_BURST = 64  # most frames ingested per lock acquisition
_DRAIN_PAUSE_S = 0.0005
"""After draining the socket, the puller sleeps this long before waiting again, so that it wakes once per few
frames rather than once per frame when it keeps up (each wake is a poll, a futex and the GIL: ~10 us of CPU);
half a millisecond of latency on groups that take seconds to generate."""


@dataclass(slots=True)
class _Entry:
    seq: int
    meta: GroupMeta
    payload: Any
    min_versions: np.ndarray
    """The samples' min token versions (checked against meta.min_version when the frame was received)."""


class RolloutBuffer:
    def __init__(
        self,
        receiver: GroupReceiver,
        batch_size: int,
        max_staleness: int,
        capacity: int,
        sync_every: int = 1,
    ):
        if batch_size < 1 or max_staleness < 0 or sync_every < 1:
            raise ValueError(
                f"RolloutBuffer: batch_size={batch_size} (>= 1), max_staleness={max_staleness} (>= 0), "
                f"sync_every={sync_every} (>= 1)"
            )
        self.receiver = receiver
        self.B, self.s, self.E = batch_size, max_staleness, sync_every
        need = (max_staleness + 1) * sync_every * batch_size
        if capacity < need:
            log.warning(
                "rollout.buffer_capacity %d < (max_staleness+1)*weight_sync.every*batch_size = %d; using %d",
                capacity,
                need,
                need,
            )
        self.capacity = max(capacity, need)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # held groups or the manager's status changed; room freed
        # wait_received's own condition, woken only when a target it waits for is reached: waking it on every
        # burst of frames made the puller and the waiter trade the GIL per burst.
        self._arrival = threading.Condition(self._lock)
        self._awaited: list[int] = []
        self._entries: dict[int, _Entry] = {}  # seq -> kept, not yet handed out
        # Indexes of _entries, so that a get_batch costs what it takes, not what the buffer holds: the entries by
        # start version (each in seq order), and a heap of (min_version, seq) whose top is the next to go stale
        # (entries handed out or dropped stay in the heap until they surface; it is rebuilt when mostly such).
        self._by_version: dict[int, dict[int, _Entry]] = {}
        self._stale_heap: list[tuple[int, int]] = []
        self._seq = 0  # group frames received
        self._status: RolloutStatus | None = None
        self._counts: Counter = Counter()  # kept, trained, and drop reasons
        self._outcomes: deque[tuple[int, str]] = deque(maxlen=_OUTCOME_LOG)
        self._taken: tuple[int, int] = (-1, 0)  # (trainer version, groups handed out at it)
        self._last: dict[str, float] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._pull_loop, name="rollout-buffer", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """The endpoint senders connect to (`<address>#<sender token>`, see pipeline/flow/transport.py)."""
        return self.receiver.sender_endpoint  # with the sender token: a credential, never logged

    # ------------------------------------------------------------------ ingestion (background thread)
    def _pull_loop(self) -> None:
        while True:
            if self._closed or len(self._entries) >= self.capacity:
                with self._cond:
                    while not self._closed and len(self._entries) >= self.capacity:
                        self._cond.wait(0.1)  # full: stop pulling, ZMQ's HWM pushes back on the senders
                    if self._closed:
                        return
            try:  # what is already queued is taken in one go: one lock and one wake-up per burst
                frames = [self.receiver.recv_frame(timeout_ms=50)]
                while (
                    frames[-1] is not None and len(frames) < _BURST and len(self._entries) + len(frames) < self.capacity
                ):
                    frames.append(self.receiver.recv_frame(timeout_ms=0))
            except Exception as e:  # a closed socket at shutdown, or a ZMQ error: never kill the process
                if not self._closed:
                    log.exception("buffer: receive failed: %r", e)
                    time.sleep(0.05)
                continue
            if frames[0] is not None:
                with self._cond:
                    for frame in frames:
                        if frame is not None:
                            self._ingest(frame)
                    self._cond.notify_all()
                    if self._awaited and self._seq >= min(self._awaited):
                        self._arrival.notify_all()
                if frames[-1] is None and _DRAIN_PAUSE_S:  # drained: let a few frames queue up before the next wake
                    time.sleep(_DRAIN_PAUSE_S)

    def _ingest(self, frame: Frame) -> None:
        h = frame.header
        if h.status is not None:
            self._status = h.status
        if h.kind != "group":
            return
        meta = h.group
        seq = self._seq
        self._seq += 1
        reason = meta.drop_reason or "kept"
        if reason == "kept" and not meta.has_payload:
            log.warning("buffer: group %s sent without payload and without a drop reason", meta.group_id)
            reason = "no_payload"
        self._counts[reason] += 1
        self._outcomes.append((seq, reason))
        if reason == "kept":
            self._add(_Entry(seq, meta, frame.payload, frame.min_versions))

    def _add(self, e: _Entry) -> None:
        self._entries[e.seq] = e
        self._by_version.setdefault(e.meta.start_version, {})[e.seq] = e
        heapq.heappush(self._stale_heap, (e.meta.min_version, e.seq))

    def _remove(self, seq: int) -> _Entry:
        e = self._entries.pop(seq)
        same = self._by_version[e.meta.start_version]
        del same[seq]
        if not same:
            del self._by_version[e.meta.start_version]
        if len(self._stale_heap) > 2 * len(self._entries) + 64:
            self._stale_heap = [(x.meta.min_version, q) for q, x in self._entries.items()]
            heapq.heapify(self._stale_heap)
        return e

    def _reindex(self) -> None:
        """Rebuild the indexes from _entries (after entries were put back out of seq order)."""
        self._by_version, self._stale_heap = {}, []
        for seq in sorted(self._entries):
            e = self._entries[seq]
            self._by_version.setdefault(e.meta.start_version, {})[seq] = e
            self._stale_heap.append((e.meta.min_version, seq))
        heapq.heapify(self._stale_heap)

    # ------------------------------------------------------------------ consumption
    def get_batch(self, trainer_version: int, timeout_s: float, size: int | None = None) -> list[Group]:
        """Exactly `size` (default batch_size) kept groups within the staleness bound for `trainer_version`."""
        k = self.B if size is None else size
        if not 1 <= k <= self.B:
            raise ValueError(f"buffer: get_batch size {size} not in 1..batch_size={self.B}")
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        with self._cond:
            if self._taken[0] != trainer_version:
                self._taken = (trainer_version, 0)
            while True:
                self._drop_stale(trainer_version)
                chosen = self._select(trainer_version, k)
                if chosen is not None:
                    taken = self._take(chosen, trainer_version)
                    if taken is not None:
                        batch, sample_versions = taken
                        break
                    continue  # a payload did not decode: it was dropped, choose again
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"buffer: no batch within {timeout_s:.1f}s; {self._describe(trainer_version)}")
                self._cond.wait(min(remaining, 0.5))
            self._taken = (trainer_version, self._taken[1] + k)
            self._cond.notify_all()  # room freed: the puller may resume
        stale = [trainer_version - v for v in sample_versions]
        self._last = {
            "buffer/staleness_mean": sum(stale) / max(len(stale), 1),
            "buffer/staleness_max": float(max(stale, default=0)),
            "buffer/wait_s": time.monotonic() - t0,
        }
        return batch

    def _stale(self, version: int, trainer_version: int) -> bool:
        return trainer_version - version > self.s

    def _drop_stale(self, trainer_version: int) -> None:
        heap, seqs = self._stale_heap, []
        while heap and self._stale(heap[0][0], trainer_version):
            seq = heapq.heappop(heap)[1]
            if seq in self._entries:
                seqs.append(seq)
        for seq in sorted(seqs):  # in arrival order, as the counters and logs expect
            self._drop(seq, "stale")

    def _drop(self, seq: int, reason: str) -> None:
        entry = self._remove(seq)
        self._counts["kept"] -= 1
        self._counts[reason] += 1
        self._outcomes.append((seq, reason))
        log.warning("buffer: group %s dropped (%s)", entry.meta.group_id, reason)

    def _select(self, v: int, k: int) -> list[_Entry] | None:
        if len(self._entries) < k:
            return None
        chosen: list[_Entry] = []  # the k oldest by (start version, seq)
        for w in sorted(self._by_version):  # a few versions (at most max_staleness + 2 or so)
            for e in self._by_version[w].values():
                chosen.append(e)
                if len(chosen) == k:
                    break
            if len(chosen) == k:
                break
        pending = {w: n for w, n in self._pending().items() if n > 0 and not self._stale(w, v)}
        if not pending or chosen[-1].meta.start_version <= min(pending):
            return chosen  # nothing older is still on its way: these are the oldest there will be
        # Taking a group younger than an unresolved one: allowed only if, with every unresolved group kept, each
        # start version w still fits the groups left at trainer versions <= w + s (EDF feasibility).
        left = Counter({w: len(es) for w, es in self._by_version.items() if not self._stale(w, v)})
        left.subtract(e.meta.start_version for e in chosen if not self._stale(e.meta.start_version, v))
        left = +left  # the versions of the groups after the chosen ones
        left.update(pending)
        per_version = self.E * self.B
        taken = self._taken[1] + k  # at trainer version v, this part included
        need = 0
        for w in sorted(left):
            need += left[w]
            if need > (w + self.s - v) * per_version + per_version - taken:  # groups after these that can take w
                return None
        return chosen

    def _pending(self) -> dict[int, int]:
        return dict(self._status.pending) if self._status is not None else {}

    def _take(self, chosen: list[_Entry], trainer_version: int) -> tuple[list[Group], list[int]] | None:
        """The decoded groups and their samples' min versions, or None when one was dropped (malformed).
        (The header's min_version, which _drop_stale went by, was checked against the samples' on receipt.)"""
        groups, sample_versions = [], []
        for e in chosen:
            try:  # zero-copy: no per-token objects
                g = decode_group(e.payload, arrays=True)
            except TransportError as err:
                log.error("buffer: group %s: %s", e.meta.group_id, err)
                self._drop(e.seq, "malformed")
                return None
            groups.append(g)
            sample_versions += e.min_versions.tolist()
        for e in chosen:
            self._remove(e.seq)
            self._outcomes.append((e.seq, "trained"))
        self._counts["kept"] -= len(chosen)
        self._counts["trained"] += len(chosen)
        return groups, sample_versions

    def _describe(self, v: int) -> str:
        held = Counter(e.meta.start_version for e in self._entries.values())
        return (
            f"trainer version {v}, batch {self.B}, max_staleness {self.s}; held {len(self._entries)} kept groups by "
            f"start version {dict(sorted(held.items()))}; unresolved at the manager that may still be kept, by start "
            f"version {dict(sorted(self._pending().items()))}; received {self._seq} groups"
        )

    # ------------------------------------------------------------------ accounting, metrics
    def _accounting_locked(self) -> dict[str, int]:
        st = self._status or RolloutStatus()
        c = self._counts
        drops = {r: c[r] for r in c if r not in ("kept", "trained")}
        filtered = sum(drops.values()) + st.gave_up
        out = {
            "drawn": st.drawn,
            "trained": c["trained"],
            "filtered": filtered,
            "requeued": st.requeued,
            "in_flight": st.in_flight,
            "buffered": len(self._entries),
            "received": self._seq,
            "pushed": st.pushed,
            "lost": st.pushed - self._seq,
        }
        out["balanced"] = int(
            out["lost"] == 0
            and out["drawn"] == out["trained"] + filtered + out["requeued"] + out["in_flight"] + out["buffered"]
        )
        return out

    def accounting(self) -> dict[str, int]:
        """The terms of drawn == trained + filtered + requeued + in_flight + buffered, `lost`, and `balanced`."""
        with self._cond:
            return self._accounting_locked()

    def wait_received(self, n: int, timeout_s: float) -> bool:
        """Block until `n` group frames have arrived (e.g. the manager's `pushed` at a checkpoint)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._awaited.append(n)
            try:
                while self._seq < n:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._arrival.wait(min(remaining, 0.5))
                return True
            finally:
                self._awaited.remove(n)

    def metrics(self) -> dict[str, float]:
        with self._cond:
            c = self._counts
            m = {
                "buffer/size": float(len(self._entries)),
                "buffer/capacity": float(self.capacity),
                "buffer/received": float(self._seq),
                "buffer/trained": float(c["trained"]),
                "buffer/pending": float(sum(self._pending().values())),
                "filter/kept": float(c["kept"] + c["trained"] + c["stale"]),
                "filter/dropped": float(sum(n for r, n in c.items() if r not in ("kept", "trained", "stale"))),
            }
            for reason in sorted(set(DROP_REASONS) | {"stale"} | (set(c) - {"kept", "trained"})):
                m[f"filter/drop_{reason}"] = float(c[reason])
            m.update({f"accounting/{k}": float(v) for k, v in self._accounting_locked().items()})
            m.update(self._last)
        m.update(self.receiver.metrics())
        return m

    stats = metrics

    # ------------------------------------------------------------------ checkpoints
    def _cut(self, pushed: int | None, timeout_s: float) -> int:
        if pushed is None:
            return self._seq
        if not self.wait_received(pushed, timeout_s):
            log.error(
                "buffer: checkpoint cut at %d pushed groups, only %d arrived; saving what is here", pushed, self._seq
            )
        return min(pushed, self._seq)

    def state_dict(self, pushed: int | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
        """Counters as of the manager's cut `pushed` (frames after it are undone: the manager regenerates them)."""
        cut = self._cut(pushed, timeout_s)
        with self._cond:
            counts = Counter(self._counts)
            for seq, reason in self._outcomes:
                if seq >= cut:  # outcomes of groups the resumed manager will generate again
                    counts[reason] -= 1
            counts["kept"] = sum(1 for q in self._entries if q < cut)
            return {"received": cut, "counts": {k: int(v) for k, v in counts.items() if v}}

    def snapshot(self, pushed: int | None = None, timeout_s: float = 60.0) -> list[Group]:
        """The kept groups held (decoded), as of the manager's cut `pushed`."""
        cut = self._cut(pushed, timeout_s)
        with self._cond:
            entries = sorted((e for e in self._entries.values() if e.seq < cut), key=lambda e: e.seq)
            return [decode_group(payload_buffer(e.payload)) for e in entries]

    def restore(self, groups: list[Group]) -> None:
        """Put checkpointed groups back (they count as kept, ahead of anything that arrives later)."""
        with self._cond:
            base = min(min(self._entries, default=0), 0) - len(groups)
            for i, g in enumerate(groups):
                frames = encode_group(g, start_version=g.min_version)
                mins = np.array([x.min_version for x in g.samples], np.int32)
                self._entries[base + i] = _Entry(base + i, group_meta(g, g.min_version), frames[1], mins)
            self._reindex()  # these come before the held ones: rebuild the indexes in seq order
            self._counts["kept"] = len(self._entries)
            self._cond.notify_all()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counters of a checkpoint; call before the resumed manager's frames arrive (and `restore` the groups)."""
        with self._cond:
            self._counts = Counter(state["counts"])
            self._counts["kept"] = len(self._entries)
            self._seq = int(state["received"])
            self._arrival.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self.receiver.close()


def make_buffer(lay: Layout, receiver: GroupReceiver) -> RolloutBuffer:
    """The run's buffer, sized by its layout (the loop and the simulator both build it here)."""
    return RolloutBuffer(receiver, lay.batch_size, lay.max_staleness, lay.buffer_capacity, lay.sync_every)
