"""The policy loss every trainer backend calls (the `LossFn` of pipeline/contracts/backend.py), and logit helpers.

Contract:
- `policy_loss(logprobs, entropy, mb, cfg)` takes per-token tensors (B, T) aligned with `mb.input_ids` and returns
  `(loss, metrics)`: `loss` is this micro-batch's *share* of the mini-batch loss and every metric is a 0-d detached
  *share*, so summing them over the micro-batches and DP ranks of a mini-batch gives the mini-batch value, whatever
  the split. Loss positions are `mb.loss_mask > 0`; values at other positions (padding, prompt) never reach the
  loss or its gradient, even when they are inf/NaN.
- Per-token policy-gradient term (`algorithm.policy_loss`), with lo = 1 - eps_low, hi = 1 + eps_high:
  - ppo:   -A * r, except that r is replaced by the constant hi when A > 0 and r > hi, and by lo when A < 0 and
           r < lo (Clip-Higher PPO; exactly at a bound the clip is not active). Dual clip (dual_clip_c = c > 1):
           for A < 0 and r > c the term is the constant -A * c.
  - gspo:  as ppo, but r is the sequence ratio exp(mean over the sequence's loss tokens of log r) for every token
           of the sequence; its gradient is r_seq * grad log pi(y_t) per token (GSPO's stop-gradient form). GSPO's
           paper uses small eps (3e-4 / 4e-4) and seq-mean-token-mean aggregation: set those in the config.
  - cispo: -A * sg(clip(r, lo, hi)) * log pi(y_t) (REINFORCE with a clipped, detached IS weight; no token is
           dropped from the gradient).
  r = exp(clamp(log pi - log pi_base, +-log_ratio_clamp)). Base (`algorithm.off_policy`): behaviour -> the engine's
  logprobs `mb.old_logprobs`; decoupled -> the recomputed proximal logprobs `mb.prox_logprobs`, and the policy
  gradient term is multiplied by a detached behaviour weight w = exp(prox - old): truncated at is_cap (tis), zero
  for tokens with w > is_cap (mis), or w = 1 (none). w weights the policy-gradient term only, not KL or entropy.
- Regularisers: + kl_coef * k3(old || current) with k3 = exp(old - lp) - (old - lp) - 1, and - entropy_coef * H.
- Aggregation (`algorithm.loss_agg`), with x the per-token loss and sums over loss tokens:
  token-mean: sum x / global_tokens; seq-mean-token-sum: sum x / global_seqs; seq-mean-token-mean:
  sum_seq (sum_t x / n_seq) / global_seqs; seq-mean-token-sum-norm (Dr. GRPO): sum x / (global_seqs * max_new_tokens).
- Metrics: `loss` and `pg_loss` are shares under `loss_agg`; token statistics are token sums / global_tokens, i.e.
  mini-batch token means once summed: `clipfrac_upper` (ppo/gspo: A > 0 and r > hi; cispo: r > hi),
  `clipfrac_lower` (ppo/gspo: A < 0 and r < lo; cispo: r < lo), `clipfrac_dual` (A < 0 and r > c), `approx_kl`
  (k3 vs old), `ratio_mean`, `entropy` (only when entropies are given); decoupled mode adds `is_weight_mean` (the
  raw w before truncation) and `is_weight_capped` (fraction of tokens with w > is_cap). Maxima are not reported:
  a max is not a summable share.
- Per-token maths runs on the packed loss tokens only ((N,) vectors gathered with the mask), so its cost follows
  the number of loss tokens, not the padded (B, T) size.
"""

from __future__ import annotations

import functools

import torch

from pipeline.config import AlgorithmConfig
from pipeline.contracts.backend import LossFn, MicroBatch

POLICY_LOSSES = ("ppo", "gspo", "cispo")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
OFF_POLICY = ("behaviour", "decoupled")
IS_CORRECTIONS = ("none", "tis", "mis")

_CHUNK_ELEMS = 1 << 26  # logits elements upcast to float32 at a time by the logit helpers


# --------------------------------------------------------------------------------------------------- logit helpers
def _row_chunks(logits: torch.Tensor) -> tuple[torch.Tensor, int, torch.dtype]:
    flat = logits.reshape(-1, logits.shape[-1])
    return flat, max(1, _CHUNK_ELEMS // max(flat.shape[1], 1)), torch.promote_types(logits.dtype, torch.float32)


def logprobs_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., V) logits and (...) token ids -> (...) log pi(target), in float32 (float64 for float64 logits).

    logit[target] - logsumexp(logits): never materialises a (..., V) log-softmax, and upcasts low-precision logits
    to float32 one chunk of rows at a time.
    """
    flat, rows, dt = _row_chunks(logits)
    tgt = targets.reshape(-1, 1)
    parts = []
    for i in range(0, flat.shape[0], rows):
        z = flat[i : i + rows].to(dt)
        parts.append(z.gather(1, tgt[i : i + rows]).squeeze(1) - torch.logsumexp(z, dim=-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=dt)
    return out.view(targets.shape)


def token_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy (float32 or wider) H = logsumexp(z) - sum softmax(z) * z (differentiable)."""
    flat, rows, dt = _row_chunks(logits)
    parts = []
    for i in range(0, flat.shape[0], rows):
        z = flat[i : i + rows].to(dt)
        parts.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    out = torch.cat(parts) if parts else flat.new_zeros(0, dtype=dt)
    return out.view(logits.shape[:-1])


