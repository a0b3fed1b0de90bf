"""Group-relative advantage estimators (outcome rewards: one scalar per response).

Contract: `compute_advantages(rewards, method)` takes rewards of shape (N, G) — N groups (prompts) of G responses —
and returns a float32 tensor of the same shape; the trainer broadcasts each value over its response's tokens.
Methods (`algorithm.advantage`):
- grpo:         (r - mean_group) / (std_group + eps), unbiased std; a group of one gives 0.
- drgrpo:       r - mean_group (Dr. GRPO: no std division, which would up-weight easy/hard prompts).
- rloo:         r_i - mean_{j != i} r_j (leave-one-out baseline) = G/(G-1) * (r_i - mean); G = 1 gives 0.
- reinforce_pp: REINFORCE++ with a group baseline: r - mean_group, then divided by the std of those centred values
                over the whole batch (all N*G entries, unbiased) + eps; a batch of one value gives 0.
Groups whose rewards are all equal get exactly 0 under every method (no NaN).
"""

from __future__ import annotations

import torch

METHODS = ("grpo", "drgrpo", "rloo", "reinforce_pp")


def _centred(r: torch.Tensor) -> torch.Tensor:
    return r - r.mean(dim=1, keepdim=True)


def _grpo(r: torch.Tensor, eps: float) -> torch.Tensor:
    if r.shape[1] < 2:
        return torch.zeros_like(r)
    return _centred(r) / (r.std(dim=1, unbiased=True, keepdim=True) + eps)


def _rloo(r: torch.Tensor, eps: float) -> torch.Tensor:
    g = r.shape[1]
    if g < 2:
        return torch.zeros_like(r)
    # r_i - (sum - r_i)/(G-1)  ==  G/(G-1) * (r_i - mean): one fused expression, no per-element loop.
    return _centred(r) * (g / (g - 1))


def _reinforce_pp(r: torch.Tensor, eps: float) -> torch.Tensor:
    a = _centred(r)
    a = torch.where((r.amax(dim=1) == r.amin(dim=1))[:, None], torch.zeros_like(a), a)
    if a.numel() < 2:
        return torch.zeros_like(r)
    return a / (a.std(unbiased=True) + eps)


_IMPL = {
    "grpo": _grpo,
    "drgrpo": lambda r, eps: _centred(r),
    "rloo": _rloo,
    "reinforce_pp": _reinforce_pp,
}


def compute_advantages(rewards: torch.Tensor, method: str, eps: float = 1e-6) -> torch.Tensor:
    """(N, G) rewards -> (N, G) advantages under `method` (see the module docstring)."""
    if method not in _IMPL:
        raise ValueError(f"algorithm.advantage: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 2:
        raise ValueError(f"compute_advantages: rewards must have shape (N groups, G responses); got {tuple(r.shape)}")
    if r.numel() == 0:
        return torch.zeros_like(r)
    if not torch.isfinite(r).all():
        raise ValueError("compute_advantages: rewards contain NaN or inf (check the reward function's output)")
    r64 = r.double()  # float64 so a group mean is exact enough that (r - mean) / eps stays ~0
    adv = _IMPL[method](r64, eps)
    # A group with identical rewards carries no signal: force exact zeros (rounding in the mean could otherwise
    # be blown up by the 1/(0 + eps) of grpo).
    flat = r64.amax(dim=1) == r64.amin(dim=1)
    adv = torch.where(flat[:, None], torch.zeros_like(adv), adv)
    return adv.float()
