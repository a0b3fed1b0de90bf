"""Per-token log-probabilities and entropies from vocabulary-parallel logits, without gathering the vocabulary.

Contract:
- `vocab_parallel_logprobs(logits, target, vocab_size, group)`: `logits` (..., V/tp) is this TP rank's contiguous
  slice `[rank * V/tp, (rank+1) * V/tp)` of the (padded) vocabulary; `target` (...) holds global token ids. Returns
  `(logprob, entropy)`, each (...) float32: log softmax(z)[target] and H = logsumexp(z) - sum softmax(z) * z over the
  *real* vocabulary: columns >= `vocab_size` (megatron's padding) are excluded, as if they did not exist.
  `entropy` is None unless `with_entropy=True`.
- Communication: three all-reduces over `group` in the forward (max, sum of exp, target logit; plus sum p*z for
  the entropy), none in the backward: the gradient of the local slice is local,
  d logprob / dz_i = 1[i = target] - p_i and d H / dz_i = -p_i (z_i - sum_j p_j z_j). The input-gradient all-reduce
  across TP is done by megatron's ColumnParallelLinear that produced the logits.
- Maths in float32 whatever the logits' dtype; the gradient is returned in the logits' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: Any) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group, with_entropy):  # type: ignore[override]
        z = logits.float()
        n_local = z.shape[-1]
        n_real = min(max(vocab_size - vocab_start, 0), n_local)  # real (unpadded) columns of this slice
        if n_real < n_local:
            z = z.clone()
            z[..., n_real:] = float("-inf")
        # Max over the whole vocabulary; a slice made only of padding contributes -inf.
        m = _all_reduce(z.max(dim=-1).values, dist.ReduceOp.MAX, group)
        e = torch.exp(z - m.unsqueeze(-1))  # padding -> 0
        s = _all_reduce(e.sum(dim=-1), dist.ReduceOp.SUM, group)
        lse = m + torch.log(s)
        local = target - vocab_start
        inside = (local >= 0) & (local < n_real)
        picked = z.gather(-1, local.clamp(0, n_local - 1).unsqueeze(-1)).squeeze(-1)
        tgt = _all_reduce(torch.where(inside, picked, 0.0), dist.ReduceOp.SUM, group)
        logprob = tgt - lse
        entropy = mean_z = None
        if with_entropy:
            p = e / s.unsqueeze(-1)
            mean_z = _all_reduce((p * torch.where(p > 0, z, 0.0)).sum(dim=-1), dist.ReduceOp.SUM, group)
            entropy = lse - mean_z
        ctx.save_for_backward(logits, local, inside, lse, mean_z if mean_z is not None else lse)
        ctx.n_real, ctx.with_entropy = n_real, with_entropy
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):  # type: ignore[override]
        logits, local, inside, lse, mean_z = ctx.saved_tensors
        z = logits.float()
        p = torch.exp(z - lse.unsqueeze(-1))
        if ctx.n_real < z.shape[-1]:
            p[..., ctx.n_real :] = 0.0
        grad = torch.zeros_like(z)
        if grad_logprob is not None:
            g = grad_logprob.float().unsqueeze(-1)
            grad -= g * p
            onehot = grad_logprob.float() * inside  # + g at the target column of the slice that owns it
            grad.scatter_add_(-1, local.clamp(0, z.shape[-1] - 1).unsqueeze(-1), onehot.unsqueeze(-1))
        if grad_entropy is not None and ctx.with_entropy:
            centred = torch.where(p > 0, z - mean_z.unsqueeze(-1), 0.0)
            grad -= grad_entropy.float().unsqueeze(-1) * p * centred
        return grad.to(logits.dtype), None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    vocab_size: int,
    group: Any = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprob, entropy or None) of `target` under TP-sharded logits; see the module docstring."""
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    vocab_start = rank * logits.shape[-1]
    return _VocabParallelLogprob.apply(logits, target, vocab_start, vocab_size, group, with_entropy)
