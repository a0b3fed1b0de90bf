"""RolloutBuffer: filter counters, exact batch size, staleness drops, oldest-first/EDF ordering, accounting,
backpressure at capacity, checkpoint cut and restore. Real ZMQ; frames sent by hand."""

import time
from pathlib import Path

import pytest

from pipeline.algorithm.filters import dynamic_sampling_filter
from pipeline.contracts.records import Group, Sample
from pipeline.flow.buffer import RolloutBuffer
from pipeline.flow.transport import GroupReceiver, GroupSender, RolloutStatus, encode_group, encode_status
from pipeline.runtime.steps import step_metrics

MIXED, ALL_RIGHT, ALL_WRONG = (True, False), (True, True), (False, False)


def group(gid: str, accs=MIXED, version: int = 0, start: int | None = None) -> Group:
    samples = [
        Sample(
            prompt_id=f"p-{gid}",
            group_id=gid,
            index=i,
            prompt_ids=[1, 2],
            response_ids=[10, 11, 12],
            logprobs=[-0.5, -0.5, -0.5],
            versions=[version] * 3,
            acc=a,
        )
        for i, a in enumerate(accs)
    ]
    return Group(prompt_id=f"p-{gid}", group_id=gid, samples=samples)


class Feed:
    """Sends groups with a manager-like status (counters consistent with what was sent)."""

    def __init__(self, address: str, dynamic_sampling: bool = True):
        self.tx = GroupSender(address)
        self.status = RolloutStatus()
        self.dynamic_sampling = dynamic_sampling  # decided here, as the manager does, and sent in the header

    def admit(self, version: int, n: int = 1) -> None:
        self.status.drawn += n
        self.status.in_flight += n
        self.status.pending[version] = self.status.pending.get(version, 0) + n
        self.tx.send_frames(encode_status(self.status))

    def push(self, g: Group, start: int | None = None, payload: bool = True) -> None:
        start = g.min_version if start is None else start
        if self.status.pending.get(start, 0) == 0:
            self.admit(start)
        self.status.pending[start] -= 1
        if not self.status.pending[start]:
            del self.status.pending[start]
        self.status.in_flight -= 1
        self.status.pushed += 1
        decision = dynamic_sampling_filter(g) if self.dynamic_sampling else None
        drop = "" if decision is None or decision.keep else decision.reason
        self.tx.send_frames(encode_group(g, self.status, start_version=start, payload=payload, drop_reason=drop))

    def close(self):
        self.tx.close(linger_ms=0)


@pytest.fixture
def make():
    made = []

    def build(batch_size=2, max_staleness=1, dynamic_sampling=True, capacity=8, sync_every=1):
        buf = RolloutBuffer(GroupReceiver(), batch_size, max_staleness, capacity, sync_every)
        feed = Feed(buf.address, dynamic_sampling)
        made.append((buf, feed))
        return buf, feed

    yield build
    for buf, feed in made:
        feed.close()
        buf.close()


def settle(buf: RolloutBuffer, received: int) -> None:
    assert buf.wait_received(received, 5.0)


def test_puller_survives_a_waiter_that_has_not_woken_yet(make):
    # A wait_received target reached while its waiter has not yet re-taken the lock (still listed as awaited): the
    # puller notified it a second time after its drain pause without holding the lock, and died of the
    # RuntimeError; nothing was received after that.
    buf, feed = make(batch_size=1, capacity=8)
    with buf._cond:
        buf._awaited.append(1)  # the state between the puller's notify and the waiter's wake-up
    feed.push(group("a"))
    settle(buf, 1)
    time.sleep(0.05)  # past the drain pause
    with buf._cond:
        buf._awaited.remove(1)
    feed.push(group("b"))
    settle(buf, 2)
    assert [g.group_id for g in buf.get_batch(0, 1.0, size=1) + buf.get_batch(0, 1.0, size=1)] == ["a", "b"]


