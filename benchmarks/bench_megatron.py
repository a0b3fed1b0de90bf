"""Megatron trainer: THD sequence packing vs the padded (B, T) layout, same model, same batch, same run.

Workload: a tiny Qwen2 (hidden 256, 4 layers, 8 heads / 2 KV heads, vocab 1024; quick: hidden 128, 2 layers),
one trainer rank on gloo (1 thread), one mini-batch of 32 sequences (quick: 16) in micro-batches of 8 rows, lengths
drawn long-tailed in [16, 512] (quick: [16, 128]) as RL responses are: most short, a few near the cap. Timed: one
`train_minibatch` (forward + backward of every micro-batch, DAPO loss, optimizer step), best of `repeats` after a
warm-up step. Baseline: the same backend with `packing=False` (right-padded rows, causal attention over the padding).
Both runs start from the same weights and their first-step losses are checked to agree before timing.
Prints ms per mini-batch for each, the padded layout's token efficiency, and the speed-up (padded / packed).

Run: .venv/bin/python -m benchmarks.bench_megatron [--quick] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from engines.megatron.launch import init_dist, spawn
from pipeline.contracts.backend import MicroBatch
from pipeline.testing.megatron import save_tiny_hf, tiny_config


def _batch(n_seqs: int, max_len: int, rows: int, vocab: int, seed: int = 0) -> list[MicroBatch]:
    g = torch.Generator().manual_seed(seed)
    # Long tail: lengths = 16 + (max_len - 16) * u^3.
    lengths = (16 + (max_len - 16) * torch.rand(n_seqs, generator=g) ** 3).long()
    out = []
    for i in range(0, n_seqs, rows):
        lens = lengths[i : i + rows]
        T = int(lens.max())
        ids = torch.randint(1, vocab, (len(lens), T), generator=g)
        att = (torch.arange(T) < lens[:, None]).long()
        loss_mask = att.float() * (torch.arange(T) >= 8).float()
        out.append(
            MicroBatch(
                input_ids=ids * att,
                attention_mask=att,
                position_ids=torch.arange(T).expand(len(lens), T).contiguous(),
                loss_mask=loss_mask,
                old_logprobs=-7.0 * loss_mask,
                advantages=torch.randn(len(lens), 1, generator=g).expand(len(lens), T) * loss_mask,
            )
        )
    total = float(sum(mb.loss_mask.sum() for mb in out))
    for mb in out:
        mb.global_tokens, mb.global_seqs = total, float(n_seqs)
    return out


def _worker(rank: int, world_size: int, port: int, tmp: str, spec: dict) -> None:
    from engines.megatron.backend import MegatronBackend
    from pipeline.algorithm.losses import make_loss_fn

    init_dist(rank, world_size, port)
    cfg = tiny_config(lr=1e-5)
    loss_fn = make_loss_fn(cfg.algorithm)
    mbs = _batch(spec["n_seqs"], spec["max_len"], 8, spec["vocab"])
    result = {}
    for name, packing in (("packed", True), ("padded", False)):
        backend = MegatronBackend(cfg, rank, world_size, packing=packing)
        backend.setup(os.path.join(tmp, "hf"))
        first = backend.train_minibatch(mbs, loss_fn)  # warm-up, and the value check
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            backend.train_minibatch(mbs, loss_fn)
            times.append(time.perf_counter() - t0)
        result[name] = {"ms": 1e3 * min(times), "loss": first["loss"], "eff": first["padded_layout_efficiency"]}
    torch.save(result, os.path.join(tmp, "result.pt"))


def run(quick: bool = False, repeats: int = 3) -> dict:
    spec = {
        "n_seqs": 16 if quick else 32,
        "max_len": 128 if quick else 512,
        "vocab": 1024,
        "repeats": 1 if quick else repeats,
    }
    with tempfile.TemporaryDirectory() as tmp:
        hidden, layers = (128, 2) if quick else (256, 4)
        save_tiny_hf(
            os.path.join(tmp, "hf"), "qwen2", vocab_size=spec["vocab"], hidden_size=hidden, layers=layers, heads=8
        )
        spawn(_worker, 1, tmp, spec, timeout_s=600)
        r = torch.load(os.path.join(tmp, "result.pt"))
    if abs(r["packed"]["loss"] - r["padded"]["loss"]) > 1e-4:
        raise RuntimeError(f"packed and padded losses differ: {r['packed']['loss']} vs {r['padded']['loss']}")
    return {
        "packed_ms": r["packed"]["ms"],
        "padded_ms": r["padded"]["ms"],
        "padded_token_efficiency": r["packed"]["eff"],
        "speedup": r["padded"]["ms"] / r["packed"]["ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    r = run(args.quick, args.repeats)
    print(f"packed (THD) : {r['packed_ms']:.1f} ms / mini-batch")
    print(
        f"padded (B, T): {r['padded_ms']:.1f} ms / mini-batch  (real tokens / padded positions = {r['padded_token_efficiency']:.2f})"
    )
    print(f"speed-up (padded / packed): {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
