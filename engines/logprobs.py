"""Per-token log-probabilities and entropies straight from the last hidden states: the output layer, softmax at a
temperature, target gather and entropy fused, chunked over tokens. Both trainer backends call this one function.

Contract:
- `fused_logprobs(hidden, weight, targets, temperature=..., chunk_tokens=..., with_entropy=..., entropy_grad=...,
  vocab_start=0, vocab_size=None, group=None)`: `hidden` (..., H) are the final-norm hidden states, `weight`
  (V_local, H) the output layer's weight (the tied embedding where tied), `targets` (...) global token ids. With
  z = (hidden @ weight.T) / temperature it returns `(logprob, entropy)`, each (...) float32 (float64 for float64
  inputs):
  log softmax(z)[target] and H = logsumexp(z) - sum softmax(z) * z; `entropy` is None unless `with_entropy`.
  The temperature is the sampler's: engines (SGLang) report logprobs of softmax(logits / T), so the importance
  ratio is 1 on-policy only when the trainer scores at the same T.
- Alignment is the caller's: the value at index i is about `targets[i]` as predicted from `hidden[i]`. Backends
  pass targets shifted by one so that the value at position t of a sequence is about token t (pipeline/contracts/backend.py).
- Vocabulary parallelism: `weight` may be this rank's rows [vocab_start, vocab_start + V_local) of a padded
  vocabulary split over `group` (a TP group). Columns >= `vocab_size` (padding) are excluded as if absent; the
  row max, sum of exp, target logit and sum p*z are all-reduced over `group`. The backward does no communication:
  the returned hidden gradient is this rank's partial sum, so the caller must all-reduce it across the group
  exactly once (megatron: `copy_to_tensor_model_parallel_region` on the hidden states before this call, as its
  ColumnParallelLinear does).
- Memory: the logits never exist for all tokens at once. The forward computes `chunk_tokens` rows of logits at a
  time and keeps only (N,) statistics; the backward recomputes each chunk's logits from `hidden` and `weight`. Peak
  extra memory is a few (chunk_tokens, V_local) float32 buffers, whatever the number of tokens.
- Gradients: d logprob / dz_j = 1[j = target] - p_j, d H / dz_j = -p_j (z_j - sum_k p_k z_k), then through z =
  hW^T / T to `hidden` (returned in its dtype) and `weight` (accumulated in float32 over chunks, returned in its
  dtype). With `entropy_grad=False` (algorithm.entropy_coef == 0) the entropy is returned detached and its
  backward is never computed.
- Maths in float32 at least whatever the inputs' dtype (the matmul itself runs in the inputs' dtype, as the model's own
  output layer would).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: Any) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float, n_real: int) -> torch.Tensor:
    """(C, H) x (V_local, H) -> (C, V_local) logits / T in float32 (or wider), padding columns at -inf."""
    z = h @ weight.t()
    z = z.to(torch.promote_types(z.dtype, torch.float32))  # no copy when already float32
    if temperature != 1.0:
        z.div_(temperature)
    if n_real < z.shape[1]:
        z[:, n_real:] = float("-inf")
    return z


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(C, V) x (C, V) -> (C,) row-wise dot products without a (C, V) product temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _FusedLogprob(torch.autograd.Function):
    # In-place arithmetic on the chunk buffers keeps at most two (C, V_local) float32 buffers alive at a time.
    @staticmethod
    def forward(ctx, hidden, weight, targets, opts):  # type: ignore[override]
        temperature, chunk, vocab_start, n_real, group, with_entropy, entropy_grad = opts
        n, n_local = hidden.shape[0], weight.shape[0]
        local = targets - vocab_start
        inside = (local >= 0) & (local < n_real)
        local = local.clamp(0, n_local - 1)
        dt = torch.promote_types(hidden.dtype, torch.float32)
        lse = hidden.new_empty(n, dtype=dt)
        tgt = hidden.new_empty(n, dtype=dt)
        mean_z = hidden.new_empty(n, dtype=dt) if with_entropy else None
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            z = _chunk_logits(hidden[sl], weight, temperature, n_real)  # (C, V_local)
            m = _all_reduce(z.max(dim=1).values, dist.ReduceOp.MAX, group)  # a padding-only slice gives -inf
            picked = torch.where(inside[sl], z.gather(1, local[sl].unsqueeze(1)).squeeze(1), 0.0)
            e = z.sub(m.unsqueeze(1)).exp_()  # padding -> 0
            sums = [e.sum(dim=1), picked]
            if with_entropy:
                if n_real < n_local:
                    z[:, n_real:] = 0.0  # e = 0 there: sum e*z over the real vocabulary
                sums.append(_row_dot(e, z))
            del z, e
            # One all-reduce for the sums of this chunk (the max had to come first).
            s = _all_reduce(torch.stack(sums), dist.ReduceOp.SUM, group)
            lse[sl] = m + torch.log(s[0])
            tgt[sl] = s[1]
            if with_entropy:
                mean_z[sl] = s[2] / s[0]
        logprob = tgt - lse
        entropy = lse - mean_z if with_entropy else None
        if with_entropy and not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(hidden, weight, local, inside, lse, mean_z if mean_z is not None else lse)
        ctx.opts = opts
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):  # type: ignore[override]
        hidden, weight, local, inside, lse, mean_z = ctx.saved_tensors
        temperature, chunk, _, n_real, _, with_entropy, entropy_grad = ctx.opts
        use_ent = grad_entropy is not None and with_entropy and entropy_grad
        if grad_logprob is None and not use_ent:
            return None, None, None, None
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # weight-gradient accumulator over chunks
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            g = _chunk_d_logits(
                _chunk_logits(hidden[sl], weight, temperature, n_real), lse[sl], mean_z[sl], local[sl], inside[sl],
                grad_logprob[sl] if grad_logprob is not None else None, grad_entropy[sl] if use_ent else None, n_real,
            )  # fmt: skip
            if temperature != 1.0:
                g.div_(temperature)  # z = logits / T
            g = g.to(hidden.dtype)
            if need_h:
                torch.mm(g, weight, out=grad_h[sl])
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.t(), hidden[sl])
                else:
                    grad_w += (g.t() @ hidden[sl]).to(acc)
            del g  # before the next chunk's buffers are allocated
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None


def _chunk_d_logits(
    z: torch.Tensor,
    lse: torch.Tensor,
    mean_z: torch.Tensor,
    local: torch.Tensor,
    inside: torch.Tensor,
    grad_lp: torch.Tensor | None,
    grad_ent: torch.Tensor | None,
    n_real: int,
) -> torch.Tensor:
    """d loss / dz for one chunk, computed in place in z's buffer or p's:
    g = -p * (grad_lp + grad_ent * (z - mean_z)) + grad_lp * onehot(target)."""
    p = z.sub(lse.unsqueeze(1)).exp_()  # (C, V_local) softmax; padding -> 0
    if grad_ent is None:
        del z
        g = p.mul_(-grad_lp.to(p.dtype).unsqueeze(1))
    else:
        if n_real < z.shape[1]:
            z[:, n_real:] = 0.0  # p = 0 there; avoids 0 * inf
        g = z.sub_(mean_z.unsqueeze(1)).mul_(grad_ent.to(z.dtype).unsqueeze(1))
        if grad_lp is not None:
            g.add_(grad_lp.to(z.dtype).unsqueeze(1))
        g.mul_(p).neg_()
        del p
    if grad_lp is not None:
        g.scatter_add_(1, local.unsqueeze(1), (grad_lp.to(g.dtype) * inside).unsqueeze(1))
    return g


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprob, entropy or None), each shaped like `targets`, float32; see the module docstring."""
    if chunk_tokens <= 0:
        raise ValueError(f"fused_logprobs: chunk_tokens must be > 0; got {chunk_tokens}")
    if temperature <= 0:
        raise ValueError(f"fused_logprobs: temperature must be > 0; got {temperature}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"fused_logprobs: hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)}")
    n_local = weight.shape[0]
    vocab = vocab_start + n_local if vocab_size is None else vocab_size
    n_real = min(max(vocab - vocab_start, 0), n_local)  # real (unpadded) rows of this weight slice
    opts = (float(temperature), int(chunk_tokens), int(vocab_start), n_real, group, with_entropy, entropy_grad)
    flat = hidden.reshape(-1, hidden.shape[-1])
    lp, ent = _FusedLogprob.apply(flat, weight, targets.reshape(-1), opts)
    return lp.view(targets.shape), ent.view(targets.shape) if ent is not None else None


def tp_vocab_start(weight: torch.Tensor, group: Any) -> int:
    """The first vocabulary row of this rank's slice when a weight (V/tp, H) is split contiguously over `group`."""
    rank = dist.get_rank(group) if group is not None and dist.get_world_size(group) > 1 else 0
    return rank * weight.shape[0]


def token_aligned(hidden: torch.Tensor, input_ids: torch.Tensor, weight: torch.Tensor, **kw: Any):
    """Padded (B, T) layout: (logprob, entropy or None), each (B, T) float32 with the value at position t about
    token t as predicted from positions < t (pipeline/contracts/backend.py); position 0 is 0. `kw` as `fused_logprobs`."""
    lp, ent = fused_logprobs(hidden[:, :-1], weight, input_ids[:, 1:], **kw)  # position t predicts t+1
    pad = lp.new_zeros(lp.shape[0], 1)
    return torch.cat([pad, lp], dim=1), torch.cat([pad, ent], dim=1) if ent is not None else None