def test_filter_counts_by_reason_and_batches_are_exact(make):
    buf, feed = make(batch_size=2)
    for i, accs in enumerate([MIXED, ALL_RIGHT, MIXED, ALL_WRONG, ALL_WRONG, MIXED, MIXED, MIXED]):
        feed.push(group(f"g{i}", accs))
    settle(buf, 8)
    m = buf.metrics()
    assert (m["filter/kept"], m["filter/drop_all_correct"], m["filter/drop_all_wrong"]) == (5, 1, 2)
    assert m["filter/dropped"] == 3 and m["buffer/size"] == 5
    first, second = buf.get_batch(0, 1.0), buf.get_batch(0, 1.0)
    assert [g.group_id for g in first + second] == ["g0", "g2", "g5", "g6"]  # arrival order within a version
    with pytest.raises(TimeoutError, match="held 1 kept groups"):
        buf.get_batch(0, 0.2)  # one left: never a short batch
    assert buf.metrics()["buffer/trained"] == 4


def test_dynamic_sampling_off_keeps_everything(make):
    buf, feed = make(batch_size=3, dynamic_sampling=False)
    for i, accs in enumerate([ALL_RIGHT, ALL_WRONG, MIXED]):
        feed.push(group(f"g{i}", accs))
    assert [g.group_id for g in buf.get_batch(0, 5.0)] == ["g0", "g1", "g2"]


def test_stale_groups_are_dropped_at_consumption(make):
    buf, feed = make(batch_size=2, max_staleness=1, capacity=8)
    feed.push(group("old", version=0))
    feed.push(group("mid", version=1))
    feed.push(group("new", version=2))
    settle(buf, 3)
    batch = buf.get_batch(trainer_version=2, timeout_s=1.0)
    assert [g.group_id for g in batch] == ["mid", "new"]  # 2 - 0 > 1: "old" is stale
    m = buf.metrics()
    assert m["filter/drop_stale"] == 1 and m["buffer/staleness_max"] == 1 and m["buffer/staleness_mean"] == 0.5
    assert buf.accounting()["filtered"] == 1


def test_oldest_start_version_first(make):
    buf, feed = make(batch_size=2, max_staleness=2)
    feed.push(group("v2", version=2))
    feed.push(group("v1", version=1))
    feed.push(group("v0", version=0))
    settle(buf, 3)
    assert [g.group_id for g in buf.get_batch(2, 1.0)] == ["v0", "v1"]


def _v0_generating_v1_held(make, max_staleness: int):
    """B=2: a group admitted under v0 is still generating; two v1 groups "a", "b" are kept in the buffer."""
    buf, feed = make(batch_size=2, max_staleness=max_staleness)
    feed.admit(0)
    feed.push(group("a", version=1))
    feed.push(group("b", version=1))
    settle(buf, 2)
    return buf, feed


def test_waits_for_an_older_unresolved_group_whose_deadline_is_now(make):
    # s=1, B=2, trainer at v1: a group admitted under v0 is still generating. Handing out the two v1 groups would
    # leave it for trainer version 2, where it is stale: EDF says wait (slots after this batch for w=0: 0).
    buf, feed = _v0_generating_v1_held(make, max_staleness=1)
    with pytest.raises(TimeoutError, match=r"may still be kept, by start version \{0: 1\}"):
        buf.get_batch(1, 0.3)
    feed.push(group("late", version=0))
    assert [g.group_id for g in buf.get_batch(1, 5.0)] == ["late", "a"]


def test_does_not_wait_when_the_older_group_has_slack(make):
    # Same, with s=2: the v0 group can still go in the next batch (trainer v2), so the v1 groups go now.
    buf, feed = _v0_generating_v1_held(make, max_staleness=2)
    assert [g.group_id for g in buf.get_batch(1, 1.0)] == ["a", "b"]


def test_sync_every_counts_batches_left_at_a_version(make):
    # E=2, s=1, B=1, trainer at v1: a v0 group is unresolved; it may still go in the 2nd v1 batch, so the 1st v1
    # batch can take a v1 group (slots after it for w=0: (0+1-1)*2 + (2-0) - 1 = 1); the 2nd batch cannot (0).
    buf, feed = make(batch_size=1, max_staleness=1, sync_every=2)
    feed.admit(0)
    feed.push(group("y", version=1))
    settle(buf, 1)
    assert [g.group_id for g in buf.get_batch(1, 1.0)] == ["y"]
    feed.push(group("z", version=1))
    settle(buf, 2)
    with pytest.raises(TimeoutError):
        buf.get_batch(1, 0.3)
    feed.push(group("old", version=0))
    assert [g.group_id for g in buf.get_batch(1, 5.0)] == ["old"]


