"""The buffer's ZMQ socket under forged and malformed frames (issue #22): only senders holding the run's token are
heard, frames over the size limit are cut off by ZMQ, and a frame that is inconsistent (garbage payload under a
well-formed header, impossible status counters) is counted and dropped, never kept and never applied.
"""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq

from pipeline.contracts.records import Group, Sample
from pipeline.flow.buffer import RolloutBuffer
from pipeline.flow.transport import (
    FrameHeader,
    GroupReceiver,
    GroupSender,
    RolloutStatus,
    encode_group,
    encode_status,
    group_meta,
)


def make_group(gid: str = "g0", accs=(True, False), n_tokens: int = 4) -> Group:
    samples = [
        Sample(prompt_id="p1", group_id=gid, index=i, prompt_ids=[1, 2], response_ids=list(range(n_tokens)),
               logprobs=[-0.5] * n_tokens, versions=[3] * n_tokens, acc=acc, reward=1.0 if acc else -1.0)
        for i, acc in enumerate(accs)
    ]  # fmt: skip
    return Group(prompt_id="p1", group_id=gid, samples=samples)


def raw_pusher(address: str) -> zmq.Socket:
    """Another local process that knows the port but not the token (what any local user could do today)."""
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


@pytest.fixture
def buf():
    b = RolloutBuffer(GroupReceiver(), batch_size=1, max_staleness=4, capacity=16)
    yield b
    b.close()


def wait_for(pred, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_endpoint_carries_a_random_token_address_does_not():
    a, b = GroupReceiver(), GroupReceiver()
    try:
        assert "#" not in a.address and a.sender_endpoint.startswith(a.address + "#")
        token = a.sender_endpoint.split("#", 1)[1]
        assert len(token) >= 40 and token != b.sender_endpoint.split("#", 1)[1]
        tx = GroupSender(a.sender_endpoint)
        assert token not in tx.address and token not in repr(tx.__dict__.get("address"))
        tx.close(linger_ms=0)
    finally:
        a.close()
        b.close()


def test_forged_status_frame_is_dropped_and_not_applied(buf):
    # today: a forged status frame set accounting/lost to 1e9 and stalled get_batch
    forger = raw_pusher(buf.receiver.address)
    forger.send_multipart(encode_status(RolloutStatus(pushed=10**9, drawn=10**9)))
    forger.send_multipart([b"wrong-token", *encode_status(RolloutStatus(pushed=10**9, drawn=10**9))])
    tx = GroupSender(buf.address)
    tx.send(make_group("real"), RolloutStatus(drawn=1, pushed=1))
    assert buf.get_batch(trainer_version=3, timeout_s=5)[0].group_id == "real"
    # PULL fair-queues between peers: the real sender's frame may be read before the forger's two
    wait_for(lambda: buf.receiver.counters["rejected_auth"] == 2)
    assert buf.receiver.counters["rejected_auth"] == 2
    assert buf.accounting()["lost"] == 0
    tx.close(linger_ms=0)
    forger.close()


def test_garbage_payload_under_a_good_header_is_never_kept(buf):
    # today: kept, and the next checkpoint (snapshot) failed decoding it
    tx = GroupSender(buf.address)
    header, payload = encode_group(make_group("bad"), RolloutStatus(drawn=1, pushed=1))
    tx.send_frames([header, b"\x93garbage-not-a-group"])
    other = msgspec.msgpack.encode(make_group("someone-else"))
    tx.send_frames([encode_group(make_group("swapped"))[0], other])  # a payload that is another group
    fewer = make_group("fewer", accs=(True,))  # header says two samples (accs), payload has one
    tx.send_frames([encode_group(make_group("fewer"))[0], msgspec.msgpack.encode(fewer)])
    tx.send(make_group("good"), RolloutStatus(drawn=4, pushed=4))
    wait_for(lambda: buf.receiver.counters["frames"] == 4)
    assert buf.receiver.counters["rejected_malformed"] == 3
    # the checkpoint path decodes every kept group; cut at the one group frame that was not rejected (the frame
    # counter moves when a frame is read, before the buffer thread files it)
    assert [g.group_id for g in buf.snapshot(pushed=1, timeout_s=5.0)] == ["good"]
    tx.close(linger_ms=0)


@pytest.mark.parametrize(
    "status",
    [RolloutStatus(pushed=-1), RolloutStatus(in_flight=2**60), RolloutStatus(pending={-3: 1}), RolloutStatus(drawn=-5)],
)
def test_impossible_status_counters_are_rejected(status):
    rx = GroupReceiver()
    tx = GroupSender(rx.sender_endpoint)
    try:
        tx.send_status(status)
        tx.send_status(RolloutStatus(drawn=2))
        frame = rx.recv_frame(timeout_ms=5000)
        assert frame.header.status.drawn == 2 and rx.last_status.drawn == 2
        assert rx.counters["rejected_malformed"] == 1
    finally:
        tx.close(linger_ms=0)
        rx.close()


def test_header_only_group_with_a_payload_and_status_with_payload_are_rejected():
    rx = GroupReceiver()
    tx = GroupSender(rx.sender_endpoint)
    try:
        g = make_group("x")
        head = msgspec.msgpack.encode(FrameHeader(kind="group", group=group_meta(g, has_payload=False)))
        tx.send_frames([head, msgspec.msgpack.encode(g)])
        tx.send_frames([encode_status(RolloutStatus())[0], b"smuggled"])
        tx.send(make_group("ok"))
        assert rx.recv(timeout_ms=5000).group_id == "ok"
        assert rx.counters["rejected_malformed"] == 2
    finally:
        tx.close(linger_ms=0)
        rx.close()


def test_header_min_version_that_disagrees_with_the_samples_is_rejected_at_the_socket(buf):
    # the buffer orders and drops groups by the header's min_version: a header claiming newer tokens than the payload
    # holds would slip a too-stale group past the staleness bound (formerly caught only when the group was decoded)
    g = make_group("liar")  # versions are all 3
    tx = GroupSender(buf.address)
    meta = msgspec.structs.replace(group_meta(g), min_version=7)
    head = msgspec.msgpack.encode(FrameHeader(kind="group", group=meta, status=RolloutStatus(drawn=1, pushed=1)))
    tx.send_frames([head, encode_group(g)[1]])
    tx.send(make_group("honest"), RolloutStatus(drawn=2, pushed=2))
    wait_for(lambda: buf.receiver.counters["frames"] == 2)
    assert buf.receiver.counters["rejected_malformed"] == 1
    assert [x.group_id for x in buf.get_batch(trainer_version=3, timeout_s=5)] == ["honest"]
    assert buf.accounting()["lost"] == 1  # pushed by the manager, never kept: counted, not silently gone
    tx.close(linger_ms=0)


def test_oversized_message_is_cut_off_by_zmq():
    rx = GroupReceiver(max_message_bytes=64 * 1024)
    tx = GroupSender(rx.sender_endpoint)
    try:
        tx.send(make_group("huge", n_tokens=50_000))  # ~0.5 MB > 64 KiB: ZMQ drops it (and the connection)
        assert rx.recv(timeout_ms=1000) is None
        assert rx._sock.getsockopt(zmq.MAXMSGSIZE) == 64 * 1024
    finally:
        tx.close(linger_ms=0)
        rx.close()
    rx = GroupReceiver(max_message_bytes=64 * 1024)
    tx = GroupSender(rx.sender_endpoint)
    try:
        tx.send(make_group("small"))
        assert rx.recv(timeout_ms=5000).group_id == "small"
    finally:
        tx.close(linger_ms=0)
        rx.close()
