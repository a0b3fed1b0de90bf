"""Train-inference mismatch of a MoE with and without rollout routing replay (R3), on CPU.

Workload: a tiny Qwen3-MoE (16 experts, top-4, 4 layers, hidden 64) with random weights. The CPU engine
(engines/local, in-process) generates 16 prompts x 24 tokens at temperature 1 in bfloat16 and records the routed
experts; the megatron trainer (one gloo rank) computes the logprobs of the same samples in float32 from the same
(bf16-rounded) weights, with and without replaying the engine's routing. Prints the share of (token, layer) routes
and of tokens whose trainer top-k differs from the engine's, and the mean / max |delta logprob| and the k3 KL estimate
over the response tokens in both modes (tests/test_routing_replay.py has the constructed-tie variant that the README
table also reports).

Quick mode (--quick): 4 prompts x 12 tokens, same model.

Run: .venv/bin/python -m benchmarks.bench_routing_replay [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from engines.megatron.launch import spawn
from pipeline.testing.megatron import save_tiny_hf
from pipeline.testing.moe import micro_batch, rollout, single_worker


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-r3-") as tmp:
        return _measure(tmp, quick)


def _measure(tmp: str, quick: bool) -> dict:
    n_prompts, new_tokens = (4, 12) if quick else (16, 24)
    trainer_dir = os.path.join(tmp, "trainer")
    model = save_tiny_hf(trainer_dir, "qwen3_moe", tie=False, seed=1, layers=4, num_experts=16, num_experts_per_tok=4)
    with torch.no_grad():  # the trainer starts from the weights the bf16 engine holds
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(trainer_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 200, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_prompts)]  # fmt: skip
    samples = rollout(model.to(torch.bfloat16), prompts, new_tokens, max_running=8, timeout_s=600)
    torch.save(samples, os.path.join(tmp, "samples.pt"))
    spawn(single_worker, 1, tmp, timeout_s=600)
    res = torch.load(os.path.join(tmp, "single.pt"))
    mb = micro_batch(samples)
    mask = mb.loss_mask.bool()
    replay, own = res["step"]["metrics"], res["step_off"]["metrics"]
    out: dict = {
        "response_tokens": int(mask.sum()),
        "routing_mismatch": own["moe/routing_mismatch"],
        "routing_mismatch_tokens": own["moe/routing_mismatch_tokens"],
    }
    print(f"response tokens: {out['response_tokens']}")
    print(f"routes flipped without replay: {own['moe/routing_mismatch']:.2%} of (token, layer), "
          f"{own['moe/routing_mismatch_tokens']:.2%} of tokens")  # fmt: skip
    for key, name, lp, m in (("noreplay", "without replay", res["lp_own"], own),
                             ("replay", "with replay", res["lp_replay"], replay)):  # fmt: skip
        d = (lp - mb.old_logprobs)[mask].abs()
        out |= {f"dlogp_mean_{key}": float(d.mean()), f"dlogp_max_{key}": float(d.max()),
                f"kl_k3_{key}": m["rollout/kl_k3"]}  # fmt: skip
        print(f"{name:15s} |dlogp| mean {d.mean():.2e} max {d.max():.2e}  KL k3 {m['rollout/kl_k3']:.2e}")
    # The headline: how much of the train-inference KL replay removes (>1: replay helps).
    out["kl_k3_noreplay_over_replay_ratio"] = out["kl_k3_noreplay"] / max(out["kl_k3_replay"], 1e-30)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 prompts x 12 tokens instead of 16 x 24")
    run(p.parse_args().quick)


if __name__ == "__main__":
    main()
