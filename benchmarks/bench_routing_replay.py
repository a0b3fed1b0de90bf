"""Train-inference mismatch of a MoE with and without rollout routing replay (R3), on CPU.

Workload: a tiny Qwen3-MoE (16 experts, top-4, 4 layers, hidden 64) with random weights. The CPU engine
(engines/local, in-process) generates 16 prompts x 24 tokens at temperature 1 in bfloat16 and records the routed
experts; the megatron trainer (one gloo rank) computes the logprobs of the same samples in float32 from the same
(bf16-rounded) weights, with and without replaying the engine's routing. Prints the share of (token, layer) routes
and of tokens whose trainer top-k differs from the engine's, and the mean / max |delta logprob| and the k3 KL estimate
over the response tokens in both modes (tests/test_routing_replay.py has the constructed-tie variant that the README
table also reports).

Run: .venv/bin/python -m benchmarks.bench_routing_replay
"""

from __future__ import annotations

import os
import tempfile
import threading

import torch

from engines.megatron.launch import spawn
from pipeline.testing.megatron import save_tiny_hf
from tests import test_routing_replay as rr


def _rollout(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    from engines.local.engine import Engine, Request
    from engines.local.sampling import SamplingParams

    engine = Engine(model, max_running=8, seed=0).start()
    done, out = threading.Semaphore(0), []
    params = SamplingParams.from_json({"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True})
    for i, p in enumerate(prompts):
        engine.submit(Request(rid=str(i), prompt=p, params=params, return_routed_experts=True,
                              on_done=lambda r: (out.append(r), done.release())))  # fmt: skip
    for _ in prompts:
        assert done.acquire(timeout=600)
    engine.stop()
    out.sort(key=lambda r: int(r.rid))
    return [{"prompt": r.prompt, "output": r.output_ids, "logprobs": r.logprobs, "routing": r.routing()} for r in out]


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="bench-r3-")
    trainer_dir = os.path.join(tmp, "trainer")
    model = save_tiny_hf(trainer_dir, "qwen3_moe", tie=False, seed=1, layers=4, num_experts=16, num_experts_per_tok=4)
    with torch.no_grad():  # the trainer starts from the weights the bf16 engine holds
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(trainer_dir)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 200, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
               for _ in range(16)]  # fmt: skip
    samples = _rollout(model.to(torch.bfloat16), prompts, 24)
    torch.save(samples, os.path.join(tmp, "samples.pt"))
    spawn(rr._single_worker, 1, tmp, timeout_s=600)
    res = torch.load(os.path.join(tmp, "single.pt"))
    mb = rr.micro_batch(samples)
    mask = mb.loss_mask.bool()
    replay, own = res["step"]["metrics"], res["step_off"]["metrics"]
    print(f"response tokens: {int(mask.sum())}")
    print(f"routes flipped without replay: {own['moe/routing_mismatch']:.2%} of (token, layer), "
          f"{own['moe/routing_mismatch_tokens']:.2%} of tokens")  # fmt: skip
    for name, lp, m in (("without replay", res["lp_own"], own), ("with replay", res["lp_replay"], replay)):
        d = (lp - mb.old_logprobs)[mask].abs()
        print(f"{name:15s} |dlogp| mean {d.mean():.2e} max {d.max():.2e}  KL k3 {m['rollout/kl_k3']:.2e}")


if __name__ == "__main__":
    main()
