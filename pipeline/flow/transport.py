"""ZMQ transport of finished groups: RolloutManager (PUSH, connects) -> RolloutBuffer (PULL, binds).

Contract:
- A message is two ZMQ frames: a small msgpack `FrameHeader` and a payload. The header carries the schema version,
  the sender's `RolloutStatus` (its accounting counters and its unresolved groups by start version: a consistent
  cut of the manager's state at the moment the frame was queued, so the receiver can check the accounting
  identity exactly and order groups for the staleness bound), and, for a group frame, a `GroupMeta` (ids, start
  version, min token version, per-sample `acc`, token count) that lets the buffer filter, order and check staleness
  without decoding the payload. The payload is a msgpack `_WireGroup`: the group's and its samples' scalar fields,
  and the four per-token fields of all samples packed back to back as raw little-endian arrays (prompt and response
  token ids int32, logprobs float64 -- exact, versions int32; the MoE routed-experts records int16, with each
  sample's layer and top-k counts among its scalars) in msgpack `bin` fields; or empty (a status-only
  frame, or a group the manager's dynamic-sampling filter dropped: only its header travels).
- Frames whose header `schema` != SCHEMA_VERSION (a sender running other code), or that do not decode, are
  rejected: counted (`transport/rejected_schema`, `transport/rejected_malformed`), logged with the reason once
  per kind, never raised. A payload is checked again (`Group.schema`) when it is decoded.
- No pickle anywhere: msgspec msgpack only.
- Authentication (per-run token, `authenticate`): a receiver holds a random 256-bit token (or one it is given);
  its `sender_endpoint` is `<bound address>#<token>` (a credential: pass it to the sender, never log it; `address`
  stays token-free). `GroupSender(endpoint)` strips the token and sends it as an extra first frame of every message;
  the receiver compares it in constant time and drops a message without it (`transport/rejected_auth`) before
  decoding anything. Why a token and not ZMQ CURVE: the threat is another local user or process pushing frames into
  the buffer's port; a token checked on every message stops that with no key distribution, no ZAP handler thread
  and no per-byte encryption cost on multi-MB groups (the socket binds the loopback or the cluster's private
  interface; CURVE would add confidentiality, which rollouts do not need).
- Size limit: the receiver sets ZMQ_MAXMSGSIZE (`max_message_bytes`, default 256 MiB): a peer sending a larger
  frame is disconnected by ZMQ before the frame is buffered.
- Validation of decoded frames (`validate_frame`), after authentication: status counters must be non-negative
  integers below 2**53; a group header's fields must be consistent (accs per sample, n_tokens >= 0); a header-only
  group must have an empty payload, any other a payload that is structurally a `_WireGroup` whose schema, ids, sample
  count and per-sample `acc` match the header (a probe decoder reads the scalars, typed, and the packed versions,
  skipping the other packed arrays), whose packed versions match the samples' lengths, and whose samples' min token
  version equals the header's `min_version` (what the buffer orders and drops groups by: checked here, at the
  socket, while the frame is fresh in cache; the per-sample mins are kept with the frame for the staleness metrics).
  The other packed arrays' lengths are checked when the group is decoded (the buffer drops such a group as
  malformed). A frame failing any check is counted
  (`transport/rejected_malformed`) and dropped, never kept, and its status is not applied.
- Memory: the receiver keeps a kept payload in ZMQ's own message (zero-copy), and asks glibc once per process to keep
  freed memory for reuse (`keep_freed_memory`). Why: a buffer keeps what it receives, so ZMQ's I/O thread mallocs
  every message while earlier ones are still held; with glibc's default thresholds that memory is new from the
  kernel each time and pays a page fault per 4 KiB (measured ~70 per 0.3 MB message, the whole raw receive time
  again); with the memory of consumed groups reused, none.
- Arrays end to end: `decode_group(payload, arrays=True)` (what the buffer hands the trainer) makes no per-token
  Python object: each sample's fields are read-only numpy views of the payload's bytes
  (msgspec decodes `bin` into memoryviews of the received frame), and the trainer collates them
  with numpy slices. `arrays=False`
  gives lists (`recv`, checkpoints). See benchmarks/bench_transport.py.
- `GroupSender(address)`: PUSH, connects, SNDHWM. `send(group)` blocks (up to `timeout_ms`); `post(frames)` never
  blocks (frames that meet a full pipe wait in an ordered outbox; `flush()` / `await drain()` push them on), so an
  asyncio loop is never stalled by backpressure. `close()` lingers `linger_ms` to deliver what is queued.
- `GroupReceiver(bind_address="tcp://127.0.0.1:0")`: PULL, binds (port 0 picks a free port; `address` is the bound
  endpoint), RCVHWM (`DEFAULT_RCVHWM`). `recv(timeout_ms) -> Group | None` decodes fully (status frames update
  `last_status`, header-only groups are skipped); `recv_frame(timeout_ms) -> Frame | None` returns the header, the
  payload and its samples' min versions.
  One thread at a time may use a receiver (ZMQ sockets are not thread-safe).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections import deque
from itertools import accumulate
from typing import Any

import msgspec
import numpy as np
import zmq

from pipeline.contracts.records import ROUTE_DTYPE, SCHEMA_VERSION, Group, Sample

log = logging.getLogger(__name__)

DEFAULT_HWM = 64
"""Messages the sender's socket queues before backpressure (a 16k-token group is ~4 MB)."""
DEFAULT_RCVHWM = 1000
"""Messages the receiver's socket queues (ZMQ's default). Not 64: when a burst fills the receiving pipe, libzmq
stops and restarts reading the TCP stream every few messages, measured at +40-50 us of its I/O thread's CPU per
0.3 MB message (~1.7x what the raw receive costs), which caps ingestion at ~0.6 of raw ZMQ exactly when the buffer
falls behind. Memory stays bounded by the admission rule: the manager never has more kept groups unconsumed than the
buffer's capacity (pipeline/flow/buffer.py), so the buffer does not stop pulling and the queue only absorbs bursts."""
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
"""ZMQ_MAXMSGSIZE of the receiver: the largest frame a sender may push (a 16 x 16k-token group is ~4 MB)."""
_MAX_COUNTER = 2**53


