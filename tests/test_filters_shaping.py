"""Dynamic-sampling filter, its counters, DAPO overlong shaping (Eq. 13) and overlong filtering."""

from __future__ import annotations

import pytest

from pipeline.algorithm.filters import FilterCounters, FilterDecision, dynamic_sampling_filter
from pipeline.algorithm.shaping import overlong_loss_mask, overlong_penalty, shape_reward
from pipeline.config import OverlongConfig
from pipeline.contracts.records import Group, Sample


def sample(acc=False, n=1, finish="stop", task_reward=-1.0, max_new_tokens=20, index=0) -> Sample:
    return Sample(
        prompt_id="p",
        group_id="g",
        index=index,
        prompt_ids=[1, 2],
        response_ids=[3] * n,
        logprobs=[-0.1] * n,
        versions=[0] * n,
        finish_reason=finish,
        task_reward=task_reward,
        acc=acc,
        max_new_tokens=max_new_tokens,
    )


def group(*accs: bool) -> Group:
    return Group(prompt_id="p", group_id="g", samples=[sample(a, index=i) for i, a in enumerate(accs)])


def test_filter_reasons():
    assert dynamic_sampling_filter(group(True, False, True)) == FilterDecision(True, "kept")
    assert dynamic_sampling_filter(group(True, True)) == FilterDecision(False, "all_correct")
    assert dynamic_sampling_filter(group(False, False, False)) == FilterDecision(False, "all_wrong")
    assert dynamic_sampling_filter(group(True)) == FilterDecision(False, "all_correct")  # std of one value is 0
    assert dynamic_sampling_filter(group()) == FilterDecision(False, "empty")


def test_counters_to_metrics():
    c = FilterCounters()
    for accs in [(True, False), (True, True), (True, True), (False, False), (False, True), (True, False)]:
        c.add(dynamic_sampling_filter(group(*accs)))
    assert c.to_metrics() == {
        "filter/kept": 3.0,
        "filter/dropped": 3.0,
        "filter/drop_all_correct": 2.0,
        "filter/drop_all_wrong": 1.0,
        "filter/drop_empty": 0.0,
    }
    c.reset()
    assert c.to_metrics()["filter/kept"] == 0.0


@pytest.mark.parametrize(
    "length,expected",
    [(0, 0.0), (16, 0.0), (17, -0.25), (18, -0.5), (19, -0.75), (20, -1.0), (21, -1.0), (500, -1.0)],
)
def test_overlong_penalty_eq13(length, expected):
    # L_max = 20, L_cache = 4: no penalty up to 16, then a ramp of -1/4 per token, -1 beyond L_max.
    assert overlong_penalty(length, 20, 4) == pytest.approx(expected)


def test_overlong_penalty_factor_paper_scale_and_no_cache():
    assert overlong_penalty(17, 20, 4, factor=0.5) == pytest.approx(-0.125)
    # The DAPO recipe: L_max 20480, L_cache 4096 -> the ramp starts at 16384.
    assert overlong_penalty(16384, 20480, 4096) == 0.0
    assert overlong_penalty(18432, 20480, 4096) == pytest.approx(-0.5)
    assert overlong_penalty(20, 20, 0) == 0.0 and overlong_penalty(21, 20, 0) == -1.0
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(5, 20, 21)


def test_shape_reward_range_and_truncation():
    cfg = OverlongConfig(soft_punish=True, cache_len=4, factor=1.0)
    assert shape_reward(sample(n=10, task_reward=1.0), cfg) == 1.0
    assert shape_reward(sample(n=18, task_reward=1.0), cfg) == pytest.approx(0.5)
    # Truncated by the engine (finish "length"): the -1 case even though len == L_max, so the minimum is -2.
    assert shape_reward(sample(n=20, finish="length", task_reward=-1.0), cfg) == -2.0
    # A truncation before L_max (e.g. the context window) is still an unfinished answer.
    assert shape_reward(sample(n=12, finish="length", task_reward=-1.0), cfg) == -2.0
    assert shape_reward(sample(n=20, finish="stop", task_reward=1.0), cfg) == 0.0
    assert shape_reward(sample(n=18, task_reward=1.0), OverlongConfig(soft_punish=False)) == 1.0
    # L_max override, and a clear error when unknown.
    assert shape_reward(sample(n=18, task_reward=1.0, max_new_tokens=0), cfg, max_new_tokens=100) == 1.0
    with pytest.raises(ValueError, match="max_new_tokens"):
        shape_reward(sample(n=18, max_new_tokens=0), cfg)


def test_overlong_filter_mask():
    on, off = OverlongConfig(filter=True), OverlongConfig(filter=False)
    assert overlong_loss_mask(sample(n=20, finish="length"), on) is False
    assert overlong_loss_mask(sample(n=20, finish="stop"), on) is True
    assert overlong_loss_mask(sample(n=20, finish="length"), off) is True
