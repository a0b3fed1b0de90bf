"""Resume keeps every checkpointed step's metrics (issue #22): the resumed run purges only what was logged after the
checkpoint, read back from the event files with TensorBoard's EventAccumulator."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.runtime.metrics import MetricsLogger


def _scalars(logdir: str, key: str) -> dict[int, float]:
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(key)}


def test_resume_purges_only_the_steps_after_the_checkpoint(tmp_path):
    logdir = str(tmp_path / "tb")
    first = MetricsLogger(logdir, total_steps=4, console=False)
    for step in (1, 2, 3):  # checkpoint after step 2; step 3 was logged, then the run died before its checkpoint
        first.log(step, {"reward/mean": float(step), "accounting/trained": 10.0 * step})
    first.close()
    resumed = MetricsLogger(logdir, total_steps=4, console=False, first_step=2)
    for step in (3, 4):  # redone from the checkpoint
        resumed.log(step, {"reward/mean": 100.0 + step, "accounting/trained": 1000.0 + step})
    resumed.close()
    assert _scalars(logdir, "reward/mean") == {1: 1.0, 2: 2.0, 3: 103.0, 4: 104.0}
    assert _scalars(logdir, "accounting/trained") == {1: 10.0, 2: 20.0, 3: 1003.0, 4: 1004.0}
