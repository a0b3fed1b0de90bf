"""ZMQ transport: round trip, schema-version rejection, malformed frames, status frames, non-blocking backpressure."""

import platform
import resource

import msgspec
import pytest
import zmq

from pipeline.contracts.records import SCHEMA_VERSION, Group, Sample
from pipeline.flow.transport import (
    FrameHeader,
    GroupReceiver,
    GroupSender,
    RolloutStatus,
    decode_group,
    encode_group,
    encode_status,
)


def make_group(gid="g1", accs=(True, False), version=3, n_tokens=5) -> Group:
    samples = [
        Sample(
            prompt_id="p1",
            group_id=gid,
            index=i,
            prompt_ids=[7, 8, 9],
            response_ids=list(range(100 + i, 100 + i + n_tokens)),
            logprobs=[-0.125 * k for k in range(n_tokens)],
            versions=[version] * (n_tokens - 1) + [version + 1],
            finish_reason="stop",
            reward=1.0 if a else -1.0,
            task_reward=1.0 if a else -1.0,
            acc=a,
            max_new_tokens=64,
        )
        for i, a in enumerate(accs)
    ]
    return Group(prompt_id="p1", group_id=gid, samples=samples, answer="42", attempt=1, epoch=2)


@pytest.fixture
def pair():
    rx = GroupReceiver()
    tx = GroupSender(rx.sender_endpoint)
    yield tx, rx
    tx.close(linger_ms=0)
    rx.close()


def test_receiver_binds_loopback_on_a_free_port(pair):
    _, rx = pair
    assert rx.address.startswith("tcp://127.0.0.1:")
    assert int(rx.address.rsplit(":", 1)[1]) > 0


def test_round_trip_is_exact_and_carries_metadata(pair):
    tx, rx = pair
    g = make_group()
    status = RolloutStatus(version=4, drawn=9, pushed=1, requeued=2, in_flight=6, pending={3: 5, 4: 1})
    tx.send(g, status)
    frame = rx.recv_frame(timeout_ms=5000)
    assert frame.header.kind == "group"
    meta = frame.header.group
    assert (meta.group_id, meta.min_version, meta.accs, meta.n_tokens) == ("g1", 3, [True, False], 10)
    assert rx.last_status == status and rx.last_status.pending == {3: 5, 4: 1}
    back = decode_group(frame.payload.buffer)
    assert back == g
    assert back.samples[1].logprobs == [0.0, -0.125, -0.25, -0.375, -0.5]
    tx.send(g)
    assert rx.recv(timeout_ms=5000) == g


def test_schema_mismatch_is_rejected_counted_and_skipped(pair):
    tx, rx = pair
    good = encode_group(make_group("good"))
    bad_header = msgspec.msgpack.encode(FrameHeader(schema=SCHEMA_VERSION + 1, kind="group"))
    tx.send_frames([bad_header, good[1]])
    old = make_group("old")
    old.schema = SCHEMA_VERSION + 7  # header fine, payload from another code version
    tx.send_frames([good[0], msgspec.msgpack.encode(old)])
    tx.send_frames(good)
    got = rx.recv(timeout_ms=5000)
    assert got.group_id == "good"
    assert rx.counters["rejected_schema"] == 2
    assert rx.counters["rejected_malformed"] == 0
    assert rx.recv(timeout_ms=50) is None


def test_malformed_frames_do_not_crash(pair):
    tx, rx = pair
    tx.send_frames([b"\xc1garbage", b""])  # 0xc1 is never valid msgpack
    tx._sock.send(b"one part only")  # without the sender token: rejected before anything is decoded
    tx.send_frames(encode_status(RolloutStatus(drawn=3)))
    frame = rx.recv_frame(timeout_ms=5000)
    assert frame.header.kind == "status" and frame.header.status.drawn == 3
    assert rx.counters["rejected_malformed"] == 1 and rx.counters["rejected_auth"] == 1 and rx.counters["frames"] == 3


def test_recv_skips_status_and_header_only_groups(pair):
    tx, rx = pair
    tx.send_frames(encode_status(RolloutStatus(drawn=1)))
    tx.send_frames(encode_group(make_group("filtered", accs=(True, True)), payload=False))
    tx.send(make_group("kept"))
    assert rx.recv(timeout_ms=5000).group_id == "kept"
    assert rx.counters["frames"] == 3


