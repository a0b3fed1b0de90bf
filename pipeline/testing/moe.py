"""Test support for rollout routing replay (R3): CPU-engine rollouts that record routed experts, and megatron runs.

Shared by tests/test_routing_replay.py and benchmarks/bench_routing_replay.py (a benchmark never imports the tests).

Contract:
- `rollout(model, prompts, new_tokens, max_running, timeout_s)` generates with the in-process CPU engine at
  temperature 1 (ignore_eos, so every response has `new_tokens` tokens) and returns, in prompt order, one dict per
  prompt: `prompt`, `output` (token ids), `logprobs` (behaviour), `routing` ((fed tokens, layers, top-k) int32).
- `micro_batch(samples, routing=True, max_new_tokens=None)` is the right-padded (B, T) MicroBatch of those samples;
  `routed_experts` is -1 where nothing was recorded (the last token, padding), None when `routing` is False;
  `max_new_tokens` defaults to the longest response.
- `megatron_backend(tmp, rank, world, ep, replay, pp, **trainer)` builds one megatron rank (tiny_config) from the
  HF checkpoint in `tmp/trainer`, with `algorithm.routing_replay = replay`; returns (backend, cfg).
- `train_step(backend, cfg, mbs)` runs one mini-batch; returns {"metrics", "after": HF weights after the step}.
- `single_worker(rank, world_size, port, tmp)` (a `spawn` target, world size 1) reads `tmp/samples.pt` and writes
  `tmp/single.pt`: the logprobs with replay (`lp_replay`) and with the trainer's own routing (`lp_own`), and a step
  with replay (`step`), with replay under full recomputation (`step_recompute`) and with replay off (`step_off`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from pipeline.contracts.backend import MicroBatch
from pipeline.testing.megatron import tiny_config


def rollout(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, max_running: int,
            timeout_s: float) -> list[dict]:  # fmt: skip
    """Generate with the CPU engine, recording the routed experts (what SGLang returns for the sample)."""
    from engines.local.engine import Engine, Request
    from engines.local.sampling import SamplingParams

    # max_running below the number of prompts: requests join a running batch, as they do in a real engine.
    engine = Engine(model, max_running=max_running, seed=0).start()
    done, out = threading.Semaphore(0), []
    params = SamplingParams.from_json({"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True})
    try:
        for i, p in enumerate(prompts):
            engine.submit(Request(rid=str(i), prompt=p, params=params, return_routed_experts=True,
                                  on_done=lambda r: (out.append(r), done.release())))  # fmt: skip
        for _ in prompts:
            assert done.acquire(timeout=timeout_s), f"the CPU engine did not finish {len(prompts)} rollouts"
    finally:
        engine.stop()
    out.sort(key=lambda r: int(r.rid))
    return [{"prompt": r.prompt, "output": r.output_ids, "logprobs": r.logprobs, "routing": r.routing()} for r in out]


def micro_batch(samples: list[dict], routing: bool = True, max_new_tokens: int | None = None) -> MicroBatch:
    """Right-padded (B, T) MicroBatch of the rollouts; routed_experts -1 where nothing was recorded."""
    B, T = len(samples), max(len(s["prompt"]) + len(s["output"]) for s in samples)
    L, k = samples[0]["routing"].shape[1:]
    ids = torch.zeros(B, T, dtype=torch.long)
    att, mask, old = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T), torch.zeros(B, T)
    routes = torch.full((B, T, L, k), -1, dtype=torch.int16)
    for b, s in enumerate(samples):
        P, n = len(s["prompt"]), len(s["prompt"]) + len(s["output"])
        ids[b, :n] = torch.tensor(s["prompt"] + s["output"])
        att[b, :n] = 1
        mask[b, P:n] = 1.0
        old[b, P:n] = torch.tensor(s["logprobs"])
        routes[b, : n - 1] = s["routing"]  # the fed tokens: all but the last
    total = float(mask.sum())
    adv = torch.linspace(-1, 1, B).unsqueeze(1).expand(B, T) * mask
    if max_new_tokens is None:
        max_new_tokens = max(len(s["output"]) for s in samples)
    return MicroBatch(
        input_ids=ids, attention_mask=att, position_ids=torch.arange(T).expand(B, T).contiguous(), loss_mask=mask,
        old_logprobs=old, advantages=adv.contiguous(), global_tokens=total, global_seqs=float(B),
        max_new_tokens=max_new_tokens, routed_experts=routes if routing else None,
    )  # fmt: skip


def megatron_backend(tmp: str, rank: int, world: int, ep: int = 1, replay: str = "rollout", pp: int = 1,
                     **trainer: Any) -> tuple[Any, Any]:  # fmt: skip
    from engines.megatron.backend import build_backend

    cfg = tiny_config(1, pp, world // pp, **trainer)
    cfg.trainer.parallel.ep = ep
    cfg.algorithm.routing_replay = replay
    backend = build_backend(cfg, rank, world)
    backend.setup(os.path.join(tmp, "trainer"))
    return backend, cfg


def train_step(backend: Any, cfg: Any, mbs: list[MicroBatch]) -> dict:
    from pipeline.algorithm.losses import make_loss_fn

    metrics = backend.train_minibatch(mbs, make_loss_fn(cfg.algorithm))
    return {"metrics": metrics, "after": {k: v.clone() for k, v in backend.named_hf_weights()}}


def single_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    from engines.megatron.launch import init_dist

    init_dist(rank, world_size, port)
    samples = torch.load(os.path.join(tmp, "samples.pt"))
    mb = micro_batch(samples)
    out: dict = {}
    backend, cfg = megatron_backend(tmp, rank, 1)
    out["lp_replay"] = backend.forward_logprobs([mb])[0]
    backend.replay_on = backend.replay.apply = False
    out["lp_own"] = backend.forward_logprobs([mb])[0]
    backend.replay_on = backend.replay.apply = True
    out["step"] = train_step(backend, cfg, [mb])
    backend, cfg = megatron_backend(tmp, rank, 1, recompute=True)
    out["step_recompute"] = train_step(backend, cfg, [mb])
    backend, cfg = megatron_backend(tmp, rank, 1, replay="off")
    out["step_off"] = train_step(backend, cfg, [mb])
    torch.save(out, os.path.join(tmp, "single.pt"))