class TransportError(RuntimeError):
    """A frame that cannot be used (wrong schema, does not decode); the message says which and why."""


class RolloutStatus(msgspec.Struct, kw_only=True, gc=False):
    """The manager's accounting at the moment a frame was queued (a consistent cut: frames are ordered)."""

    version: int = 0
    """Weight version the manager generates with."""
    drawn: int = 0
    """Prompts taken from the queue (each draw is one generation attempt, one group id)."""
    pushed: int = 0
    """Group frames queued for the buffer so far, this frame included (kept or filtered)."""
    requeued: int = 0
    """Draws that ended by putting the prompt back at the front of the queue (abort, engine failure, resume)."""
    gave_up: int = 0
    """Draws that ended as filtered at the manager (reason `max_gen_rounds`: too many attempts this epoch)."""
    in_flight: int = 0
    """Draws not yet resolved (generating, scoring, or waiting for an engine)."""
    pending: dict[int, int] = msgspec.field(default_factory=dict)
    """Unresolved groups that may still be kept (their reservations under the staleness bound, see
    pipeline/flow/admission.py), by start version (the version they were admitted under)."""


class GroupMeta(msgspec.Struct, kw_only=True, gc=False):
    """What the buffer needs to know about a group before (or instead of) decoding it."""

    prompt_id: str
    group_id: str
    start_version: int
    """Version the group was admitted under (its staleness deadline derives from it)."""
    min_version: int
    """Oldest per-token version of its samples (what the staleness bound is checked against)."""
    accs: list[bool]
    """Per-sample correctness, for the dynamic-sampling filter."""
    n_tokens: int = 0
    """Response tokens in the group."""
    attempt: int = 0
    epoch: int = 0
    has_payload: bool = True
    """False: only this header travels (the manager dropped the group)."""
    drop_reason: str = ""
    """The dynamic-sampling filter's reason when the manager dropped the group ("" when kept): the filter is decided
    once, at the manager, and the buffer counts the reason it reads here."""


