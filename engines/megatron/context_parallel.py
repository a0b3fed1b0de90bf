"""Context parallelism, the data side: megatron's load-balanced split of a packed (THD) row across the CP group, and
the gather of per-token results back to the whole row.

Contract:
- Layout (transformer-engine's THD + CP convention, which megatron's `get_thd_batch_on_this_cp_rank` uses): every
  sequence of a packed row occupies a slot whose length is a multiple of 2*cp (`cu_seqlens_padded`; the real lengths
  go in `cu_seqlens`). Each slot is cut into 2*cp equal chunks and CP rank r holds chunks r and 2*cp-1-r (the causal
  work of a early chunk and a late chunk balance out), slot after slot.
- `cp_slot_length(n, cp)`: n rounded up to a multiple of 2*cp.
- `cp_partition_index(cu_seqlens_padded, cp, rank)` -> (t/cp,) long: the row positions rank r holds, in the order
  its model input takes them. The index of TE's `thd_get_partitioned_indices`, in torch; for a one-sequence row it is
  megatron's `get_batch_on_this_cp_rank` split.
- `cp_unshard(pieces, indices, total)`: the inverse, a (..., total) tensor holding pieces[r] (..., t/cp) at
  positions indices[r]; split then unshard is the identity.
- `cp_gather(local, indices, total, group)`: all-gather over the CP group, then unshard. Autograd: the backward
  returns this rank's positions of the incoming gradient. Every CP rank then computes the same whole-row loss and
  back-propagates it through its own tokens only; megatron sums the gradients over the CP group (with DP), which
  gives the gradient of the loss once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def cp_slot_length(n: int, cp: int) -> int:
    return -(-n // (2 * cp)) * 2 * cp


def cp_partition_index(cu_seqlens_padded: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Positions of the packed row CP rank `rank` holds (see the module docstring)."""
    bounds = cu_seqlens_padded.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if (end - start) % (2 * cp):
            raise ValueError(f"context parallelism: slot [{start}, {end}) is not a multiple of 2*cp = {2 * cp}")
        c = (end - start) // (2 * cp)
        parts.append(torch.arange(start + rank * c, start + (rank + 1) * c))
        parts.append(torch.arange(start + (2 * cp - 1 - rank) * c, start + (2 * cp - rank) * c))
    return torch.cat(parts).to(cu_seqlens_padded.device) if parts else torch.zeros(0, dtype=torch.long)


def cp_unshard(pieces: list[torch.Tensor], indices: list[torch.Tensor], total: int) -> torch.Tensor:
    """(..., total) from the CP ranks' (..., t/cp) pieces at their positions."""
    out = pieces[0].new_zeros(*pieces[0].shape[:-1], total)
    for piece, index in zip(pieces, indices, strict=True):
        out[..., index] = piece
    return out


class _CPGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, indices, total, group):  # type: ignore[override]
        pieces = [torch.empty_like(local) for _ in indices]
        dist.all_gather(pieces, local.contiguous(), group=group)
        ctx.index = indices[dist.get_rank(group)]
        return cp_unshard(pieces, indices, total)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad[..., ctx.index], None, None, None


def cp_gather(local: torch.Tensor, indices: list[torch.Tensor], total: int, group: Any) -> torch.Tensor:
    """The whole row (..., total) of a per-token result held as (..., t/cp) pieces by the CP ranks."""
    if len(indices) == 1:
        return local
    return _CPGather.apply(local, indices, total, group)
