"""Visible progress while nothing is kept (issue 22): a run whose groups are all filtered (e.g. a policy that gets
every answer wrong) used to print nothing for minutes; the driver now prints, every PROGRESS_EVERY_S without a batch,
groups generated / kept / filtered by reason / requeued / reward failures."""

from __future__ import annotations

import asyncio
import logging
import time

from pipeline.flow.rewards import RewardResult
from pipeline.flow.rollout import RolloutManager
from pipeline.flow.transport import GroupReceiver
from pipeline.runtime import steps
from pipeline.testing.rollout_sim import SimEngineClient, SimTokenizer, sim_config, sim_prompts


class AlwaysWrong:
    def __init__(self) -> None:
        self.calls = 0

    async def score_async(self, response: str, answer: str) -> RewardResult:
        self.calls += 1
        return RewardResult(-1.0, False)

    def metrics(self) -> dict[str, float]:
        return {"reward/calls": float(self.calls), "reward/failed": 0.0}


def test_rollout_progress_counts_every_group_filtered_all_wrong():
    async def go():
        rx = GroupReceiver()
        cfg = sim_config(max_staleness=1, batch_size=2)
        m = RolloutManager(cfg, SimEngineClient(per_token_s=0.0002), SimTokenizer(), sim_prompts(100),
                           rx.sender_endpoint, AlwaysWrong())  # fmt: skip
        task = asyncio.create_task(m.run())
        await asyncio.sleep(1.0)
        p = m.progress()
        await m.stop()
        await task
        rx.close()
        return p, m.accounting()

    p, acc = asyncio.run(go())
    assert p["generated"] > 0 and p["kept"] == 0, p
    assert p["filtered"] == {"all_wrong": p["generated"]}, p  # every group generated was filtered, as all-wrong
    assert p["reward_failures"] == 0 and p["requeued"] == acc["requeued"]


class _NoBatch:
    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    def get_batch(self, trainer_version, timeout_s, size=None):
        if time.monotonic() >= self.until:
            return ["batch"]
        time.sleep(min(timeout_s, self.until - time.monotonic()))
        raise TimeoutError


class _Rollout:
    def error(self) -> str:
        return ""

    def progress(self) -> dict:
        return {"generated": 412, "kept": 0, "filtered": {"all_wrong": 410, "all_correct": 2}, "requeued": 3,
                "reward_failures": 7}  # fmt: skip


class _Weights:
    version, rollout = 0, _Rollout()

    def update(self) -> dict[str, float]:
        return {}


class _Cfg:
    class engine:  # noqa: N801 - stands in for cfg.engine
        request_timeout_s = 60.0


def test_waiting_for_a_batch_prints_progress_lines(monkeypatch, caplog):
    monkeypatch.setattr(steps, "PROGRESS_EVERY_S", 0.3)
    with caplog.at_level(logging.INFO, logger="dapo"):
        batch, _ = steps.next_batch(_Cfg(), _NoBatch(1.1), _Weights())
    assert batch == ["batch"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for a batch")]
    assert 2 <= len(lines) <= 4, lines
    assert lines[0].endswith(
        "groups generated 412, kept 0, filtered 412 (all_wrong 410, all_correct 2), requeued 3, reward failures 7"
    ), lines[0]


def test_no_progress_line_when_batches_come():
    out = []
    steps.log.addHandler(h := logging.Handler())
    h.emit = out.append
    try:
        steps.next_batch(_Cfg(), _NoBatch(0.0), _Weights())
    finally:
        steps.log.removeHandler(h)
    assert out == []
