"""Context parallelism, the data side: megatron's load-balanced split of a packed (THD) row across the CP group, and
the gather of per-token results back to the whole row.

Contract:
- Layout (transformer-engine's THD + CP convention, which megatron's `get_thd_batch_on_this_cp_rank` uses): every
  sequence of a packed row occupies a slot whose length is a multiple of 2*cp (`cu_seqlens_padded`; the real lengths
  go in `cu_seqlens`). Each slot is cut into 2*cp equal chunks and CP rank r holds chunks r and 2*cp-1-r (the causal
  work of an early chunk and a late chunk balance out), slot after slot.
- `cp_slot_length(n, cp)`: n rounded up to a multiple of 2*cp.
- `cp_partition_index(cu_seqlens_padded, cp, rank)` -> (t/cp,) long: the row positions rank r holds, in the order
  its model input takes them. The index of TE's `thd_get_partitioned_indices`, in torch; for a one-sequence row it is
  megatron's `get_batch_on_this_cp_rank` split.
- `cp_unshard(pieces, indices, total, dim=-1)`: the inverse, a tensor of `total` positions along `dim` holding
  pieces[r] (t/cp positions) at positions indices[r]; split then unshard is the identity.
- `cp_gather(local, indices, total, group, dim=-1, sum_grads=False)`: all-gather over the CP group, then unshard.
  Autograd: the backward returns this rank's positions of the incoming gradient, summed over the CP group (a
  reduce-scatter) when `sum_grads`: the ranks back-propagate different gradients into the gathered tensor (keys and
  values, which every rank's queries attend to). Without it every rank must back-propagate the same gradient: every CP rank
  computes the same whole-row loss from the gathered logprobs and back-propagates it through its own tokens only;
  megatron sums the parameter gradients over the CP group (with DP), which gives the gradient of the loss once.
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


def cp_unshard(pieces: list[torch.Tensor], indices: list[torch.Tensor], total: int, dim: int = -1) -> torch.Tensor:
    """`total` positions along `dim` from the CP ranks' pieces (t/cp positions each) at their positions."""
    shape = list(pieces[0].shape)
    shape[dim] = total
    out = pieces[0].new_zeros(shape)
    for piece, index in zip(pieces, indices, strict=True):
        out.index_copy_(dim, index, piece)
    return out


class _CPGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, indices, total, group, dim, sum_grads):  # type: ignore[override]
        pieces = [torch.empty_like(local) for _ in indices]
        dist.all_gather(pieces, local.contiguous(), group=group)
        ctx.indices, ctx.rank, ctx.dim, ctx.group, ctx.sum_grads = indices, dist.get_rank(group), dim, group, sum_grads
        return cp_unshard(pieces, indices, total, dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.sum_grads:
            return grad.index_select(ctx.dim, ctx.indices[ctx.rank]), None, None, None, None, None
        # Every rank's positions one after another, then a reduce-scatter: each receives its own, summed.
        rows = grad.movedim(ctx.dim, 0)
        by_rank = torch.cat([rows.index_select(0, index) for index in ctx.indices])
        mine = rows.new_empty(len(ctx.indices[ctx.rank]), *rows.shape[1:])
        dist.reduce_scatter_tensor(mine, by_rank.contiguous(), group=ctx.group)
        return mine.movedim(0, ctx.dim), None, None, None, None, None


def cp_gather(
    local: torch.Tensor, indices: list[torch.Tensor], total: int, group: Any, dim: int = -1, sum_grads: bool = False
) -> torch.Tensor:
    """The whole row (`total` positions along `dim`) of a tensor held as t/cp-position pieces by the CP ranks."""
    if len(indices) == 1:
        return local
    return _CPGather.apply(local, indices, total, group, dim, sum_grads)