def test_post_never_blocks_and_keeps_order_under_backpressure():
    rx = GroupReceiver(hwm=1)
    tx = GroupSender(rx.sender_endpoint, hwm=1)
    try:
        n = 40
        big = make_group(n_tokens=20_000)  # ~0.5 MB per frame: the pipes fill up
        queued = [tx.post(encode_group(msgspec.structs.replace(big, group_id=f"g{i}"))) for i in range(n)]
        assert not all(queued) and tx.backlog > 0  # some waited in the outbox instead of blocking
        got = []
        while len(got) < n:
            tx.flush()
            g = rx.recv(timeout_ms=200)
            if g is not None:
                got.append(g.group_id)
        assert got == [f"g{i}" for i in range(n)]
        assert tx.flush() and tx.backlog == 0
    finally:
        tx.close(linger_ms=0)
        rx.close()


def test_send_times_out_when_nobody_reads():
    ctx = zmq.Context.instance()
    sink = ctx.socket(zmq.PULL)
    sink.setsockopt(zmq.RCVHWM, 1)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    tx = GroupSender(f"tcp://127.0.0.1:{port}", hwm=1)
    try:
        with pytest.raises(TimeoutError, match="not draining"):
            for i in range(200):
                tx.send(make_group(f"g{i}", n_tokens=20_000), timeout_ms=200)
    finally:
        tx.close(linger_ms=0)
        sink.close(linger=0)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc's mallopt")
def test_held_messages_reuse_the_memory_of_consumed_ones_instead_of_faulting_in_new_pages(pair):
    # today (glibc defaults): every held 0.3 MB message was faulted in afresh, ~70 minor faults each
    tx, rx = pair  # the receiver tuned malloc for this process
    frames = [encode_group(make_group(f"g{i}", n_tokens=8_000)) for i in range(2)]
    assert len(frames[0][1]) > 250_000

    def hold(n: int) -> list:
        for i in range(n):
            tx.send_frames(frames[i % 2])
        return [rx.recv_frame(timeout_ms=5000) for _ in range(n)]

    held = hold(60)  # first touch of this much memory: faults are expected here
    assert all(f is not None for f in held)
    del held  # the trainer took these groups: their memory goes back to malloc, and stays in the process
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = hold(60)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert all(f is not None for f in held)
    assert faults < 60 * 10, f"{faults} page faults for 60 held messages (~70 each would mean fresh memory)"


def test_received_frame_gives_each_samples_min_version_and_minus_one_without_tokens():
    g = make_group("v", accs=(True, False, True), version=5, n_tokens=4)
    g.samples[0].versions = [9, 6, 7, 8]
    g.samples[1].response_ids, g.samples[1].logprobs, g.samples[1].versions = [], [], []
    rx = GroupReceiver()
    tx = GroupSender(rx.sender_endpoint)
    try:
        tx.send(g)
        frame = rx.recv_frame(timeout_ms=5000)
    finally:
        tx.close(linger_ms=0)
        rx.close()
    mins = frame.min_versions.tolist()
    assert mins == [6, -1, 5] and frame.header.group.min_version == -1  # the group min counts the empty sample
    back = decode_group(frame.payload, arrays=True)
    assert [s.min_version for s in back.samples] == mins
    assert back.samples[1].response_ids.size == 0 and back.samples[2].versions.tolist() == [5, 5, 5, 6]
    assert decode_group(encode_group(g)[1]) == g  # the list form is unchanged


def test_decoded_samples_share_no_mutable_field_and_every_field_round_trips():
    # samples are decoded as copies of one template with their fields set: a field the decoder forgot would keep the
    # template's value, shared by every sample of every group
    g = make_group("t", accs=(True, False, True))
    g.samples[2].finish_reason, g.samples[2].reward_failed, g.samples[1].task_reward = "length", "TimeoutError", 0.5
    for arrays in (False, True):
        back = decode_group(encode_group(g)[1], arrays=arrays)
        for field in Sample.__struct_fields__:
            values = [getattr(s, field) for s in back.samples]
            expected = [getattr(s, field) for s in g.samples]
            got = [v.tolist() if hasattr(v, "tolist") else bytes(v) if isinstance(v, memoryview) else v for v in values]
            assert got == expected, field
            if isinstance(values[0], list | dict | set | bytearray):
                assert values[0] is not values[1], f"samples share their {field}"