def test_parts_of_a_batch_are_the_whole_batch_in_order(make):
    # A step's batch taken in parts (streamed mini-batches) is the batch taken at once: the same groups, in order.
    ids = ["v1a", "v0a", "v1b", "v0b"]
    whole, feed = make(batch_size=4, max_staleness=1)
    parts, feed2 = make(batch_size=4, max_staleness=1)
    for f in (feed, feed2):
        for gid in ids:
            f.push(group(gid, version=int(gid[1])))
    settle(whole, 4)
    settle(parts, 4)
    want = [g.group_id for g in whole.get_batch(1, 1.0)]
    taken = [g for k in (2, 1, 1) for g in parts.get_batch(1, 1.0, size=k)]
    assert want == [g.group_id for g in taken] == ["v0a", "v0b", "v1a", "v1b"]
    assert parts.metrics()["buffer/trained"] == 4
    # the buffer's staleness is its last part's (v1b: 0); the step's, over all its parts, is the runtime's, and the
    # buffer's metrics (merged into the step's record after it) never overwrite it: the step used to report 0 here
    assert parts.metrics()["buffer/staleness_max"] == 0.0
    step = step_metrics(taken, [{}], 1, 0.0, 0.0)
    assert step["staleness/max"] == 1.0 and step["staleness/mean"] == 0.5 and not set(step) & set(parts.metrics())
    with pytest.raises(ValueError, match="size 5 not in 1..batch_size=4"):
        parts.get_batch(1, 1.0, size=5)


def test_a_part_waits_for_an_older_group_whose_deadline_is_this_step(make):
    # s=1, B=2, trainer at v1, a v0 group still generating: its last chance is this step's batch. The first part
    # (1 group) may take a v1 group -- the v0 group still fits the second part -- but the second part may not.
    buf, feed = _v0_generating_v1_held(make, max_staleness=1)
    assert [g.group_id for g in buf.get_batch(1, 1.0, size=1)] == ["a"]
    with pytest.raises(TimeoutError, match=r"may still be kept, by start version \{0: 1\}"):
        buf.get_batch(1, 0.3, size=1)
    feed.push(group("late", version=0))
    assert [g.group_id for g in buf.get_batch(1, 5.0, size=1)] == ["late"]
    assert [g.group_id for g in buf.get_batch(2, 5.0, size=1)] == ["b"]  # the next step (trainer v2)