# --------------------------------------------------------------------------------------------------- loss pieces
class _LossTokens:
    """The loss positions of a micro-batch, packed: per-token maths runs on (N,) vectors of loss tokens only, so
    padding and prompt positions cost nothing and their (possibly non-finite) values are never read."""

    def __init__(self, mb: MicroBatch, device: torch.device):
        mask = mb.loss_mask.to(device) > 0  # (B, T)
        self.index = mask.nonzero(as_tuple=True)  # (rows, cols), each (N,)
        self.rows = self.index[0]
        self.num_seqs = mask.shape[0]
        self.seq_len = mask.sum(dim=1).clamp(min=1)  # (B,) loss tokens per sequence
        self.tokens = max(float(mb.global_tokens), 1.0)
        self.seqs = max(float(mb.global_seqs), 1.0)
        self.max_new_tokens = max(int(mb.max_new_tokens), 1)

    def take(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(self.rows.device)[self.index].to(dtype)

    def seq_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) token values -> (B,) mean over each sequence's loss tokens."""
        return x.new_zeros(self.num_seqs).index_add(0, self.rows, x) / self.seq_len.to(x.dtype)

    def aggregate(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """This micro-batch's share of the mini-batch aggregate of per-token values x (N,)."""
        if mode == "token-mean":
            return x.sum() / self.tokens
        if mode == "seq-mean-token-sum":
            return x.sum() / self.seqs
        if mode == "seq-mean-token-mean":
            return (x / self.seq_len.to(x.dtype)[self.rows]).sum() / self.seqs
        if mode == "seq-mean-token-sum-norm":
            return x.sum() / (self.seqs * self.max_new_tokens)
        raise ValueError(f"algorithm.loss_agg: unknown aggregation {mode!r}; expected one of {', '.join(AGGREGATIONS)}")

    def share(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Token sum / global_tokens of a detached statistic (a token-mean share)."""
        return x.detach().to(dtype).sum() / self.tokens


def _behaviour_weight(
    old: torch.Tensor, tok: _LossTokens, mb: MicroBatch, cfg: AlgorithmConfig
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """The ratio's base logprobs, the detached weight on the pg term (None = 1), and per-token weight statistics."""
    if cfg.off_policy == "behaviour":
        return old, None, {}
    if cfg.off_policy != "decoupled":
        raise ValueError(
            f"algorithm.off_policy: unknown mode {cfg.off_policy!r}; expected one of {', '.join(OFF_POLICY)}"
        )
    if mb.prox_logprobs is None:
        raise ValueError("algorithm.off_policy=decoupled: the micro-batch has no prox_logprobs (compute them first)")
    prox = tok.take(mb.prox_logprobs.detach(), old.dtype)
    raw = torch.exp((prox - old).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp))
    over = raw > cfg.is_cap
    if cfg.is_correction == "tis":
        w = raw.clamp(max=cfg.is_cap)
    elif cfg.is_correction == "mis":
        w = torch.where(over, 0.0, raw)
    elif cfg.is_correction == "none":
        w = None
    else:
        raise ValueError(
            f"algorithm.is_correction: unknown mode {cfg.is_correction!r}; expected one of {', '.join(IS_CORRECTIONS)}"
        )
    return prox, w, {"is_weight_mean": raw, "is_weight_capped": over}


def _log_ratio(lp: torch.Tensor, base: torch.Tensor, tok: _LossTokens, cfg: AlgorithmConfig) -> torch.Tensor:
    """Per-token log r (N,), clamped; for gspo the sequence value with per-token gradients."""
    c = cfg.log_ratio_clamp
    if cfg.policy_loss != "gspo":
        return (lp - base).clamp(-c, c)
    seq = tok.seq_mean((lp - base).detach()).clamp(-c, c)  # (B,)
    # Value: the sequence log-ratio; gradient: d log pi(y_t) per token (GSPO-token with A_t = A_seq).
    return seq[tok.rows] + (lp - lp.detach())


def _clipped_pg(
    ratio: torch.Tensor, adv: torch.Tensor, cfg: AlgorithmConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """PPO-clip term (N,) and the boolean masks where the upper, lower and dual clips are active."""
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    upper = (ratio > hi) & (adv > 0)
    lower = (ratio < lo) & (adv < 0)
    # Where a clip is active the ratio is replaced by its (constant) bound: no gradient, exactly as
    # max(-A r, -A clip(r)) off the bound; exactly on the bound the clip is inactive and the gradient flows.
    pg = -adv * torch.where(upper | lower, ratio.detach().clamp(lo, hi), ratio)
    dual = None
    if cfg.dual_clip_c > 1.0:
        dual = (ratio > cfg.dual_clip_c) & (adv < 0)
        pg = torch.where(dual, -adv * cfg.dual_clip_c, pg)
    return pg, upper, lower, dual


def _cispo_pg(
    lp: torch.Tensor, ratio: torch.Tensor, adv: torch.Tensor, cfg: AlgorithmConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    r = ratio.detach()
    return -adv * r.clamp(lo, hi) * lp, r > hi, r < lo, None


# --------------------------------------------------------------------------------------------------- the LossFn
def policy_loss(
    logprobs: torch.Tensor, entropy: torch.Tensor | None, mb: MicroBatch, cfg: AlgorithmConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share of the mini-batch loss, and its metric shares (see the module docstring)."""
    dt = torch.promote_types(logprobs.dtype, torch.float32)  # float32 maths at least (bf16 logprobs are upcast)
    tok = _LossTokens(mb, logprobs.device)
    lp = tok.take(logprobs, dt)  # (N,) with gradient
    old = tok.take(mb.old_logprobs.detach(), dt)
    adv = tok.take(mb.advantages.detach(), dt)

    base, w, w_stats = _behaviour_weight(old, tok, mb, cfg)
    ratio = torch.exp(_log_ratio(lp, base, tok, cfg))
    if cfg.policy_loss == "cispo":
        pg, upper, lower, dual = _cispo_pg(lp, ratio, adv, cfg)
    elif cfg.policy_loss in ("ppo", "gspo"):
        pg, upper, lower, dual = _clipped_pg(ratio, adv, cfg)
    else:
        raise ValueError(
            f"algorithm.policy_loss: unknown loss {cfg.policy_loss!r}; expected one of {', '.join(POLICY_LOSSES)}"
        )
    if w is not None:
        pg = pg * w

    d = (old - lp).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    kl = torch.exp(d) - d - 1.0  # k3 estimate of KL(old || current), >= 0
    per_token = pg + cfg.kl_coef * kl if cfg.kl_coef else pg
    ent = None
    if entropy is not None:
        ent = tok.take(entropy, dt)
        if cfg.entropy_coef:
            per_token = per_token - cfg.entropy_coef * ent
    elif cfg.entropy_coef:
        raise ValueError("algorithm.entropy_coef: an entropy bonus needs the backend to pass per-token entropies")

    loss = tok.aggregate(per_token, cfg.loss_agg)
    zero = loss.new_zeros(())
    metrics = {
        "loss": loss.detach(),
        "pg_loss": tok.aggregate(pg.detach(), cfg.loss_agg),
        "clipfrac_upper": tok.share(upper, dt),
        "clipfrac_lower": tok.share(lower, dt),
        "clipfrac_dual": tok.share(dual, dt) if dual is not None else zero,
        "approx_kl": tok.share(kl, dt),
        "ratio_mean": tok.share(ratio, dt),
    }
    if ent is not None:
        metrics["entropy"] = tok.share(ent, dt)
    metrics.update({k: tok.share(v, dt) for k, v in w_stats.items()})
    return loss, metrics


def check_config(cfg: AlgorithmConfig) -> None:
    """Raise ValueError naming the key of an unknown loss option."""
    for key, value, choices in (
        ("algorithm.policy_loss", cfg.policy_loss, POLICY_LOSSES),
        ("algorithm.loss_agg", cfg.loss_agg, AGGREGATIONS),
        ("algorithm.off_policy", cfg.off_policy, OFF_POLICY),
        ("algorithm.is_correction", cfg.is_correction, IS_CORRECTIONS),
    ):
        if value not in choices:
            raise ValueError(f"{key}: must be one of {', '.join(choices)}; got {value!r}")
    if cfg.dual_clip_c and cfg.dual_clip_c <= 1.0:
        raise ValueError(f"algorithm.dual_clip_c: must be 0 (off) or > 1; got {cfg.dual_clip_c}")


def make_loss_fn(cfg: AlgorithmConfig) -> LossFn:
    """`policy_loss` bound to `cfg`, with the (logprobs, entropy, mb) signature the backends call."""
    check_config(cfg)
    return functools.partial(policy_loss, cfg=cfg)
