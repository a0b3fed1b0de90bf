"""The loop's view of the engines' weights (pipeline.runtime.weight_sync.coordinator.WeightSyncCoordinator): which version a sync carries, and when a
replaced engine joins the rotation. Stand-in Ray actors record every call the loop makes, in order."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from pipeline.config import load_config
from pipeline.contracts.records import Group, Sample
from pipeline.runtime.groups import EngineGroup, RolloutHandle, TrainerGroup
from pipeline.runtime.steps import streamed_step
from pipeline.runtime.weight_sync.coordinator import WeightSyncCoordinator

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


@ray.remote(num_cpus=0)
class Recorder:
    """Plays the rollout actor and a trainer rank (stage 0, the sync source)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.fail_next = False

    def _record(self, *call):
        self.calls.append(call)

    def before_weight_update(self):
        self._record("pause")

    def after_weight_update(self, version):
        self._record("resume", version)

    def drop_engines(self, urls):
        self._record("drop", urls)

    def add_engines(self, urls):
        self._record("add", urls)

    def reconnect_weight_sync(self, urls, tp):
        self._record("group", urls)

    def sync_weights(self, version, pause=True):
        self._record("sync", version)
        if self.fail_next:  # as a sync that met a hung engine does, after weight_sync.timeout_s
            self.fail_next = False
            raise RuntimeError("weight sync: bucket 0 failed: no answer within weight_sync.timeout_s: e1")
        return {}

    def train_minibatch(self, mbs):
        self._record("train", sorted({int(t) for mb in mbs for t in mb.input_ids[:, 0]}))  # token 0 names the group
        return {"pg_loss": float(len(self.calls)), "local_tokens": 10.0}

    def error(self):  # the rollout can go on
        return ""

    def fail_next_sync(self):
        self.fail_next = True

    def take(self):
        calls, self.calls = self.calls, []
        return calls


class FakeCluster:
    def __init__(self):
        self.urls, self.restarts, self.findings = ["e0", "e1"], [0, 0], []

    def heal_engines(self, model_dir):
        """What successive health checks find: old url -> new url (None: dropped)."""
        replaced = self.findings.pop(0) if self.findings else {}
        for old, new in replaced.items():
            self.urls[self.urls.index(old)] = new
            self.restarts[0] += new is not None
        return replaced

    @property
    def live_urls(self):
        return [u for u in self.urls if u]


class FakeEval:
    def __init__(self):
        self.calls = []

    def drop_engines(self, urls):
        self.calls.append(("drop", urls))

    def add_engines(self, urls):
        self.calls.append(("add", urls))


def _coordinator(cfg, cluster, rec, version, evaluator):
    """The engine group, trainer group (one rank, stage 0) and rollout, with `rec` playing the rollout and the rank."""
    trainers, rollout = TrainerGroup([rec], [0]), RolloutHandle(rec)
    group = EngineGroup(cfg, cluster, "model", trainers)
    group.subscribe(rollout, evaluator)
    return WeightSyncCoordinator(cfg, group, trainers, rollout, version)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=1, include_dashboard=False, namespace="weightstest")
    yield
    ray.shutdown()


def test_versions_and_the_order_a_replaced_engine_joins_in(ray_local):
    cfg = load_config(TINY)
    rec, cluster, evaluator = Recorder.remote(), FakeCluster(), FakeEval()
    engines = _coordinator(cfg, cluster, rec, 3, evaluator)

    assert engines.update() == {} and ray.get(rec.take.remote()) == []  # all well, nothing to publish: no sync

    # A replaced engine before the trainer stepped: the same weights again, as the same version; it joins the
    # rollout and the evaluator only after the sync gave it those weights.
    cluster.findings = [{"e1": "e2"}]
    engines.update()
    assert engines.version == 3
    assert ray.get(rec.take.remote()) == [
        ("drop", ["e1"]), ("group", ["e0", "e2"]), ("pause",), ("sync", 3), ("add", ["e2"]), ("resume", 3),
    ]  # fmt: skip
    assert evaluator.calls == [("drop", ["e1"]), ("add", ["e2"])]

    # The trainer stepped, then an engine is replaced: the weights moved on, so the re-sync is a new version.
    engines.trainer_stepped()
    cluster.findings = [{"e0": "e3"}]
    assert engines.update()["engine/restarts"] == 2
    assert engines.version == 4
    assert [c for c in ray.get(rec.take.remote()) if c[0] in ("sync", "add")] == [("sync", 4), ("add", ["e3"])]

    # Publishing always makes a new version, and the next heal-only check after it keeps it.
    engines.trainer_stepped()
    engines.update(publish=True)
    assert engines.version == 5 and ("sync", 5) in ray.get(rec.take.remote())
    cluster.findings = [{"e3": None}]  # dropped after engine.max_restarts: nobody joins
    engines.update()
    assert engines.version == 5
    assert ray.get(rec.take.remote()) == [("drop", ["e3"]), ("group", ["e2"]), ("pause",), ("sync", 5), ("resume", 5)]