def test_accounting_identity_from_the_status_cut(make):
    buf, feed = make(batch_size=1)
    feed.admit(0, 6)  # drawn 6
    feed.push(group("k1"))
    feed.push(group("f1", ALL_RIGHT), payload=False)  # filtered at the manager: header only
    feed.push(group("k2"))
    feed.status.requeued += 1  # one re-queued
    feed.status.in_flight -= 1
    feed.status.pending[0] -= 1
    feed.tx.send_frames(encode_status(feed.status))
    deadline = time.monotonic() + 5
    while buf.accounting()["requeued"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    buf.get_batch(0, 1.0)
    acc = buf.accounting()
    assert acc == {
        "drawn": 6,
        "trained": 1,
        "filtered": 1,
        "requeued": 1,
        "in_flight": 2,
        "buffered": 1,
        "received": 3,
        "pushed": 3,
        "lost": 0,
        "balanced": 1,
    }


def test_kept_group_without_payload_is_counted_not_lost(make):
    buf, feed = make(batch_size=1)
    feed.push(group("odd", MIXED), payload=False)
    settle(buf, 1)
    assert buf.metrics()["filter/drop_no_payload"] == 1 and buf.accounting()["balanced"] == 1


def test_full_buffer_stops_pulling(make):
    buf, feed = make(batch_size=1, max_staleness=0, capacity=2)
    assert buf.capacity == 2
    for i in range(6):
        feed.push(group(f"g{i}"))
    time.sleep(0.5)
    assert buf.metrics()["buffer/size"] == 2  # the rest waits in ZMQ
    got = [buf.get_batch(0, 5.0)[0].group_id for _ in range(6)]
    assert got == [f"g{i}" for i in range(6)]


def test_capacity_is_raised_to_what_the_admission_rule_allows(make):
    buf, _ = make(batch_size=4, max_staleness=1, capacity=3, sync_every=2)
    assert buf.capacity == (1 + 1) * 2 * 4


def test_checkpoint_cut_snapshot_and_restore(make):
    buf, feed = make(batch_size=1)
    for i, accs in enumerate([MIXED, ALL_WRONG, MIXED, MIXED]):
        feed.push(group(f"g{i}", accs))
    settle(buf, 4)
    buf.get_batch(0, 1.0)  # g0 trained
    # The manager's state was taken after 3 pushes: g3 is regenerated on resume, so it is not in the checkpoint.
    state, groups = buf.state_dict(pushed=3), buf.snapshot(pushed=3)
    assert [g.group_id for g in groups] == ["g2"]
    assert state == {"received": 3, "counts": {"trained": 1, "all_wrong": 1, "kept": 1}}
    new, feed2 = make(batch_size=1)
    new.restore(groups)
    new.load_state_dict(state)
    feed2.status = RolloutStatus(drawn=5, pushed=3, requeued=1, in_flight=1, pending={0: 1})  # resumed manager
    feed2.tx.send_frames(encode_status(feed2.status))
    deadline = time.monotonic() + 5
    while new.accounting()["drawn"] != 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    acc = new.accounting()
    assert (acc["trained"], acc["filtered"], acc["buffered"], acc["received"], acc["balanced"]) == (1, 1, 1, 3, 1)
    feed2.push(group("g3b"))
    assert [g.group_id for g in new.get_batch(0, 5.0)] == ["g2"]
    assert [g.group_id for g in new.get_batch(0, 5.0)] == ["g3b"]


class _Built(Exception):
    """Raised right after a RolloutBuffer is built: the test needs the buffer, not the run."""


def test_the_loop_builds_the_buffer_the_simulator_tests(tmp_path, monkeypatch):
    """With weight_sync.every > 1 the training loop's buffer must have the simulator's sync period and capacity:
    the simulator is where the capacity and deadline rule is tested."""
    from pipeline.config import load_config
    from pipeline.runtime.train import train
    from pipeline.testing.rollout_sim import SimEngineClient, run_sim, sim_config

    built = []
    real_init = RolloutBuffer.__init__

    def record(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append((self.B, self.s, self.E, self.capacity))
        self.close()
        raise _Built

    monkeypatch.setattr(RolloutBuffer, "__init__", record)
    root = Path(__file__).resolve().parents[1]
    overrides = ["weight_sync.every=3", "rollout.max_staleness=1", "trainer.batch_size=4", "rollout.buffer_capacity=0"]
    cfg = load_config(root / "configs" / "tiny-cpu.yaml", overrides + [f"logging.dir={tmp_path}"])
    with pytest.raises(_Built):
        train(cfg)
    sim = sim_config(every=3, max_staleness=1, batch_size=4)
    with pytest.raises(_Built):
        run_sim(sim, SimEngineClient(), [], steps=1)
    loop, simulated = built
    # (max_staleness + 1) * every * batch = 24 groups may exist unconsumed under the admission rule
    assert simulated == (4, 1, 3, 24)
    assert loop == simulated


def test_many_groups_and_a_restore_come_out_by_start_version_then_arrival(make):
    """The buffer's indexes (by start version, stale heap) give the order a full sort by (start version, arrival)
    gives, restored groups first within their version, and the staleness of what was handed out."""
    buf, feed = make(batch_size=1, max_staleness=3, capacity=16)
    versions = [1, 0, 1, 0, 2, 1, 0]
    for i, v in enumerate(versions):
        feed.push(group(f"a{i}", version=v))
    settle(buf, len(versions))
    buf.restore([group("r0", version=1), group("r1", version=0)])  # put back ahead of the arrivals
    got = [buf.get_batch(3, 1.0)[0].group_id for _ in range(len(versions) + 2)]
    assert got == ["r1", "a1", "a3", "a6", "r0", "a0", "a2", "a5", "a4"]
    assert buf.metrics()["buffer/staleness_max"] == 1.0  # the last one handed out, a4, started at version 2
    feed.push(group("old", version=0))
    feed.push(group("new", version=1))
    settle(buf, len(versions) + 2)
    assert [g.group_id for g in buf.get_batch(4, 1.0)] == ["new"]  # "old" is 4 versions behind: dropped as stale
    acc = buf.accounting()
    assert (acc["filtered"], acc["trained"], acc["buffered"]) == (1, len(versions) + 3, 0)