class FrameHeader(msgspec.Struct, kw_only=True, gc=False):
    schema: int = SCHEMA_VERSION
    kind: str = "group"
    """group | status"""
    status: RolloutStatus | None = None
    group: GroupMeta | None = None


class _SchemaProbe(msgspec.Struct):
    """Decodes only the schema of a header (other fields ignored), so a frame of another version is named."""

    schema: int = -1


class _SchemaOnly(msgspec.Struct):
    schema: int
    group_id: str


class Frame(msgspec.Struct, gc=False):
    """A received message: its header and the undecoded payload (bytes or a zero-copy zmq.Frame)."""

    header: FrameHeader
    payload: Any = b""
    nbytes: int = 0
    min_versions: Any = None
    """A group payload's per-sample min token versions (int32 array, -1 for a sample without tokens), computed at
    validation while the frame is fresh in cache; None for a status frame or a header-only group."""


# The frame structs above are `gc=False` (never tracked by Python's cycle collector; they cannot form cycles: trees
# of scalars, lists and buffers): a buffer holds thousands of them, and in a process that imported torch and Ray
# (hundreds of thousands of tracked objects) every full collection they triggered cost more than their ingestion
# (bench_transport at 1k tokens: ingest 0.65 of raw ZMQ with them tracked, 0.82-0.88 with the collector off).
_ENCODER = msgspec.msgpack.Encoder()
_HEADER_DECODER = msgspec.msgpack.Decoder(FrameHeader)
_PROBE_DECODER = msgspec.msgpack.Decoder(_SchemaProbe)
_IDS, _LOGPROBS = np.dtype("<i4"), np.dtype("<f8")  # token ids and versions; logprobs exact (Python floats)


class _WireSample(msgspec.Struct, array_like=True):
    """A sample's scalar fields; its per-token fields are slices of the group's packed arrays."""

    prompt_id: str
    group_id: str
    index: int
    finish_reason: str
    reward: float
    task_reward: float
    acc: bool
    reward_failed: str
    max_new_tokens: int
    prompt_len: int
    response_len: int
    routed_layers: int = 0
    routed_topk: int = 0


class _WireGroup(msgspec.Struct, kw_only=True, gc=False):
    schema: int
    prompt_id: str
    group_id: str
    answer: str
    attempt: int
    epoch: int
    samples: list[_WireSample]
    prompt_ids: memoryview
    response_ids: memoryview
    logprobs: memoryview
    versions: memoryview
    routed_experts: memoryview = memoryview(b"")  # the samples' int16 routing records back to back


_GROUP_DECODER = msgspec.msgpack.Decoder(_WireGroup)


def _packed(seqs: list, dtype: np.dtype) -> bytes:
    return np.concatenate([np.asarray(s, dtype=dtype) for s in seqs]).tobytes() if seqs else b""


def _wire(group: Group) -> _WireGroup:
    s = group.samples
    return _WireGroup(
        schema=SCHEMA_VERSION, prompt_id=group.prompt_id, group_id=group.group_id, answer=group.answer,
        attempt=group.attempt, epoch=group.epoch,
        samples=[
            _WireSample(
                x.prompt_id, x.group_id, x.index, x.finish_reason, x.reward, x.task_reward, x.acc, x.reward_failed,
                x.max_new_tokens, len(x.prompt_ids), len(x.response_ids), x.routed_layers, x.routed_topk,
            )
            for x in s
        ],
        prompt_ids=_packed([x.prompt_ids for x in s], _IDS), response_ids=_packed([x.response_ids for x in s], _IDS),
        logprobs=_packed([x.logprobs for x in s], _LOGPROBS), versions=_packed([x.versions for x in s], _IDS),
        routed_experts=b"".join(bytes(x.routed_experts) for x in s),
    )  # fmt: skip


_SAMPLE_TEMPLATE = Sample(prompt_id="", group_id="", index=0, prompt_ids=[], response_ids=[], logprobs=[], versions=[])
"""Every field of a decoded sample is set on a copy of this one, except `routed_experts` when it is empty (b"")."""


