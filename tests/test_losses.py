"""policy_loss against hand-computed values: clip boundaries, dual clip, GSPO, CISPO, off-policy weights,
regularisers, every aggregation mode, empty responses, and the logit helpers."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import pipeline.algorithm.losses as losses
from pipeline.algorithm.losses import logprobs_from_logits, make_loss_fn, policy_loss, token_entropy_from_logits
from pipeline.config import AlgorithmConfig
from pipeline.contracts.backend import MicroBatch

CFG = AlgorithmConfig()  # DAPO defaults: eps_low 0.2, eps_high 0.28, token-mean, behaviour ratio, no KL


def make_mb(log_ratio, adv, *, old=None, prox=None, lengths=None, **kw) -> tuple[MicroBatch, torch.Tensor]:
    """One row per sequence; position 0 is a prompt token. Returns the batch and logprobs (leaf, requires grad)
    with logprobs - old_logprobs = log_ratio on response positions."""
    log_ratio = torch.as_tensor(log_ratio, dtype=torch.float32)
    if log_ratio.dim() == 1:
        log_ratio = log_ratio[None]
    B, n = log_ratio.shape
    T = n + 1
    lengths = lengths if lengths is not None else [n] * B
    mask = torch.zeros(B, T)
    for i, length in enumerate(lengths):
        mask[i, 1 : 1 + length] = 1.0
    old_t = torch.full((B, T), -1.0) if old is None else torch.as_tensor(old, dtype=torch.float32)
    lp = old_t.clone()
    lp[:, 1:] += log_ratio
    adv_t = torch.as_tensor(adv, dtype=torch.float32)
    adv_full = torch.zeros(B, T)
    adv_full[:, 1:] = adv_t.reshape(B, -1) if adv_t.numel() > 1 else adv_t
    adv_full = adv_full * mask
    kw.setdefault("global_tokens", float(mask.sum()))
    kw.setdefault("global_seqs", float(B))
    mb = MicroBatch(
        input_ids=torch.zeros(B, T, dtype=torch.long),
        attention_mask=torch.ones(B, T, dtype=torch.long),
        position_ids=torch.arange(T).expand(B, T),
        loss_mask=mask,
        old_logprobs=old_t,
        advantages=adv_full,
        prox_logprobs=prox,
        **kw,
    )
    return mb, lp.requires_grad_(True)


def run(mb, lp, cfg=CFG, entropy=None):
    loss, metrics = policy_loss(lp, entropy, mb, cfg)
    loss.backward()
    return loss.item(), lp.grad[:, 1:], metrics


def test_ppo_clip_higher_positive_advantage():
    # A = +1, ratios: inside (1.27), above the upper clip (1.29, 1.5), below the lower bound (0.5: not clipped
    # for A > 0). Token-mean over 4 tokens: loss = sum(-A * r_eff) / 4; grad = -A * r / 4 where unclipped.
    r = torch.tensor([1.27, 1.29, 1.5, 0.5])
    mb, lp = make_mb(torch.log(r), 1.0)
    loss, grad, m = run(mb, lp)
    assert loss == pytest.approx(-(1.27 + 1.28 + 1.28 + 0.5) / 4, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-1.27 / 4, 0.0, 0.0, -0.5 / 4]]), atol=1e-6, rtol=0)
    assert m["clipfrac_upper"].item() == pytest.approx(2 / 4)
    assert m["clipfrac_lower"].item() == 0.0
    assert m["ratio_mean"].item() == pytest.approx((1.27 + 1.29 + 1.5 + 0.5) / 4, abs=1e-6)


def test_ppo_clip_negative_advantage():
    # A = -1: r = 0.81 inside, 0.79 and 0.5 clipped at 0.8 (no gradient), 1.5 unclipped (the dual-clip case).
    r = torch.tensor([0.81, 0.79, 0.5, 1.5])
    mb, lp = make_mb(torch.log(r), -1.0)
    loss, grad, m = run(mb, lp)
    assert loss == pytest.approx((0.81 + 0.8 + 0.8 + 1.5) / 4, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.81 / 4, 0.0, 0.0, 1.5 / 4]]), atol=1e-6, rtol=0)
    assert m["clipfrac_lower"].item() == pytest.approx(2 / 4)
    assert m["clipfrac_upper"].item() == 0.0
    assert m["clipfrac_dual"].item() == 0.0


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_exactly_on_the_bound_is_not_clipped(adv):
    log_r = 0.2 if adv > 0 else -0.2
    mb, lp = make_mb([log_r], adv)
    r = torch.exp(lp[:, 1:] - mb.old_logprobs[:, 1:]).item()  # the float32 ratio the loss will see
    # Bound set to exactly this ratio: not clipped, full gradient.
    cfg = replace(CFG, eps_high=r - 1.0) if adv > 0 else replace(CFG, eps_low=1.0 - r)
    loss, grad, m = run(mb, lp, cfg)
    assert loss == pytest.approx(-adv * r, abs=1e-6)
    assert grad.item() == pytest.approx(-adv * r, abs=1e-6)
    assert m["clipfrac_upper"].item() + m["clipfrac_lower"].item() == 0.0
    # Just past the bound (moved 1e-6 inwards, a few float32 ulps): clipped, zero gradient, value at the bound.
    mb, lp = make_mb([log_r], adv)
    cfg = replace(CFG, eps_high=r - 1.0 - 1e-6) if adv > 0 else replace(CFG, eps_low=1.0 - r - 1e-6)
    loss, grad, m = run(mb, lp, cfg)
    assert grad.item() == 0.0
    assert loss == pytest.approx(-adv * (r - 1e-6 if adv > 0 else r + 1e-6), abs=1e-6)
    assert m["clipfrac_upper" if adv > 0 else "clipfrac_lower"].item() == 1.0


def test_dual_clip():
    cfg = replace(CFG, dual_clip_c=3.0)
    # A = -2: r = 4 > c -> constant -A*c = 6, no gradient; r = 2.5 < c -> -A*r = 5 with gradient 2*2.5.
    r = torch.tensor([4.0, 2.5])
    mb, lp = make_mb(torch.log(r), -2.0)
    loss, grad, m = run(mb, lp, cfg)
    assert loss == pytest.approx((6.0 + 5.0) / 2, abs=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 5.0 / 2]]), atol=1e-5, rtol=0)
    assert m["clipfrac_dual"].item() == pytest.approx(0.5)
    # Off by default: the r = 4 token is unbounded.
    mb, lp = make_mb(torch.log(r), -2.0)
    loss, _, m = run(mb, lp)
    assert loss == pytest.approx((8.0 + 5.0) / 2, abs=1e-5)
    assert m["clipfrac_dual"].item() == 0.0
    # Positive advantages are never dual-clipped.
    mb, lp = make_mb(torch.log(torch.tensor([4.0])), 1.0)
    assert run(mb, lp, cfg)[0] == pytest.approx(-1.28, abs=1e-6)


def test_aggregation_modes_by_hand():
    # Ratio 1 everywhere, so the per-token loss is -A. Seq 0: 3 tokens with A = 1 (sum -3, mean -1);
    # seq 1: 1 token with A = -2 (sum 2, mean 2). 4 tokens, 2 sequences, L_max = 8.
    expected = {
        "token-mean": (-3 + 2) / 4,
        "seq-mean-token-sum": (-3 + 2) / 2,
        "seq-mean-token-mean": (-1 + 2) / 2,
        "seq-mean-token-sum-norm": (-3 + 2) / (2 * 8),
    }
    for mode, value in expected.items():
        mb, lp = make_mb(torch.zeros(2, 3), [[1.0] * 3, [-2.0] * 3], lengths=[3, 1], max_new_tokens=8)
        loss, grad, m = run(mb, lp, replace(CFG, loss_agg=mode))
        assert loss == pytest.approx(value, abs=1e-6), mode
        assert m["pg_loss"].item() == pytest.approx(value, abs=1e-6), mode
        assert grad[1, 1:].abs().sum() == 0.0  # padding of the short sequence gets no gradient
    # A share: the same micro-batch inside a mini-batch twice as large contributes half.
    mb, lp = make_mb(torch.zeros(2, 3), [[1.0] * 3, [-2.0] * 3], lengths=[3, 1], global_tokens=8.0)
    assert run(mb, lp)[0] == pytest.approx(-1 / 8, abs=1e-6)


def test_empty_response_gives_zero_loss_and_no_nan():
    mb, lp = make_mb(torch.zeros(2, 3), 1.0, lengths=[0, 0], global_tokens=0.0)
    with torch.no_grad():
        lp[:, 1:] = -math.inf  # garbage at non-loss positions must not leak
    ent = torch.full_like(lp, math.nan).requires_grad_(True)
    cfg = replace(CFG, kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = policy_loss(lp, ent, mb, cfg)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp)) and torch.equal(ent.grad, torch.zeros_like(ent))
    assert all(torch.isfinite(v) and v.item() == 0.0 for v in metrics.values())


def test_gspo_sequence_ratio():
    # Token log-ratios (0.1, 0.3): sequence ratio e^0.2 for both tokens, A = 1, not clipped.
    mb, lp = make_mb([0.1, 0.3], 1.0)
    cfg = replace(CFG, policy_loss="gspo")
    loss, grad, m = run(mb, lp, cfg)
    s = math.exp(0.2)
    assert loss == pytest.approx(-s, abs=1e-6)
    torch.testing.assert_close(grad, torch.full((1, 2), -s / 2), atol=1e-6, rtol=0)
    assert m["ratio_mean"].item() == pytest.approx(s, abs=1e-6)
    # (0.4, 0.2): the sequence ratio e^0.3 = 1.35 > 1.28 clips the whole sequence, although token 2 alone
    # (e^0.2 = 1.22) would not be clipped under token-level PPO.
    mb, lp = make_mb([0.4, 0.2], 1.0)
    loss, grad, m = run(mb, lp, cfg)
    assert loss == pytest.approx(-1.28, abs=1e-6)
    assert torch.equal(grad, torch.zeros(1, 2))
    assert m["clipfrac_upper"].item() == 1.0
    mb, lp = make_mb([0.4, 0.2], 1.0)
    assert run(mb, lp)[1][0, 1].item() == pytest.approx(-math.exp(0.2) / 2, abs=1e-6)


def test_cispo_keeps_gradient_of_clipped_tokens():
    # A = 1, logprobs -0.5; r = 1.5 -> weight 1.28, r = 1.1 -> weight 1.1. Per-token loss -A * w * lp.
    old = torch.tensor([[-1.0, -0.5 - math.log(1.5), -0.5 - math.log(1.1)]])
    mb, lp = make_mb([math.log(1.5), math.log(1.1)], 1.0, old=old)
    loss, grad, m = run(mb, lp, replace(CFG, policy_loss="cispo"))
    assert loss == pytest.approx((1.28 * 0.5 + 1.1 * 0.5) / 2, abs=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[-1.28 / 2, -1.1 / 2]]), atol=1e-5, rtol=0)
    assert m["clipfrac_upper"].item() == pytest.approx(0.5)


def _decoupled(is_correction, cap=2.0):
    # prox - old = log 3 (w = 3) on token 1 and log 1.5 on token 2; current == prox (ratio 1); A = 1.
    old = torch.full((1, 3), -2.0)
    prox = old.clone()
    prox[0, 1] += math.log(3.0)
    prox[0, 2] += math.log(1.5)
    mb, lp = make_mb([math.log(3.0), math.log(1.5)], 1.0, old=old, prox=prox)
    return run(mb, lp, replace(CFG, off_policy="decoupled", is_correction=is_correction, is_cap=cap))


def test_decoupled_truncated_is_weights():
    loss, grad, m = _decoupled("tis")
    assert loss == pytest.approx(-(2.0 + 1.5) / 2, abs=1e-5)  # w = min(3, 2) and 1.5, ratio vs prox = 1
    torch.testing.assert_close(grad, torch.tensor([[-2.0 / 2, -1.5 / 2]]), atol=1e-5, rtol=0)
    assert m["is_weight_mean"].item() == pytest.approx((3.0 + 1.5) / 2, abs=1e-5)
    assert m["is_weight_capped"].item() == pytest.approx(0.5)
    assert m["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)


def test_decoupled_masked_and_uncorrected():
    loss, grad, _ = _decoupled("mis")
    assert loss == pytest.approx(-1.5 / 2, abs=1e-5)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.5 / 2]]), atol=1e-5, rtol=0)
    loss, grad, _ = _decoupled("none")
    assert loss == pytest.approx(-1.0, abs=1e-5)


def test_decoupled_needs_prox():
    mb, lp = make_mb([0.0], 1.0)
    with pytest.raises(ValueError, match="prox_logprobs"):
        policy_loss(lp, None, mb, replace(CFG, off_policy="decoupled"))


def test_kl_k3_and_entropy_bonus():
    # A = 0: only the regularisers act. old - lp = delta = 0.5; k3 = e^delta - delta - 1; d k3 / d lp = 1 - e^delta.
    delta = 0.5
    mb, lp = make_mb([-delta], 0.0)
    ent = torch.tensor([[0.0, 2.0]], requires_grad=True)
    cfg = replace(CFG, kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = policy_loss(lp, ent, mb, cfg)
    loss.backward()
    k3 = math.exp(delta) - delta - 1
    assert loss.item() == pytest.approx(0.1 * k3 - 0.01 * 2.0, abs=1e-6)
    assert lp.grad[0, 1].item() == pytest.approx(0.1 * (1 - math.exp(delta)), abs=1e-6)
    assert ent.grad[0].tolist() == pytest.approx([0.0, -0.01])
    assert metrics["approx_kl"].item() == pytest.approx(k3, abs=1e-6)
    assert metrics["entropy"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="entropy_coef"):
        policy_loss(lp, None, mb, cfg)
    assert "entropy" not in policy_loss(lp, None, mb, CFG)[1]


def test_log_ratio_clamp_keeps_loss_finite():
    mb, lp = make_mb([80.0], -1.0)
    loss, grad, _ = run(mb, lp, replace(CFG, log_ratio_clamp=20.0))
    assert loss == pytest.approx(math.exp(20.0), rel=1e-5)
    assert grad.item() == 0.0


def test_metric_shares_sum_over_micro_batches():
    torch.manual_seed(0)
    log_r = torch.randn(4, 5) * 0.3
    adv = torch.randn(4, 1).expand(4, 5)
    lengths = [5, 2, 4, 1]
    whole, lp = make_mb(log_r, adv, lengths=lengths)
    _, m_whole = policy_loss(lp, None, whole, CFG)
    summed: dict[str, float] = {}
    for rows in ([0, 1], [2, 3]):
        mb, lp = make_mb(log_r[rows], adv[rows], lengths=[lengths[i] for i in rows], global_tokens=12.0, global_seqs=4)
        for k, v in policy_loss(lp, None, mb, CFG)[1].items():
            summed[k] = summed.get(k, 0.0) + v.item()
    assert summed.keys() == m_whole.keys()
    for k, v in m_whole.items():
        assert summed[k] == pytest.approx(v.item(), abs=1e-6), k


def test_make_loss_fn_binds_config_and_checks_keys():
    fn = make_loss_fn(CFG)
    mb, lp = make_mb([0.1], 1.0)
    assert fn(lp, None, mb)[0].item() == pytest.approx(-math.exp(0.1), abs=1e-6)
    for key, bad in (("policy_loss", "ppo2"), ("loss_agg", "mean"), ("off_policy", "x"), ("is_correction", "y")):
        with pytest.raises(ValueError, match=f"algorithm.{key}"):
            make_loss_fn(replace(CFG, **{key: bad}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_helpers_match_reference(dtype, monkeypatch):
    monkeypatch.setattr(losses, "_CHUNK_ELEMS", 40)  # several chunks of 2 rows
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 17) * 3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 17, (2, 3))
    lp = logprobs_from_logits(logits, targets)
    ent = token_entropy_from_logits(logits)
    ref32 = logits.float()
    ref_lp = torch.log_softmax(ref32, -1).gather(-1, targets[..., None]).squeeze(-1)
    ref_ent = -(torch.softmax(ref32, -1) * torch.log_softmax(ref32, -1)).sum(-1)
    assert lp.dtype == torch.float32 and lp.shape == (2, 3) and ent.shape == (2, 3)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    (lp.sum() + ent.sum()).backward()
    g = logits.grad.clone()
    logits.grad = None
    (ref_lp.sum() + ref_ent.sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to bf16 after summation
    torch.testing.assert_close(g, logits.grad, atol=tol, rtol=tol)
