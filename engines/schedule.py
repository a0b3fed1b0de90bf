"""The learning-rate schedule both trainer backends use: constant after a linear warm-up.

Contract: at optimizer step k (0-based, the step about to be taken) the learning rate is
`lr * warmup_factor(k, warmup_steps)` with `warmup_factor = min(1, (k + 1) / warmup_steps)`, or 1 when
`warmup_steps <= 0`. The first step therefore already trains at lr / warmup_steps, never at 0.
"""

from __future__ import annotations


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the base LR at optimizer step `step` (see the module docstring)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def warmup_lr(lr: float, step: int, warmup_steps: int) -> float:
    """The learning rate at optimizer step `step`."""
    return lr * warmup_factor(step, warmup_steps)
