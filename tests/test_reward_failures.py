"""Reward-function failures (issue #22): logged at WARNING with the exception (rate-limited), counted by reason and
shown on the status line, fatal when (almost) every call fails or times out, and a hanging function does not grow
the process's threads without bound."""

import asyncio
import logging
import random
import threading
import time

import pytest

from pipeline.flow.rewards import RewardResult, RewardRunner
from pipeline.runtime.metrics import MetricsLogger

RELEASE = threading.Event()
_rng = random.Random(0)


def always_raises(response: str, answer: str) -> float:
    raise ValueError(f"cannot parse {response!r}")


def raises_half(response: str, answer: str) -> float:
    if _rng.random() < 0.5:
        raise KeyError("boxed")
    return 1.0


def hangs(response: str, answer: str) -> float:
    RELEASE.wait(60)
    return 1.0


def hangs_sometimes(response: str, answer: str) -> float:
    if response == "hang":
        RELEASE.wait(60)
    return 1.0


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "pipeline.flow.rewards"
    ]


def test_always_raising_is_fatal_with_the_exception(caplog):
    caplog.set_level(logging.WARNING)
    r = RewardRunner("tests.test_reward_failures:always_raises", timeout_s=5, workers=2, fail_first=32)
    for i in range(31):
        assert r.score(f"r{i}", "1") == RewardResult(-1.0, False, "ValueError")
        assert r.fatal() == ""  # not yet: fewer than fail_first calls
    r.score("r31", "1")
    fatal = r.fatal()
    assert "tests.test_reward_failures:always_raises failed on all of the first 32 calls (ValueError 32)" in fatal
    assert "ValueError: cannot parse 'r31'" in fatal
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings  # the first failure, then rate-limited
    assert "ValueError: cannot parse 'r0'" in warnings[0]
    m = r.metrics()
    assert m["reward/failed"] == 32 and m["reward/failed_ValueError"] == 32 and m["reward/calls"] == 32
    r.close()


def test_half_failing_is_counted_and_warned_but_not_fatal(caplog):
    caplog.set_level(logging.WARNING)
    r = RewardRunner("tests.test_reward_failures:raises_half", timeout_s=5, workers=2, fail_window=64)
    results = [r.score(str(i), "1") for i in range(400)]
    failed = sum(res.failed == "KeyError" for res in results)
    assert 150 < failed < 250 and r.fatal() == ""
    m = r.metrics()
    assert m["reward/failed_KeyError"] == failed and m["reward/calls"] == 400
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "KeyError: 'boxed'" in warnings[0], warnings
    # The status line shows the failures by reason.
    line = MetricsLogger(None, 10, tensorboard=False).status_line(1, {"reward/mean": 0.1, **m})
    assert f"rfail {failed} (KeyError {failed})" in line, line
    assert "rfail" not in MetricsLogger(None, 10, tensorboard=False).status_line(1, {"reward/failed": 0.0})
    r.close()


def test_mostly_failing_over_the_window_is_fatal():
    r = RewardRunner("tests.test_reward_failures:raises_half", timeout_s=5, workers=1, fail_window=20, fail_ratio=0.5)
    r.score("warm", "1")  # whatever it gave, then a window of nothing but failures
    r.fn = always_raises
    for i in range(20):
        r.score(str(i), "1")
    assert "of the last 20 calls" in r.fatal() and "ValueError" in r.fatal()
    r.close()


def test_hanging_function_is_timeout_fatal_and_threads_stay_bounded():
    RELEASE.clear()
    before = threading.active_count()
    r = RewardRunner("tests.test_reward_failures:hangs", timeout_s=0.05, workers=2, max_hung=6, fail_first=32)
    try:

        async def many():
            return await asyncio.gather(*(r.score_async(str(i), "1") for i in range(200)))

        t0 = time.monotonic()
        results = asyncio.run(many())
        assert time.monotonic() - t0 < 20
        assert all(res == RewardResult(-1.0, False, "timeout") for res in results)
        assert threading.active_count() - before <= 2 + 6  # workers + max_hung, not one per call
        assert r.metrics()["reward/failed_timeout"] == 200 and r.metrics()["reward/hung_threads"] == 8
        assert "all of the first 32 calls (timeout" in r.fatal()
        assert "algorithm.reward_timeout_s=0.05" in r.fatal()
    finally:
        RELEASE.set()
    r.close()


def test_pool_recovers_when_hung_calls_return():
    RELEASE.clear()
    r = RewardRunner("tests.test_reward_failures:hangs_sometimes", timeout_s=0.05, workers=1, max_hung=0)
    try:
        assert r.score("hang", "").failed == "timeout"
        assert r.score("ok", "").failed == "timeout"  # no worker left, max_hung=0: refused at once
    finally:
        RELEASE.set()
    deadline = time.monotonic() + 5
    while r.metrics()["reward/hung_threads"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.score("ok", "") == RewardResult(1.0, True, "")  # the returned thread serves again
    r.close()


def test_rollout_actor_reports_the_fatal_verdict():
    """The hook the training loop polls (pipeline/runtime/cluster.py RolloutActor.error): the runner's verdict."""
    from pipeline.runtime.cluster import RolloutActor

    n = 3

    class _Manager:
        rewards = RewardRunner("tests.test_reward_failures:always_raises", timeout_s=5, workers=1, fail_first=n)

    actor = object.__new__(RolloutActor.__ray_actor_class__)
    actor.manager, actor.task = _Manager(), None
    assert asyncio.run(actor.error()) == ""
    for i in range(n):
        _Manager.rewards.score(str(i), "")
    assert asyncio.run(actor.error()).startswith("reward function tests.test_reward_failures:always_raises failed")


@pytest.mark.slow
def test_run_with_an_always_raising_reward_stops_with_the_exception(tmp_path):
    """Issue #22: such a run generated for 76 s and ended in `TimeoutError: buffer: no batch` without the exception;
    now it stops once the first fail_first calls have all failed, with the function's exception in the message."""
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.runtime.train import RunFailed, train

    root = Path(__file__).resolve().parents[1]
    overrides = [
        "algorithm.reward_fn=tests.test_reward_failures:always_raises", f"logging.dir={tmp_path}",
        "trainer.total_steps=2", "trainer.batch_size=2", "trainer.micro_batch_size=16", "eval.every=0",
    ]  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(
        RunFailed, match=r"always_raises failed on all of the first \d+ calls.*ValueError: cannot parse"
    ):
        train(load_config(root / "configs" / "tiny-cpu.yaml", overrides))
    assert time.monotonic() - t0 < 120
