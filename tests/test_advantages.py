"""Advantage estimators against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.algorithm.advantages import METHODS, compute_advantages


def close(a: torch.Tensor, b: list[list[float]], atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float32), atol=atol, rtol=0)


def test_grpo_by_hand():
    # [1, 1, 1, -1]: mean 0.5, deviations (.5, .5, .5, -1.5), unbiased var (3*.25 + 2.25)/3 = 1.
    close(compute_advantages(torch.tensor([[1.0, 1.0, 1.0, -1.0]]), "grpo", eps=0.0), [[0.5, 0.5, 0.5, -1.5]])
    # [1, -1, -1, 1]: mean 0, unbiased std sqrt(4/3); eps enters the denominator.
    s = math.sqrt(4 / 3) + 1e-6
    close(compute_advantages(torch.tensor([[1.0, -1.0, -1.0, 1.0]]), "grpo"), [[1 / s, -1 / s, -1 / s, 1 / s]])


def test_groups_are_independent():
    r = torch.tensor([[1.0, 1.0, 1.0, -1.0], [2.0, 0.0, 0.0, 0.0]])
    adv = compute_advantages(r, "drgrpo")
    close(adv, [[0.5, 0.5, 0.5, -1.5], [1.5, -0.5, -0.5, -0.5]])


def test_rloo_by_hand():
    # r_0 - mean(1, 1, -1) = 1 - 1/3; r_3 - mean(1, 1, 1) = -2.
    close(compute_advantages(torch.tensor([[1.0, 1.0, 1.0, -1.0]]), "rloo"), [[2 / 3, 2 / 3, 2 / 3, -2.0]])


def test_reinforce_pp_uses_batch_std():
    # Centred: [[1, -1], [0, 0]]; std over the 4 values (unbiased) = sqrt(2/3).
    s = math.sqrt(2 / 3) + 1e-6
    close(compute_advantages(torch.tensor([[1.0, -1.0], [0.5, 0.5]]), "reinforce_pp"), [[1 / s, -1 / s], [0, 0]])


@pytest.mark.parametrize("method", METHODS)
def test_all_equal_group_is_exactly_zero(method):
    # 0.1 is not exact in binary: a sloppy mean would leave ~1e-9 residues that 1/eps would blow up.
    r = torch.tensor([[0.1, 0.1, 0.1], [-2.0, -2.0, -2.0], [1.0, 0.0, 0.0]])
    adv = compute_advantages(r, method)
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    assert adv[2, 0] > 0 > adv[2, 1]


@pytest.mark.parametrize("method", METHODS)
def test_group_of_one_is_zero(method):
    adv = compute_advantages(torch.tensor([[1.0], [-1.0], [0.3]]), method)
    assert adv.shape == (3, 1) and adv.dtype == torch.float32
    assert torch.equal(adv, torch.zeros(3, 1))


def test_errors_name_the_key():
    with pytest.raises(ValueError, match="algorithm.advantage"):
        compute_advantages(torch.zeros(2, 2), "ppo")
    with pytest.raises(ValueError, match="shape"):
        compute_advantages(torch.zeros(4), "grpo")
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(torch.tensor([[1.0, float("nan")]]), "grpo")
