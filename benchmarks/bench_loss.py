"""Vectorised DAPO policy loss + backward vs a naive per-sample Python loop, same inputs, same run.

Workload: 16 sequences x 8192 positions (quick: x 1024), vocab-free: per-token logprobs (a leaf that requires grad),
behaviour logprobs, one advantage per sequence, response lengths drawn in [T/2, T] after a 256-token prompt
(quick: 32). Loss: the DAPO default (PPO clip-higher 0.2/0.28, token-mean, behaviour ratio). Baseline: a Python loop
over the sequences computing the textbook form max(-A r, -A clip(r)) on each sequence's response slice and
summing / total tokens. Both values and gradients are checked to agree before timing. Best of `repeats` runs each
(the machine may be shared). On CPU both run with `threads` torch threads (default 1, as a trainer rank with
trainer.threads = 1; on an oversubscribed machine extra intra-op threads only add contention). Prints ns per batch
position (B x T) of each and the speed-up ratio (naive / vectorised).

Run: .venv/bin/python -m benchmarks.bench_loss [--quick] [--repeats R] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.algorithm.losses import policy_loss
from pipeline.config import AlgorithmConfig
from pipeline.contracts.backend import MicroBatch


def make_batch(batch: int, seq: int, prompt: int, device: str, seed: int = 0) -> tuple[MicroBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(seq // 2 - prompt, seq - prompt + 1, (batch,), generator=g)
    pos = torch.arange(seq)[None]
    mask = ((pos >= prompt) & (pos < prompt + lengths[:, None])).float()
    old = -torch.rand(batch, seq, generator=g) * 3
    current = old + torch.randn(batch, seq, generator=g) * 0.2  # ratios spread over both clip bounds
    adv = torch.randn(batch, 1, generator=g).expand(batch, seq) * mask
    mb = MicroBatch(
        input_ids=torch.zeros(batch, seq, dtype=torch.long, device=device),
        attention_mask=torch.ones(batch, seq, dtype=torch.long, device=device),
        position_ids=pos.expand(batch, seq).to(device),
        loss_mask=mask.to(device),
        old_logprobs=old.to(device),
        advantages=adv.contiguous().to(device),
        global_tokens=float(mask.sum()),
        global_seqs=float(batch),
        max_new_tokens=seq,
    )
    return mb, current.to(device)


def naive_loss(logprobs: torch.Tensor, mb: MicroBatch, cfg: AlgorithmConfig) -> torch.Tensor:
    """Per-sample loop, textbook PPO clip-higher, token-mean over the batch."""
    total = logprobs.new_zeros(())
    for i in range(logprobs.shape[0]):
        idx = mb.loss_mask[i].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        lp, old, a = logprobs[i, idx], mb.old_logprobs[i, idx], mb.advantages[i, idx]
        ratio = torch.exp((lp - old).clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp))
        clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
        total = total + torch.maximum(-a * ratio, -a * clipped).sum()
    return total / mb.global_tokens


def _time(fn, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = False, repeats: int = 5, device: str | None = None, threads: int = 1) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(quick, repeats, device) | {"threads": threads}
    finally:
        torch.set_num_threads(saved)


def _run(quick: bool, repeats: int, device: str) -> dict:
    seq, prompt = (1024, 32) if quick else (8192, 256)
    batch = 16
    cfg = AlgorithmConfig()
    mb, current = make_batch(batch, seq, prompt, device)

    def vectorised() -> tuple[torch.Tensor, torch.Tensor]:
        lp = current.clone().requires_grad_(True)
        loss, _ = policy_loss(lp, None, mb, cfg)
        loss.backward()
        return loss.detach(), lp.grad

    def naive() -> tuple[torch.Tensor, torch.Tensor]:
        lp = current.clone().requires_grad_(True)
        loss = naive_loss(lp, mb, cfg)
        loss.backward()
        return loss.detach(), lp.grad

    (lv, gv), (ln, gn) = vectorised(), naive()  # warm-up and the agreement check
    loss_diff = abs(lv.item() - ln.item())
    grad_diff = (gv - gn).abs().max().item()
    if loss_diff > 1e-5 * max(1.0, abs(ln.item())) or grad_diff > 1e-7:
        raise AssertionError(f"vectorised and naive losses disagree: loss diff {loss_diff}, grad diff {grad_diff}")
    t_vec = _time(vectorised, device, repeats)
    t_naive = _time(naive, device, repeats)
    positions = batch * seq
    return {
        "device": device,
        "shape": f"{batch}x{seq}",
        "loss_tokens": int(mb.global_tokens),
        "loss_value": lv.item(),
        "loss_abs_diff": loss_diff,
        "grad_max_abs_diff": grad_diff,
        "vectorised_ms": t_vec * 1e3,
        "naive_ms": t_naive * 1e3,
        "vectorised_ns_per_token": t_vec * 1e9 / positions,
        "naive_ns_per_token": t_naive * 1e9 / positions,
        "speedup_ratio": t_naive / t_vec,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 x 1024 instead of 16 x 8192")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    a = p.parse_args()
    r = run(a.quick, a.repeats, a.device, a.threads)
    print(
        f"loss+backward on {r['shape']} ({r['device']}, {r['threads']} thread(s), {r['loss_tokens']} loss tokens): "
        f"vectorised {r['vectorised_ms']:.2f} ms ({r['vectorised_ns_per_token']:.2f} ns/position), "
        f"naive per-sample loop {r['naive_ms']:.2f} ms ({r['naive_ns_per_token']:.2f} ns/position); "
        f"ratio naive/vectorised = {r['speedup_ratio']:.2f}x; loss {r['loss_value']:.6f} "
        f"(|diff| {r['loss_abs_diff']:.1e}, grad |diff| {r['grad_max_abs_diff']:.1e})"
    )


if __name__ == "__main__":
    main()
