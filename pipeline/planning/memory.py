"""Per-GPU memory of the trainer backends and the engines, term by term, as the code allocates it.

Contract:
- `train_memory(model, parallel, seq_len, setup, stage)` -> GiB per term of one trainer rank of the first or
  last pipeline stage: weights, grads, optimizer, fsdp_gather, activations, logits, runtime, fragmentation, total.
- `trainer_peak_memory(hf_config, cfg, tokens_per_micro_batch, device="cuda")` -> bytes per term and `total` for
  a loaded `Config` (backend, dtype, recompute, parallelism, logprob chunking): what the trainer benchmark prints
  beside the measured peak. `allocated` is the part a torch allocator counts (torch.cuda.max_memory_allocated, or
  the CPU profiler's peak on CPU); `total` adds the CUDA context / NCCL workspaces and fragmentation.
- `engine_memory(...)`, `check_feasible(...)` -> `Feasibility` for a whole layout and placement.

What the terms are (c = compute dtype bytes: 2 for bfloat16, 4 for float32; P = parameters of this rank):
- Megatron: weights c*P; main gradients fp32 4*P (grad_reduce_in_fp32); Adam m + v (8 B) plus an fp32 master
  copy when c = 2 (4 B), divided by the data-parallel size with the distributed optimizer.
- FSDP2 with fp32 master weights and bf16 compute (MixedPrecisionPolicy): fp32 parameters, gradients and Adam
  m + v = 16 B per parameter over all ranks, plus the compute-dtype copies FSDP gathers (two layers in flight and
  the root module's embedding/head, kept for the whole step) and one layer's unsharded gradients before the
  reduce-scatter; on one rank the backend keeps a whole bf16 copy of the master instead (2 B per parameter). Without master weights (`master_fp32=False`) everything is in the compute dtype (4c B).
- Activations per token and layer, itemised from what autograd saves in each implementation (below), plus the
  gradients of one layer's MLP interior (3 I) during its backward; full recompute keeps each layer's input (c*h)
  plus one layer's full set and those gradients during its backward (Megatron's
  full/uniform recompute and HF gradient checkpointing both work per layer). Megatron splits the h-sized terms
  over tp only with sequence parallelism (the backend enables it with transformer-engine); the q/kv/I-sized
  terms are always split over tp. CP divides the tokens. 1F1B: the first stage holds pp micro-batches (x (1 +
  (pp-1)/(pp*vpp)) interleaved), the last stage one micro-batch plus the logits.
- Logits (last stage only): bytes per token and vocabulary entry (/tp for Megatron's vocabulary-parallel head).
  The full path holds the (tokens x V) logits and their fp32 copies at once (`LOGIT_BYTES_FULL`); the fused,
  token-chunked hidden -> logprob/entropy path (`trainer.logprob_chunk_tokens` > 0) holds only one chunk.
- FSDP frees gradients between steps (zero_grad set_to_none): they are allocated during the backward while the
  activations are released, so the peak holds the head/embedding gradients, or all gradients when those outweigh
  the activations and logits (the `grads` term is what coexists at the peak).
- Runtime: CUDA context + NCCL + cuBLAS workspaces (not seen by the allocator); fragmentation 10% of the
  activations and logits.
- Engines: bf16 weights / engine tp + KV cache = layers x kv_heads_per_gpu x head_dim x 2 (K, V) x 2 B x tokens
  inside mem_fraction x GPU memory; 3 GiB more outside it (CUDA context, activations, CUDA graphs); ~1.5 GiB once
  the engine has released its memory (weight_sync.release_memory: kv_cache, weights, cuda_graph).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.planning.models import GiB, ModelSpec, PlanError, load_model, model_from_hf_config

RUNTIME_GB = 3.0  # CUDA context + NCCL + cuBLAS workspaces per trainer GPU (outside the allocator)
ENGINE_RUNTIME_GB = 3.0  # engine memory outside mem_fraction: CUDA context, activations, CUDA graphs
ENGINE_RELEASED_GB = 1.5  # an engine that released kv_cache, weights and cuda_graph: its context and buffers
FRAGMENTATION = 0.10  # of activations and logits: allocator slack
HEADROOM = 0.92  # proposals keep 8% of each GPU free: the model is an estimate

# Bytes per token and vocabulary entry held at the peak of the logprob/entropy computation, full path (the unchunked
# heads this project had before engines/logprobs.py; kept for logprob_chunk = 0, which the config no longer allows).
# Megatron (vocab-parallel head): the logits (c) and, in fp32, z, exp(z - max), p and the product
# for the entropy in the forward; z, p, grad and the centred product in the backward: c + 5 x 4 ~ 22 B in bf16.
# FSDP (HF head + pipeline.algorithm.losses): the logits (c), an fp32 copy divided by the temperature (saved),
# softmax for the entropy (saved) and its product: ~14 B in bf16. The float32 rows are measured on CPU
# (tests/test_plan_calibration.py), where .float() of fp32 logits is no copy.
LOGIT_BYTES_FULL = {("megatron", 2): 22.0, ("megatron", 4): 24.0, ("fsdp", 2): 14.0, ("fsdp", 4): 14.0}
# The fused, token-chunked path (engines/logprobs.py, in-place chunk arithmetic): one chunk's fp32
# logits and their gradient, 2 x 4 B; measured 6.7-7.9 B on CPU (tests/test_plan_calibration.py).
LOGIT_BYTES_CHUNK = 8.0
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


# --------------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Parallel:
    """Trainer parallelism. For FSDP, cp is the sequence split (Ulysses) and tp = pp = 1."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    """Expert tensor parallelism (Megatron's default when unset is etp = tp; MoE parallel folding uses 1)."""
    dp: int = 1
    vpp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class TrainSetup:
    backend: str = "megatron"
    """megatron | fsdp."""
    recompute: bool = True
    """Full activation recomputation (megatron full/uniform, HF gradient checkpointing per layer)."""
    distributed_optimizer: bool = True
    """Megatron: shard the fp32 master weights and Adam moments over data parallelism (ZeRO-1)."""
    optimizer_offload: bool = False
    """Optimizer states live in CPU memory (Megatron's CPU optimizer); this pipeline's trainers cannot yet."""
    mb_tokens: int = 0
    """Tokens of one micro-batch of one data-parallel rank, before the cp split (0: seq_len)."""
    offload_in_gen: bool = True
    """Time-shared placement: the trainer's states leave the GPU while the engine generates (slime, verl). This
    pipeline's trainers stay resident (False)."""
    compute_bytes: int = 2
    """Bytes of the compute dtype (2: bfloat16, 4: float32)."""
    master_fp32: bool = True
    """FSDP: fp32 master parameters, gradients and Adam state with compute-dtype copies (#16's mixed precision)."""
    logprob_chunk: int = 0
    """Tokens per chunk of the fused hidden -> logprob path (trainer.logprob_chunk_tokens); 0: the full path."""
    te: bool = False
    """transformer-engine installed: Megatron runs sequence parallelism (tp > 1) and context parallelism on GPUs."""
    ulysses: bool = False
    """FSDP splits sequences over cp (verl's Ulysses); this project's FSDP backend does not (published layouts)."""

    @property
    def grad_bytes(self) -> int:
        return 4 if self.backend == "megatron" or self.master_fp32 else self.compute_bytes


@dataclass(frozen=True)
class EngineSetup:
    tp: int = 1
    mem_fraction: float = 0.8
    """Share of a GPU's memory the engine takes for weights + KV cache (SGLang --mem-fraction-static)."""
    weight_bytes: float = 2.0
    """Bytes per weight (2: bf16; 1: fp8 checkpoints)."""
    min_seqs: int = 1
    """Full-length sequences the KV cache must hold at least."""


@dataclass
class Feasibility:
    ok: bool
    peak_gb: float
    """Largest per-GPU use over GPUs and phases, GiB."""
    breakdown: dict[str, float] = field(default_factory=dict)
    """Per-GPU GiB: train/* (the worst pipeline stage), train_last/* (the last stage) and engine/*."""
    problems: list[str] = field(default_factory=list)


PLACEMENTS = ("disaggregated", "time-shared", "space-shared")
"""disaggregated: separate GPUs. time-shared: engines and trainer on the same GPUs, the engine's memory released
while training (weight_sync.release_memory; slime --colocate, verl's hybrid engine). space-shared: both resident
and running at once (weight_sync.mode=colocated without release_memory)."""


# --------------------------------------------------------------------------------------------------- activations
def layer_activation_bytes(m: ModelSpec, backend: str, c: int, tp: int = 1, sp: bool = False, moe: bool = False):
    """Bytes autograd keeps per token for one layer's backward, on one tp rank.

    HF eager (fsdp): each RMSNorm keeps its fp32 input, the normalised tensor cast to the compute dtype and the
    weighted output ((4 + 2c) B x h; in fp32 the casts are the same tensors); attention keeps rotated Q, K,
    V, SDPA's output and fp32 log-sum-exp, and o_proj's (contiguous) input; the SwiGLU MLP gate, up, SiLU(gate)
    and the product (4 I).
    Megatron (local spec / TE): each norm keeps its input and output (2 h), each bias-dropout-add a copy and a
    mask; the fused QKV output, the rotated Q and K, K and V repeated for GQA (local spec), SDPA's output + LSE and
    linear_proj's input; fc1's fused gate|up output (2 I) and the SwiGLU output (I). Calibrated on CPU against
    the measured peaks (tests/test_plan_calibration.py).
    """
    h, q, kv, a = m.hidden_size, m.q_dim, m.kv_dim, m.num_heads
    hsplit = tp if sp else 1
    if backend == "fsdp":
        norms = 2 * (4 + 2 * c) * h / hsplit  # fp32 input, compute-dtype cast, weighted output
        attn = c * (3 * q + 2 * kv) / tp + 4 * a / tp
        attn += c * (2 * q + 2 * kv) / tp if m.qk_norm else 0
    else:
        # + the two bias-dropout-adds: dropout(p=0) in training still returns a new tensor and a 1-byte mask
        norms = (2 * 2 * c * h + 2 * (c + 1) * h) / hsplit
        # fused QKV output, rotated Q and K, K and V repeated to the query heads (GQA in SDPACoreAttention;
        # not with transformer-engine), SDPA's output + fp32 LSE, linear_proj's input
        repeat = 0 if sp else 2 * q - 2 * kv
        attn = c * (q + 2 * kv + q + kv + 2 * kv + repeat + q + q) / tp + 4 * a / tp
        attn += c * (q + kv) / tp if m.qk_norm else 0
    if moe:
        k, i_moe = m.experts_per_token, m.moe_intermediate_size
        # router logits/probs (fp32), permuted tokens in and out of the k experts, each expert's SwiGLU (3 I)
        mlp = 8 * m.num_experts + c * (2 * h * k + 3 * k * i_moe) / tp
        s = m.shared_expert_intermediate_size
        mlp += c * (3 * s + h) / tp if s else 0
    else:
        mlp = c * (4 if backend == "fsdp" else 3) * m.intermediate_size / tp
    return norms + attn + mlp


def _stage_params(m: ModelSpec, p: Parallel, stage: str, backend: str) -> tuple[float, float, int]:
    """(dense params, expert params, layers) held by one rank of the first or last pipeline stage."""
    layers = math.ceil(m.num_layers / p.pp)
    moe_layers = math.ceil(m.num_moe_layers / p.pp)
    dense_layers = max(layers - moe_layers, 0) if m.is_moe else layers
    dense = layers * m.attn_params + dense_layers * m.dense_mlp_params + moe_layers * m.moe_shared_params
    embed = m.embed_params
    if p.pp == 1:
        dense += embed + (0 if m.tie_embeddings else embed) + m.hidden_size
    elif stage == "last":  # the output layer (a tied head still needs its own copy on the last stage)
        dense += embed + m.hidden_size
    else:
        dense += embed
    experts = moe_layers * m.expert_params
    if backend == "fsdp":
        return dense, experts, layers
    return dense / p.tp, experts / (p.ep * p.etp), layers


def _states(m: ModelSpec, p: Parallel, t: TrainSetup, dense: float, experts: float) -> dict[str, float]:
    c = t.compute_bytes
    out: dict[str, float] = {}
    if t.backend == "fsdp":
        n, total = p.world, dense + experts
        state_bytes = 4 if t.master_fp32 else c
        out["weights"] = state_bytes * total / n
        out["grads"] = state_bytes * total / n
        out["optimizer"] = 0.0 if t.optimizer_offload else 2 * state_bytes * total / n
        layer = m.attn_params + max(m.dense_mlp_params, m.moe_shared_params + m.expert_params)
        root = m.embed_params * (1 if m.tie_embeddings else 2)
        if n > 1:  # FSDP2 gathers two layers in the compute dtype, keeps the root's, and one layer's grads
            out["fsdp_gather"] = c * (3 * layer + root)
        elif t.master_fp32 and c != 4:  # one rank: a whole compute-dtype copy of the fp32 master
            out["fsdp_gather"] = c * total
        else:
            out["fsdp_gather"] = 0.0
        return out
    dp_dense = p.dp * p.cp
    dp_expert = max(p.tp * p.cp * p.dp // (p.ep * p.etp), 1)
    out["weights"] = c * (dense + experts)
    out["grads"] = 4 * (dense + experts)
    opt_bytes = 8 + (4 if c != 4 else 0)  # Adam m, v (+ fp32 master weights of a bf16 model)
    if t.distributed_optimizer:
        opt = opt_bytes * (dense / dp_dense + experts / dp_expert)
    else:
        opt = opt_bytes * (dense + experts)
    out["optimizer"] = 0.0 if t.optimizer_offload else opt
    return out


def train_memory_bytes(m: ModelSpec, p: Parallel, seq_len: int, t: TrainSetup, stage: str = "first"):
    """Bytes per term of one trainer rank (see the module docstring); no runtime/fragmentation/total."""
    dense, experts, layers = _stage_params(m, p, stage, t.backend)
    out = _states(m, p, t, dense, experts)
    c = t.compute_bytes
    tokens = (t.mb_tokens or seq_len) / p.cp  # this GPU's share of the micro-batch's sequence
    tp = 1 if t.backend == "fsdp" else p.tp
    sp = t.backend == "megatron" and t.te and p.tp > 1
    in_flight = p.pp if stage == "first" else 1  # 1F1B: stage 0 holds pp micro-batches
    if p.vpp > 1 and stage == "first":
        in_flight *= 1 + (p.pp - 1) / (p.pp * p.vpp)
    moe_frac = m.num_moe_layers / m.num_layers
    dense_layer = layer_activation_bytes(m, t.backend, c, tp, sp, moe=False)
    moe_layer = layer_activation_bytes(m, t.backend, c, tp, sp, moe=True) if m.is_moe else dense_layer
    per_layer = moe_frac * moe_layer + (1 - moe_frac) * dense_layer
    layer_input = c * m.hidden_size / (tp if sp else 1)
    last = stage == "last" or p.pp == 1
    logits = _logit_bytes(m, t, tokens, tp) if last else 0.0
    # a layer's backward holds the gradients of its MLP interior (fc2 input, gate and up: 3 I) on top of what is kept
    mlp_width = max(m.intermediate_size, m.experts_per_token * m.moe_intermediate_size if m.is_moe else 0)
    backward = c * 3 * mlp_width / tp
    if t.recompute:
        # the layer inputs, plus one recomputed layer during its backward; on the last stage the logits path is
        # freed before the first layer is recomputed, so only the larger of the two counts
        one_layer = tokens * (max(moe_layer, dense_layer) + backward)
        acts = tokens * layer_input * layers * in_flight + max(0.0, one_layer - logits)
    else:
        acts = tokens * (per_layer * layers * in_flight + backward)
    out["activations"] = acts + tokens * c * m.hidden_size  # + the embedding output feeding layer 0
    out["logits"] = logits
    if t.backend == "fsdp":
        # zero_grad(set_to_none): gradients are allocated during the backward while the activations are freed, so
        # at the peak (its start) only the head/embedding gradients exist -- unless all gradients outweigh them.
        head = state_grad = out["grads"]
        head *= m.embed_params / max(dense + experts, 1)
        out["grads"] = max(head, state_grad - out["activations"] - out["logits"])
    return out


def _logit_bytes(m: ModelSpec, t: TrainSetup, tokens: float, tp: int) -> float:
    vocab = m.vocab_size / tp
    if t.logprob_chunk > 0:
        # the chunk's logits, the (tokens x h) hidden states kept for the backward, and the output layer's weight
        # gradient accumulated over chunks in float32 (engines/logprobs.py)
        chunk = min(tokens, t.logprob_chunk) * vocab * LOGIT_BYTES_CHUNK
        return chunk + tokens * t.compute_bytes * m.hidden_size + 4 * vocab * m.hidden_size
    return tokens * vocab * LOGIT_BYTES_FULL[(t.backend, t.compute_bytes)]


def train_memory(m: ModelSpec, p: Parallel, seq_len: int, t: TrainSetup, stage: str = "first") -> dict[str, float]:
    """Per-GPU memory (GiB) of one trainer rank in the first or last pipeline stage."""
    gb = {k: v / GiB for k, v in train_memory_bytes(m, p, seq_len, t, stage).items()}
    gb["runtime"] = RUNTIME_GB
    gb["fragmentation"] = FRAGMENTATION * (gb["activations"] + gb["logits"])
    gb["total"] = sum(gb.values())
    return gb


def setup_from_config(cfg: Any, mb_tokens: int = 0) -> tuple[Parallel, TrainSetup]:
    """The (Parallel, TrainSetup) a loaded Config describes (the options as the backends read them)."""
    t, p = cfg.trainer, cfg.trainer.parallel
    par = Parallel(tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, etp=p.etp, dp=p.dp or 1, vpp=p.vpp)
    setup = TrainSetup(
        backend=t.backend,
        recompute=t.recompute,
        distributed_optimizer=t.distributed_optimizer,
        mb_tokens=mb_tokens or t.max_tokens_per_micro_batch,
        offload_in_gen=False,
        compute_bytes=DTYPE_BYTES[cfg.model.dtype],
        master_fp32=True,
        logprob_chunk=int(getattr(t, "logprob_chunk_tokens", 0) or 0),
        te=importlib.util.find_spec("transformer_engine") is not None,
    )
    return par, setup


def trainer_peak_memory(
    hf_config: dict[str, Any] | Any, cfg: Any, tokens_per_micro_batch: int, device: str = "cuda"
) -> dict[str, float]:
    """Predicted peak of one trainer rank, bytes per term: weights, grads, optimizer, fsdp_gather, activations,
    logits, `allocated` (their sum: what a torch allocator's peak counts), runtime and fragmentation (GPU only),
    `total`. The worst pipeline stage. `hf_config`: a config.json dict or a transformers config object."""
    raw = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    m = model_from_hf_config(raw, name=str(raw.get("model_type", "model")))
    par, setup = setup_from_config(cfg, tokens_per_micro_batch)
    if device != "cuda":  # on CPU there is no mixed precision cast layer and no CUDA context
        setup = TrainSetup(**{**setup.__dict__, "te": False})
    stages = [train_memory_bytes(m, par, tokens_per_micro_batch, setup, s) for s in ("first", "last")]
    out = max(stages, key=lambda d: sum(d.values()))
    out["allocated"] = sum(out.values())
    gpu = device == "cuda"
    out["runtime"] = RUNTIME_GB * GiB if gpu else 0.0
    out["fragmentation"] = FRAGMENTATION * (out["activations"] + out["logits"]) if gpu else 0.0
    out["total"] = out["allocated"] + out["runtime"] + out["fragmentation"]
    return out


# --------------------------------------------------------------------------------------------------- engines
def engine_memory(m: ModelSpec, e: EngineSetup, seq_len: int, gpu_mem: float) -> dict[str, float]:
    """Per-GPU engine memory (GiB): weights, the KV needed for min_seqs full sequences, the KV pool left."""
    weights = m.total_params * e.weight_bytes / e.tp / GiB
    kv_tok = m.kv_bytes_per_token(e.tp) / GiB
    pool = e.mem_fraction * gpu_mem
    return {
        "weights": weights,
        "kv_min": kv_tok * seq_len * e.min_seqs,
        "kv_pool": max(pool - weights, 0.0),
        "reserved": pool,
        "runtime": ENGINE_RUNTIME_GB,
        "kv_tokens": max(pool - weights, 0.0) / kv_tok,
    }


def structure_problems(m: ModelSpec, p: Parallel, t: TrainSetup, e: EngineSetup, gpus_per_node: int = 0) -> list:
    """Rules of the backends and engines that do not depend on memory."""
    probs = []
    if t.backend == "fsdp":
        if p.tp != 1 or p.pp != 1 or (p.cp != 1 and not t.ulysses):
            probs.append("fsdp: tp, pp and cp must be 1 (the backend is data parallel only)")
        if m.is_moe:
            probs.append("fsdp: mixture-of-experts models train with megatron (expert parallelism)")
    else:
        if m.num_kv_heads % p.tp:
            probs.append(f"tp={p.tp} must divide num_key_value_heads={m.num_kv_heads} (megatron query groups)")
        if p.pp > m.num_layers:
            probs.append(f"pp={p.pp} exceeds the {m.num_layers} layers")
        if m.is_moe:
            if m.num_experts % p.ep:
                probs.append(f"ep={p.ep} must divide num_experts={m.num_experts}")
            if (p.tp * p.cp * p.dp) % (p.ep * p.etp):
                probs.append(f"ep*etp={p.ep * p.etp} must divide tp*cp*dp={p.tp * p.cp * p.dp} (ranks of a stage)")
        elif p.ep != 1:
            probs.append("ep > 1 needs a mixture-of-experts model")
        if p.cp > 1 and not t.te:
            probs.append(f"cp={p.cp} on GPUs needs transformer-engine's attention, which is not installed")
        if gpus_per_node and p.tp > gpus_per_node:
            probs.append(f"tp={p.tp} exceeds the {gpus_per_node} GPUs of a node")
    if m.num_heads % e.tp:
        probs.append(f"engine tp={e.tp} must divide num_attention_heads={m.num_heads}")
    if gpus_per_node and e.tp > gpus_per_node:
        probs.append(f"engine tp={e.tp} exceeds the {gpus_per_node} GPUs of a node (an engine's GPUs are on one node)")
    return probs


def check_feasible(
    model: ModelSpec | str,
    parallel: Parallel,
    gpus: int,
    gpu_mem: float = 80.0,
    seq_len: int = 8192,
    *,
    train: TrainSetup = TrainSetup(),
    engine: EngineSetup = EngineSetup(),
    placement: str = "disaggregated",
    train_gpus: int = 0,
    gpus_per_node: int = 0,
) -> Feasibility:
    """Does this layout fit? `train_gpus` (disaggregated): trainer GPUs, default parallel.world; the rest serve.
    Colocated placements: the trainer spans all GPUs; time-shared engines span engine.tp of them each."""
    m = load_model(model)
    if placement not in PLACEMENTS:
        raise PlanError(f"placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
    probs = structure_problems(m, parallel, train, engine, gpus_per_node)
    n_train = train_gpus or parallel.world
    if parallel.world != n_train:
        probs.append(f"tp*pp*cp*dp = {parallel.world} != trainer GPUs {n_train}")
    if placement == "disaggregated":
        n_gen = gpus - n_train
        if n_gen < engine.tp:
            probs.append(f"{n_gen} GPUs left for engines, an engine needs tp={engine.tp}")
    elif n_train != gpus:
        probs.append(f"colocated: the trainer must span all {gpus} GPUs, got {n_train}")
    stages = {s: train_memory(m, parallel, seq_len, train, s) for s in ("first", "last")}
    tr = max(stages.values(), key=lambda d: d["total"])
    en = engine_memory(m, engine, seq_len, gpu_mem)
    engine_gb = en["reserved"] + en["runtime"]
    states = tr["weights"] + tr["grads"] + tr["optimizer"]
    resident = 0.0 if train.offload_in_gen else states + tr["runtime"]
    if placement == "disaggregated":
        phases = {"train": tr["total"], "generate": engine_gb}
    elif placement == "time-shared":
        phases = {"train": tr["total"] + ENGINE_RELEASED_GB, "generate": engine_gb + resident}
    else:
        phases = {"train+generate": tr["total"] + engine_gb}
    for phase, used in phases.items():
        if used > gpu_mem:
            probs.append(f"{phase}: {used:.1f} GiB per GPU > {gpu_mem:g} GiB")
    if en["weights"] + en["kv_min"] > en["reserved"]:
        probs.append(
            f"engine: weights {en['weights']:.1f} GiB + KV for {engine.min_seqs} x {seq_len} tokens "
            f"{en['kv_min']:.1f} GiB > mem_fraction {engine.mem_fraction:g} x {gpu_mem:g} GiB (raise engine tp)"
        )
    breakdown = {f"train/{k}": v for k, v in tr.items()}
    breakdown.update({f"train_last/{k}": v for k, v in stages["last"].items()})
    breakdown.update({f"engine/{k}": v for k, v in en.items() if k != "kv_tokens"})
    return Feasibility(not probs, max(phases.values()), breakdown, probs)
