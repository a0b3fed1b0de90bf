"""Reward shaping for length: DAPO's soft overlong punishment (paper Eq. 13) and overlong filtering.

Contract:
- `overlong_penalty(len, L_max, L_cache, factor)` is Eq. 13 times `factor`: 0 when len <= L_max - L_cache;
  (L_max - L_cache - len) / L_cache on the ramp L_max - L_cache < len <= L_max; -1 when len > L_max.
- Our engines stop every response at max_new_tokens, so a response can never be longer than L_max. We set
  L_max := the sample's max_new_tokens and give a response the engine truncated (finish_reason == "length") the
  len > L_max case (-factor): it never finished its answer. `shape_reward` returns task_reward + penalty, so with
  task rewards in [-1, 1] and factor 1 the shaped reward lies in [-2, 1].
- `overlong_loss_mask(sample, cfg)` is False for a truncated sample when overlong filtering is on (its tokens are
  then left out of the loss), True otherwise.
"""

from __future__ import annotations

from pipeline.config import OverlongConfig
from pipeline.contracts.records import Sample


def overlong_penalty(response_len: int, max_new_tokens: int, cache_len: int, factor: float = 1.0) -> float:
    """DAPO Eq. 13 with L_max = max_new_tokens and L_cache = cache_len, scaled by factor (<= 0)."""
    if cache_len < 0 or cache_len > max_new_tokens:
        raise ValueError(
            f"algorithm.overlong.cache_len: must be in [0, max_new_tokens={max_new_tokens}]; got {cache_len}"
        )
    start = max_new_tokens - cache_len  # the ramp begins after this many tokens
    if response_len <= start:
        return 0.0
    if response_len <= max_new_tokens:
        return factor * (start - response_len) / cache_len  # cache_len > 0 here: start < len <= L_max
    return -factor


def shape_reward(sample: Sample, cfg: OverlongConfig, max_new_tokens: int | None = None) -> float:
    """sample.task_reward + the overlong penalty. L_max: `max_new_tokens` if given, else sample.max_new_tokens."""
    if not cfg.soft_punish:
        return float(sample.task_reward)
    l_max = max_new_tokens if max_new_tokens is not None else sample.max_new_tokens
    if l_max <= 0:
        raise ValueError(
            f"sample {sample.group_id}/{sample.index}: max_new_tokens is not set, so the overlong penalty "
            "(algorithm.overlong.soft_punish) cannot be computed"
        )
    length = l_max + 1 if sample.truncated else sample.response_len  # truncated -> the len > L_max case
    return float(sample.task_reward) + overlong_penalty(length, l_max, cfg.cache_len, cfg.factor)


def overlong_loss_mask(sample: Sample, cfg: OverlongConfig) -> bool:
    """False (exclude from the loss) for a truncated sample when overlong filtering is on."""
    return not (cfg.filter and sample.truncated)