def sample_min_versions(versions: np.ndarray, r_lens: list[int]) -> np.ndarray:
    """Each sample's min token version (-1 for a sample without tokens) from a group's packed versions, in one numpy
    call rather than one reduction per sample."""
    mins = np.full(len(r_lens), -1, np.int32)
    starts = [0, *accumulate(r_lens)][:-1]
    if 0 not in r_lens:  # the common case: every sample has tokens
        if r_lens:
            mins[:] = np.minimum.reduceat(versions, starts)
    else:  # reduceat over the non-empty samples only (an empty segment would read its neighbour)
        filled = [i for i, n in enumerate(r_lens) if n]
        if filled:
            mins[filled] = np.minimum.reduceat(versions, [starts[i] for i in filled])
    return mins


def _unwire(w: _WireGroup, arrays: bool) -> Group:
    """The group, its per-token fields numpy views of `w`'s buffers, or lists."""
    prompts, responses = np.frombuffer(w.prompt_ids, _IDS), np.frombuffer(w.response_ids, _IDS)
    logprobs, versions = np.frombuffer(w.logprobs, _LOGPROBS), np.frombuffer(w.versions, _IDS)
    wire = w.samples
    p_lens, r_lens = [x.prompt_len for x in wire], [x.response_len for x in wire]
    n_p, n_r = sum(p_lens), sum(r_lens)
    if (len(prompts), len(responses), len(logprobs), len(versions)) != (n_p, n_r, n_r, n_r) or min(
        p_lens + r_lens, default=0
    ) < 0:
        raise TransportError(f"group {w.group_id}: packed token arrays do not match the samples' lengths")
    routes = memoryview(w.routed_experts)
    route_bytes = [
        (x.prompt_len + x.response_len - 1) * x.routed_layers * x.routed_topk * ROUTE_DTYPE.itemsize
        if x.routed_layers else 0
        for x in wire
    ]  # fmt: skip
    if sum(route_bytes) != routes.nbytes or min(route_bytes, default=0) < 0:
        raise TransportError(f"group {w.group_id}: packed routed experts do not match the samples' lengths")
    r_starts = [0, *accumulate(r_lens)][:-1]
    if not arrays:
        prompts, responses, logprobs, versions = (a.tolist() for a in (prompts, responses, logprobs, versions))
    samples, p0, q0 = [], 0, 0
    for x, p_len, r0, r_len, nq in zip(wire, p_lens, r_starts, r_lens, route_bytes, strict=True):
        p1, r1 = p0 + p_len, r0 + r_len
        # A copy of a template with its fields set: half the cost of Sample's 16-keyword __init__ (a group's
        # samples are made at every get_batch).
        s = _SAMPLE_TEMPLATE.__copy__()
        s.prompt_id, s.group_id, s.index, s.finish_reason = x.prompt_id, x.group_id, x.index, x.finish_reason
        s.reward, s.task_reward, s.acc, s.reward_failed = x.reward, x.task_reward, x.acc, x.reward_failed
        s.max_new_tokens, s.routed_layers, s.routed_topk = x.max_new_tokens, x.routed_layers, x.routed_topk
        s.prompt_ids, s.response_ids = prompts[p0:p1], responses[r0:r1]
        s.logprobs, s.versions = logprobs[r0:r1], versions[r0:r1]
        if nq:
            s.routed_experts = routes[q0 : q0 + nq] if arrays else bytes(routes[q0 : q0 + nq])
        samples.append(s)
        p0, q0 = p1, q0 + nq
    return Group(
        schema=w.schema, prompt_id=w.prompt_id, group_id=w.group_id, samples=samples, answer=w.answer,
        attempt=w.attempt, epoch=w.epoch,
    )  # fmt: skip


def group_meta(
    group: Group, start_version: int | None = None, has_payload: bool = True, drop_reason: str = ""
) -> GroupMeta:
    min_version = group.min_version if group.samples else -1
    return GroupMeta(
        prompt_id=group.prompt_id,
        group_id=group.group_id,
        start_version=min_version if start_version is None else start_version,
        min_version=min_version,
        accs=group.accs,
        n_tokens=sum(len(s.response_ids) for s in group.samples),
        attempt=group.attempt,
        epoch=group.epoch,
        has_payload=has_payload and not drop_reason,
        drop_reason=drop_reason,
    )