def test_an_engine_that_fails_the_sync_is_replaced_and_the_sync_repeated(ray_local):
    cfg = load_config(TINY)
    rec, cluster = Recorder.remote(), FakeCluster()
    engines = _coordinator(cfg, cluster, rec, 0, None)
    engines.trainer_stepped()
    ray.get(rec.fail_next_sync.remote())
    cluster.findings = [{}, {"e1": "e2"}]  # before the sync all is well; after it fails, e1 is found hung
    engines.update(publish=True)
    assert engines.version == 1
    assert ray.get(rec.take.remote()) == [
        ("pause",), ("sync", 1), ("drop", ["e1"]), ("group", ["e0", "e2"]), ("sync", 1), ("add", ["e2"]), ("resume", 1),
    ]  # fmt: skip

    # With engine.max_restarts = 0 the engine that failed the sync is dropped, and the sync repeated without it.
    engines.engines.cfg = load_config(TINY, ["engine.max_restarts=0"])
    ray.get(rec.fail_next_sync.remote())
    cluster.findings = [{}, {"e2": None}]
    engines.update(publish=True)
    assert engines.version == 2
    assert ray.get(rec.take.remote()) == [
        ("pause",), ("sync", 2), ("drop", ["e2"]), ("group", ["e0"]), ("sync", 2), ("resume", 2),
    ]  # fmt: skip

    ray.get(rec.fail_next_sync.remote())  # a failure no health check explains (all engines well) stops the run
    with pytest.raises(ray.exceptions.RayTaskError, match="no answer within"):
        engines.update(publish=True)
    assert ray.get(rec.take.remote())[-1] == ("resume", 3)  # the rollout is never left paused


class FakeBuffer:
    """Hands out groups `size` at a time; the first wait for the second part times out (a dead engine stalls it)."""

    def __init__(self, groups):
        self.groups, self.calls = groups, []

    def get_batch(self, trainer_version, timeout_s, size=None):
        self.calls.append((trainer_version, size))
        if len(self.calls) == 2:
            raise TimeoutError("buffer: no batch within 5.0s")
        out, self.groups = self.groups[:size], self.groups[size:]
        return out


def _group(i: int) -> Group:
    samples = [
        Sample(
            prompt_id=f"p{i}", group_id=f"g{i}", index=j, prompt_ids=[i], response_ids=[7, 8], logprobs=[-1.0, -1.0],
            versions=[0, 0], reward=float(j), acc=bool(j), max_new_tokens=4,
        )
        for j in range(2)
    ]  # fmt: skip
    return Group(prompt_id=f"p{i}", group_id=f"g{i}", samples=samples)


def test_a_streamed_step_trains_each_part_as_it_arrives(ray_local):
    # B=4 in 2 parts: part 1 goes to the rank before part 2 is waited for. While waiting, an engine is replaced:
    # the re-sync runs after the queued mini-batch, so it carries weights the step has moved -- a new version.
    cfg = load_config(
        TINY, ["trainer.batch_size=4", "trainer.num_minibatches=2", "rollout.n_samples_per_prompt=2",
               "trainer.micro_batch_size=4", "engine.request_timeout_s=60"],
    )  # fmt: skip
    rec, cluster = Recorder.remote(), FakeCluster()
    engines = _coordinator(cfg, cluster, rec, 3, None)
    buffer = FakeBuffer([_group(i) for i in range(1, 5)])
    cluster.findings = [{"e1": "e2"}]
    groups, rank_metrics, _, healed = streamed_step(cfg, buffer, engines, engines.trainers, parts=2)
    assert [g.group_id for g in groups] == ["g1", "g2", "g3", "g4"]
    assert buffer.calls == [(3, 2), (3, 2), (4, 2)]  # the part after the re-sync is checked against v4
    calls = [c for c in ray.get(rec.take.remote()) if c[0] in ("train", "sync", "add")]
    assert calls == [("train", [1, 2]), ("sync", 4), ("add", ["e2"]), ("train", [3, 4])]
    assert healed["engine/restarts"] == 1 and engines.version == 4
    # the step's metrics: the mean over the mini-batches, tokens summed (pipeline.flow.trainer.merge_metrics)
    assert rank_metrics[0]["local_tokens"] == 20.0
