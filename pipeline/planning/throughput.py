"""Throughput model of `dapo plan`: decode rate of an engine, training rate of a layout, DAPO's generation demand
and the weight-sync time.

Contract (all estimates to rank layouts, not measurements):
- `decode_tokens_per_s(model, engine, gpu, gpu_mem, prompt_len, resp_len)` -> (tokens/s of one engine, batch):
  decode is memory-bound: a step reads the weights (for MoE only the experts the batch touches, min(1, B*k/E))
  and the KV of the B running sequences at 70% of peak HBM bandwidth, or is FLOP-bound at 50% MFU.
- `train_flops_per_token`, `train_efficiency`: training runs at 35% MFU on 6 (8 with recompute) x active
  non-embedding parameters + attention FLOPs per token, scaled by a layout's communication / bubble efficiency.
- `generation_demand(keep_rate, over_admission)`: response tokens generated per response token trained. Dynamic
  sampling keeps a group only when its rewards differ, so 1 / keep_rate groups are generated per kept one; with
  `rollout.over_admission` the admission controller runs up to that many x batch_size groups beyond the expected
  need, and a surplus group that finishes kept past the staleness bound is re-queued (its tokens wasted): on
  average half the surplus, at the keep rate.
- `decode_tail_efficiency(staleness, partial_rollout, tail_ratio)`: occupancy of the engines while the longest
  responses of a batch finish. Synchronous (s = 0) generation idles the slots of finished sequences until the
  longest (tail_ratio = max / mean length) is done: mean / max; with s >= 1 the next batch's prompts fill the
  slots, and `resume` partial rollouts never drain the engines at a weight update: 1.
- `weight_sync_seconds(params, bytes, link)`: the bf16 weights over the sync link (NCCL broadcast between nodes
  ~20 GB/s, within a node over NVLink ~100 GB/s; colocated disk staging through /dev/shm ~3 GB/s), paid once per
  trainer step.
"""

from __future__ import annotations

import math

from pipeline.planning.memory import EngineSetup, Parallel, TrainSetup, engine_memory
from pipeline.planning.models import GPU, ModelSpec

TRAIN_MFU = 0.35
DECODE_BW_EFF = 0.70
DECODE_MFU = 0.50
DEFAULT_KEEP_RATE = 0.5
"""Expected share of groups kept by dynamic sampling (DAPO's recipe generates up to 3x; verl's logs keep ~1/3-2/3
early in training on DAPO-Math-17k): a planning default, `--keep-rate` overrides it."""
SYNC_GBPS = {"nccl-inter-node": 20.0, "nccl-intra-node": 100.0, "disk": 3.0}


def decode_tokens_per_s(
    m: ModelSpec, e: EngineSetup, gpu: GPU, gpu_mem: float, prompt_len: float, resp_len: float, max_running: int = 256
) -> tuple[float, int]:
    """(tokens/s of one engine, running batch) decoding `resp_len`-token responses (memory-bound model).

    The batch is what the KV pool holds when each running sequence reserves its final length; a step reads the
    weights (for MoE only the experts the batch touches) and the KV cache at the mean context.
    """
    ctx = prompt_len + resp_len / 2
    kv_tok = m.kv_bytes_per_token(e.tp)
    pool_tokens = engine_memory(m, e, 0, gpu_mem)["kv_tokens"]
    batch = int(min(max_running, pool_tokens // max(prompt_len + resp_len, 1)))
    if batch < 1:
        return 0.0, 0
    touched = 1.0 if not m.is_moe else min(1.0, batch * m.experts_per_token / m.num_experts)
    expert_all = m.num_moe_layers * m.expert_params
    weight_bytes = (m.total_params - expert_all * (1 - touched)) * e.weight_bytes / e.tp
    t_mem = (weight_bytes + batch * ctx * kv_tok) / (gpu.bw_tbs * 1e12 * DECODE_BW_EFF)
    flops = batch * (2 * m.compute_params + 4 * m.num_layers * m.q_dim * ctx) / e.tp
    t_flops = flops / (gpu.tflops * 1e12 * DECODE_MFU)
    comm = 1.0 if e.tp == 1 else (0.92 ** math.log2(e.tp) if e.tp <= 8 else 0.6)
    return batch / max(t_mem, t_flops) * comm, batch


def train_flops_per_token(m: ModelSpec, ctx: float, recompute: bool) -> float:
    passes = 4 if recompute else 3  # forward + backward (2x); full recompute adds a forward
    return passes * (2 * m.compute_params + 2 * m.num_layers * m.q_dim * ctx)


def train_efficiency(p: Parallel, t: TrainSetup, samples_per_minibatch: int) -> float:
    """Relative efficiency of a layout (communication, pipeline bubble) — used to rank candidates."""
    eff = 0.96 ** math.log2(p.tp) * 0.95 ** math.log2(p.cp) * 0.97 ** math.log2(p.ep)
    micro = max(samples_per_minibatch // max(p.dp, 1), 1)
    eff *= micro / (micro + p.pp - 1)  # 1F1B bubble
    if t.backend == "fsdp":
        eff *= 0.99 ** math.log2(max(p.world, 1))  # parameter all-gathers
    if t.optimizer_offload:
        eff *= 0.8
    return eff


def generation_demand(keep_rate: float = DEFAULT_KEEP_RATE, over_admission: float = 0.5) -> float:
    """Generated response tokens per trained response token (see the module docstring)."""
    if not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate must be in (0, 1]; got {keep_rate}")
    return 1 / keep_rate + 0.5 * over_admission * keep_rate


def decode_tail_efficiency(staleness: int = 1, partial_rollout: str = "resume", tail_ratio: float = 2.0) -> float:
    """Engine occupancy while a batch's long responses finish (see the module docstring)."""
    if staleness >= 1 and partial_rollout == "resume":
        return 1.0
    if staleness >= 1:  # wait/abort drain the engines at each weight update: half the tail is idle
        return 1 - 0.5 * (1 - 1 / tail_ratio)
    return 1 / tail_ratio


def weight_sync_seconds(params: int, weight_bytes: float = 2.0, link: str = "nccl-inter-node") -> float:
    """Seconds to push the model's weights to the engines once."""
    return params * weight_bytes / (SYNC_GBPS[link] * 1e9)