def encode_group(
    group: Group,
    status: RolloutStatus | None = None,
    start_version: int | None = None,
    payload: bool = True,
    drop_reason: str = "",
) -> list[bytes]:
    """The two frames of a group message. A `drop_reason` (the filter dropped the group) or payload=False sends the
    header only."""
    meta = group_meta(group, start_version, payload, drop_reason)
    header = FrameHeader(kind="group", status=status, group=meta)
    return [_ENCODER.encode(header), _ENCODER.encode(_wire(group)) if meta.has_payload else b""]


def encode_status(status: RolloutStatus) -> list[bytes]:
    return [_ENCODER.encode(FrameHeader(kind="status", status=status)), b""]


def decode_group(payload: Any, arrays: bool = False) -> Group:
    """Payload bytes -> Group, its per-token fields lists or (arrays=True) zero-copy read-only numpy views;
    TransportError when it does not decode or has another schema."""
    return _unwire(_decode_wire(payload_buffer(payload)), arrays)


def _decode_wire(payload: Any) -> _WireGroup:
    try:
        wire = _GROUP_DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        try:  # name a schema mismatch even when the payload's shape changed too
            schema = _PROBE_DECODER.decode(payload).schema
        except (msgspec.DecodeError, msgspec.ValidationError):
            schema = SCHEMA_VERSION
        if schema == SCHEMA_VERSION:
            raise TransportError(f"group payload does not decode: {e}") from None
        wire = _SchemaOnly(schema=schema, group_id="?")
    if wire.schema != SCHEMA_VERSION:
        raise TransportError(
            f"group {wire.group_id}: schema {wire.schema} != SCHEMA_VERSION {SCHEMA_VERSION} "
            "(sender and receiver run different code versions)"
        )
    return wire


def decode_header(raw: Any) -> FrameHeader:
    """Header bytes -> FrameHeader; TransportError naming a schema mismatch or a malformed header."""
    try:
        header = _HEADER_DECODER.decode(raw)
        error = None if header.schema == SCHEMA_VERSION else "schema"
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        header, error = None, f"malformed frame header: {e}"
    if error is not None:  # name a schema mismatch even when the other fields changed shape too
        try:
            schema = _PROBE_DECODER.decode(raw).schema
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise TransportError(error) from None
        if schema != SCHEMA_VERSION:
            raise TransportError(
                f"frame schema {schema} != SCHEMA_VERSION {SCHEMA_VERSION} (sender and receiver run different code "
                "versions); frame dropped"
            )
        raise TransportError(error)
    if header.kind not in ("group", "status") or (header.kind == "group" and header.group is None):
        raise TransportError(f"malformed frame header: kind {header.kind!r} without its fields")
    return header


class _GroupProbe(msgspec.Struct, kw_only=True, gc=False):
    """A payload's structure: its ids, samples' scalars (typed) and packed versions (for the min versions, not kept);
    the other packed arrays are skipped, not read. Why not the full `_WireGroup` decode, kept for when the group is
    handed out: its five memoryviews per group are objects Python's cycle collector tracks, and a buffer holding
    thousands of them in a process that imported torch made full collections cost more than ingestion (1k-token
    groups: ingest 0.60 of raw ZMQ vs 0.83-0.85 probing)."""

    schema: int
    prompt_id: str
    group_id: str
    samples: list[_WireSample]
    versions: memoryview


_GROUP_PROBE = msgspec.msgpack.Decoder(_GroupProbe)


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """`<address>#<token>` -> (address, token); no `#`: (endpoint, "")."""
    address, _, token = endpoint.partition("#")
    return address, token


def authenticate(parts: list, token: bytes) -> list | None:
    """The message's frames after the token frame, or None when the first frame is not `token`."""
    if len(parts) < 2:
        return None
    first = parts[0].bytes if isinstance(parts[0], zmq.Frame) else bytes(parts[0])
    return parts[1:] if hmac.compare_digest(first, token) else None


def _check_status(status: RolloutStatus) -> None:
    counts = (status.version, status.drawn, status.pushed, status.requeued, status.gave_up, status.in_flight)
    pending = status.pending
    low, high = min(counts), max(counts)
    if pending:
        low, high = min(low, *pending, *pending.values()), max(high, *pending, *pending.values())
    if low < 0 or high >= _MAX_COUNTER:
        raise TransportError("status counters must be non-negative integers below 2**53")


def validate_frame(header: FrameHeader, payload: Any) -> np.ndarray | None:
    """TransportError when an (authenticated, decodable) frame is inconsistent; see the module contract. For a group
    with a payload: its samples' min token versions (checked against the header's `min_version`)."""
    if header.status is not None:
        _check_status(header.status)
    if header.kind != "group":
        if len(payload):
            raise TransportError("status frame with a payload")
        return None
    meta = header.group
    if meta.n_tokens < 0 or meta.attempt < 0 or meta.epoch < 0 or min(meta.start_version, meta.min_version) < -1:
        raise TransportError(f"group {meta.group_id!r}: negative counters in its header")
    if not meta.has_payload:
        if len(payload):
            raise TransportError(f"group {meta.group_id!r}: header says no payload, but one came")
        return None
    try:
        probe = _GROUP_PROBE.decode(payload_buffer(payload))
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        try:  # name a schema mismatch even when the payload's shape changed too
            probe = _SchemaOnly(schema=_PROBE_DECODER.decode(payload_buffer(payload)).schema, group_id="?")
        except (msgspec.DecodeError, msgspec.ValidationError):
            probe = None
        if probe is None or probe.schema == SCHEMA_VERSION:
            raise TransportError(f"group {meta.group_id!r}: payload is not a Group: {e}") from None
    if probe.schema != SCHEMA_VERSION:
        raise TransportError(
            f"group {meta.group_id!r}: payload schema {probe.schema} != SCHEMA_VERSION {SCHEMA_VERSION} (sender and "
            "receiver run different code versions)"
        )
    if (probe.group_id, probe.prompt_id) != (meta.group_id, meta.prompt_id):
        raise TransportError(f"group {meta.group_id!r}: payload is group {probe.group_id!r} of {probe.prompt_id!r}")
    if [sm.acc for sm in probe.samples] != meta.accs:
        raise TransportError(f"group {meta.group_id!r}: header accs do not match the payload's samples")
    r_lens = [sm.response_len for sm in probe.samples]
    versions = np.frombuffer(probe.versions, _IDS)
    if len(versions) != sum(r_lens) or min(r_lens, default=0) < 0:
        raise TransportError(f"group {meta.group_id!r}: packed versions do not match the samples' lengths")
    mins = sample_min_versions(versions, r_lens)
    group_min = int(mins.min()) if len(mins) else -1
    if group_min != meta.min_version:
        # the buffer orders and drops groups by the header's min_version: a wrong one would bypass the bound
        raise TransportError(
            f"group {meta.group_id!r}: header min_version {meta.min_version} != its samples' {group_min}"
        )
    return mins


_MALLOC_TUNED = False
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>


def keep_freed_memory() -> bool:
    """Once per process (glibc only; elsewhere a no-op returning False): let malloc keep freed memory for reuse
    instead of handing it back to the kernel: M_MMAP_THRESHOLD 32 MiB (its maximum: messages up to that size come
    from the heap, not from a fresh mmap each), M_TOP_PAD 64 MiB (a thread's arena keeps that much when trimming, so
    its 64 MiB heaps are not unmapped when they empty), M_TRIM_THRESHOLD 1 GiB (the main heap).

    Why: ZMQ's I/O thread mallocs every received message and the buffer holds it until the trainer takes the group,
    so with glibc's defaults each held message lands in memory new from the kernel and is faulted in page by page
    (measured: ~70 faults per 0.3 MB message; with this, under one once the memory of consumed groups is reused).
    The cost: the process's heap does not shrink below its high-water mark (the buffer's process holds up to its
    capacity of groups anyway)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        settings = ((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TOP_PAD, 64 * 2**20), (_M_TRIM_THRESHOLD, 2**30))
        _MALLOC_TUNED = all(mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError):
        return False
    return _MALLOC_TUNED


def _context() -> zmq.Context:
    return zmq.Context.instance()


class GroupSender:
    """PUSH socket that connects to a buffer. Not thread-safe: one thread (or one event loop) uses it."""

    def __init__(self, address: str, hwm: int = DEFAULT_HWM, linger_ms: int = 5000):
        """`address`: the receiver's `sender_endpoint` (`<address>#<token>`); the token is sent with every
        message and kept out of `self.address`, reprs and logs."""
        if not address:
            raise ValueError("GroupSender: empty address (rollout.zmq_address / the buffer's bound address)")
        address, token = split_endpoint(address)
        self.address = address
        self._token = [token.encode()] if token else []
        self._sock = _context().socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, linger_ms)
        self._sock.connect(address)
        self._outbox: deque[list[bytes]] = deque()
        self.frames_sent = 0
        self.bytes_sent = 0
        self.closed = False

    @property
    def backlog(self) -> int:
        """Messages waiting in the outbox because the pipe was full."""
        return len(self._outbox)

    def _try_send(self, frames: list[bytes]) -> bool:
        sock, parts = self._sock, (*self._token, *frames)
        last = len(parts) - 1
        try:  # part by part (send_multipart's checks per part cost more than the sends); a multipart message is
            # accepted whole or not at all, so only the first part can meet a full pipe. Large parts zero-copy.
            for i, part in enumerate(parts):
                sock.send(part, zmq.NOBLOCK | zmq.SNDMORE if i < last else zmq.NOBLOCK, copy=len(part) < 65536)
        except zmq.Again:
            return False
        self.frames_sent += 1
        self.bytes_sent += sum(map(len, frames))
        return True

    def flush(self) -> bool:
        """Send what the outbox holds, in order, without blocking; True when it is empty."""
        while self._outbox:
            if not self._try_send(self._outbox[0]):
                return False
            self._outbox.popleft()
        return True

    def post(self, frames: list[bytes]) -> bool:
        """Queue a message without blocking (order kept). True if it went straight to ZMQ."""
        if self.flush() and self._try_send(frames):
            return True
        self._outbox.append(frames)
        return False

    async def drain(self, poll_s: float = 0.002) -> None:
        """Await until the outbox is empty (only sleeps while the receiver applies backpressure)."""
        import asyncio

        delay = poll_s
        while not self.flush():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def send_frames(self, frames: list[bytes], timeout_ms: int | None = None) -> None:
        """Blocking send of an encoded message (after the outbox); TimeoutError past timeout_ms."""
        if not self._outbox and self._try_send(frames):  # the common case: room in the pipe, nothing queued before
            return
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        self._outbox.append(frames)
        while not self.flush():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"GroupSender({self.address}): receiver not draining for {timeout_ms} ms")
            self._sock.poll(50, zmq.POLLOUT)

    def send(self, group: Group, status: RolloutStatus | None = None, timeout_ms: int | None = None) -> None:
        self.send_frames(encode_group(group, status), timeout_ms)

    def send_status(self, status: RolloutStatus, timeout_ms: int | None = None) -> None:
        self.send_frames(encode_status(status), timeout_ms)

    def close(self, linger_ms: int | None = None) -> None:
        if self.closed:
            return
        self.flush()
        if self._outbox:
            log.warning("GroupSender(%s): closing with %d undelivered messages", self.address, len(self._outbox))
        self._sock.close(linger=linger_ms)
        self.closed = True


class GroupReceiver:
    """PULL socket bound on the buffer's side. Counts and skips frames it cannot use."""

    def __init__(
        self,
        bind_address: str = "tcp://127.0.0.1:0",
        hwm: int = DEFAULT_RCVHWM,
        token: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tune_malloc: bool = True,
    ):
        """`token`: the senders' credential (default: a fresh random one; see `sender_endpoint`). `tune_malloc`:
        call `keep_freed_memory` (process-wide)."""
        if tune_malloc:
            keep_freed_memory()
        self._token = token if token is not None else secrets.token_urlsafe(32)
        if not self._token or "#" in self._token:
            raise ValueError("GroupReceiver: token must be non-empty and hold no '#'")
        self._token_bytes = self._token.encode()
        self._sock = _context().socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        host, _, port = bind_address.rpartition(":")
        if bind_address.startswith("tcp://") and port in ("0", "*"):
            self._sock.bind_to_random_port(host)
        else:
            self._sock.bind(bind_address)
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.last_status: RolloutStatus | None = None
        self.counters: dict[str, int] = {
            "frames": 0, "bytes": 0, "rejected_schema": 0, "rejected_malformed": 0, "rejected_auth": 0,
        }  # fmt: skip
        self._warned: set[str] = set()
        self.closed = False

    @property
    def sender_endpoint(self) -> str:
        """`<address>#<token>`: what a `GroupSender` connects with. A credential: never log it."""
        return f"{self.address}#{self._token}"

    def _reject(self, kind: str, reason: str) -> None:
        self.counters[kind] += 1
        if kind not in self._warned:
            self._warned.add(kind)
            log.error("GroupReceiver(%s): %s (counted in transport/%s)", self.address, reason, kind)

    def _recv_parts(self) -> list[zmq.Frame]:
        """The frames of the next message, zero-copy; zmq.Again when none is queued. Frame by frame with `more`, not
        recv_multipart, whose RCVMORE getsockopt per part costs more than the receive (multipart messages are
        delivered whole, so the parts after the first are there)."""
        part = self._sock.recv(zmq.NOBLOCK, copy=False)
        parts = [part]
        while part.more:
            part = self._sock.recv(0, copy=False)
            parts.append(part)
        return parts

    def recv_frame(self, timeout_ms: int = 0) -> Frame | None:
        """Next usable message (header decoded, payload not), or None when none arrives within timeout_ms."""
        deadline = None
        while True:
            try:
                parts = self._recv_parts()
            except zmq.Again:  # nothing queued: wait (a poll per message would double the syscalls)
                deadline = deadline or time.monotonic() + timeout_ms / 1000
                remaining = max(0, int((deadline - time.monotonic()) * 1000))
                if not self._sock.poll(remaining, zmq.POLLIN):
                    return None
                continue
            nbytes = sum(map(len, parts))
            self.counters["frames"] += 1
            self.counters["bytes"] += nbytes
            authentic = authenticate(parts, self._token_bytes)
            if authentic is None:
                self._reject("rejected_auth", "message without this run's sender token (not from our rollout manager)")
                continue
            parts = authentic
            if len(parts) != 2:
                self._reject("rejected_malformed", f"message of {len(parts)} parts, expected 2 (header, payload)")
                continue
            try:
                header = decode_header(parts[0].buffer)
            except TransportError as e:
                self._reject("rejected_schema" if "schema" in str(e) else "rejected_malformed", str(e))
                continue
            payload = parts[1] if len(parts[1]) else b""
            try:
                mins = validate_frame(header, payload)
            except TransportError as e:
                self._reject("rejected_schema" if "schema" in str(e) else "rejected_malformed", str(e))
                continue
            if header.status is not None:
                self.last_status = header.status
            return Frame(header, payload, nbytes, mins)

    def recv(self, timeout_ms: int = 0) -> Group | None:
        """Next group (fully decoded); status frames and header-only groups are consumed on the way."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            frame = self.recv_frame(max(0, int((deadline - time.monotonic()) * 1000)))
            if frame is None:
                return None
            if frame.header.kind != "group" or not frame.header.group.has_payload:
                continue
            try:
                return decode_group(payload_buffer(frame.payload))
            except TransportError as e:
                self._reject("rejected_schema" if "schema" in str(e) else "rejected_malformed", str(e))

    def metrics(self) -> dict[str, float]:
        return {f"transport/{k}": float(v) for k, v in self.counters.items()}

    def close(self) -> None:
        if not self.closed:
            self._sock.close(linger=0)
            self.closed = True


def payload_buffer(payload: Any) -> Any:
    """A zero-copy view of a payload (zmq.Frame -> memoryview; bytes as they are)."""
    return payload.buffer if isinstance(payload, zmq.Frame) else payload
