"""`dapo plan`: a memory and throughput model that proposes parallelism for a model and a GPU count.

Contract:
- `load_model(name_or_path)` reads a Hugging Face `config.json` (a file or a checkpoint directory: Qwen2/2.5,
  Qwen3, Qwen2-MoE/Qwen3-MoE, Llama/Mistral) or a name from the embedded table (`KNOWN_MODELS`, offline).
- `check_feasible(model, parallel, gpus, gpu_mem, seq_len, ...)` -> `Feasibility(ok, peak_gb, breakdown, problems)`:
  per-GPU memory (GiB) of the trainer and the engines, and the structural rules (tp divides the KV heads, ...).
- `propose(model, gpus, ...)` -> `Plan`: the feasible trainer parallelism (tp/pp/cp/ep/dp, recompute) and engine
  layout (tp, count, memory fraction) with the best modelled throughput; in disaggregated mode also the GPU split
  between training and generation. Raises `PlanError` (naming what does not fit) when nothing does.
- `check_config(cfg, gpu_mem)`: check_feasible() for a loaded Config (`dapo plan --check CONFIG`).
- `plan_main(argv)` is the CLI: prints the tables and writes a config YAML (derived with `base:` from the preset of
  that model size) that `load_config` accepts.

The model (all per GPU, bytes; GiB = 2**30). It is an estimate to choose a layout, not an allocator trace.
- Parameters from the HF config: attention (q, k, v, o; qkv bias for Qwen2; q/k norms for Qwen3), SwiGLU MLP
  3*h*I, MoE layers router h*E + E*3*h*I_moe (+ shared expert), embeddings V*h (+ untied head), RMSNorms.
- Megatron: bf16 weights (2 B) and gradients (fp32, 4 B: gradient accumulation/all-reduce in fp32) of the rank's
  shard (dense / tp, experts / (ep*etp), layers / pp); Adam = fp32 master + m + v = 12 B per parameter, divided by
  the data-parallel size (dp*cp, for experts the expert-data-parallel size) with the distributed optimizer, or 0
  on the GPU with optimizer CPU offload. FSDP (ZeRO-3): fp32 params + fp32 grads + Adam = 16 B per parameter over
  all ranks, plus the gathered bf16 layers being computed and their unsharded fp32 gradients.
- Activations per layer and token, following the itemisation of Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", §4: 34*s*b*h + 5*a*s^2*b bytes for GPT), adapted to RMSNorm, GQA,
  SwiGLU and flash attention (no s^2 score matrix), without dropout masks (RL runs without dropout):
    attention  4h + 4q + 8kv + 4a (+ 2q + 2kv q/k-norm inputs)     q = heads*head_dim, kv = kv_heads*head_dim
    dense MLP  4h + 8I                                                 (norm and fc1 inputs, gate, up, SiLU, fc2 input)
    MoE MLP    4h + 4E + 4hk + 8kI_moe                               (router, permuted tokens in and out, k experts)
  divided by tp (sequence parallelism) and cp (the sequence is split). Full recompute keeps only each layer's
  input (2h) plus one layer's full set during its backward. With 1F1B pipelining the first stage holds pp
  micro-batches of its L/pp layers (interleaved: x (1 + (pp-1)/(pp*vpp))); the last stage holds one plus the
  logits: 10 B per token and vocabulary entry / tp (bf16 logits, the fp32 log-softmax kept for the backward, one
  fp32 temporary for the entropy/gradient).
- Overhead: 3 GiB (CUDA context, NCCL and cuBLAS workspaces) + 10% of activations and logits (fragmentation).
- Engines: bf16 weights / engine tp + KV cache = layers x kv_heads_per_gpu x head_dim x 2 (K, V) x 2 B x tokens
  must fit in mem_fraction x GPU memory with room for `min_seqs` full-length sequences; 3 GiB more outside that
  fraction (CUDA context, activations, CUDA graphs).
- Placement: disaggregated (separate GPUs), time-shared (slime `--colocate`, verl's hybrid engine: the engine
  releases its memory while training, the trainer is offloaded during generation unless `offload_in_gen` is
  false), space-shared (this pipeline's colocated mode: engine and trainer resident and running together).
- Throughput: decode is memory-bound: a step reads the weights (experts touched: min(1, B*k/E)) and the KV of B
  running sequences from HBM at 70% of peak bandwidth; training runs at 35% MFU on 6 (8 with recompute) x active
  non-embedding parameters + attention (6*L*q*ctx) FLOPs per token. Disaggregated GPUs are split so that the
  generated response tokens/s and the trained response tokens/s balance (max of the minimum).
- Search: fsdp (pure data parallel, dense models) and megatron with tp a power of two up to a node dividing the
  KV heads, pp dividing the layers, cp <= 8, ep dividing the experts and the ranks of a stage, dp dividing the
  samples of a mini-batch (validate()'s rule), each with and without full recompute; layouts are ranked by
  efficiency (TP/CP/EP communication, 1F1B bubble) / FLOPs per token and must leave 8% of each GPU free.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

GiB = float(2**30)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

OVERHEAD_GB = 3.0  # CUDA context + NCCL + cuBLAS workspaces per trainer GPU
ENGINE_RUNTIME_GB = 3.0  # engine memory outside mem_fraction: CUDA context, activations, CUDA graphs
FRAGMENTATION = 0.10  # of activations, allocator slack
LOGIT_BYTES = 10.0  # per token and vocab entry: bf16 logits + fp32 log-softmax + one fp32 temporary
HEADROOM = 0.92  # proposals keep 8% of each GPU free: the model is an estimate
TRAIN_MFU = 0.35
DECODE_BW_EFF = 0.70
DECODE_MFU = 0.50


class PlanError(ValueError):
    """The model or the request cannot be planned; the message says what does not fit."""


# --------------------------------------------------------------------------------------------------- hardware
@dataclass(frozen=True)
class GPU:
    name: str
    mem_gb: float
    """HBM capacity in GiB."""
    tflops: float
    """Dense bf16 tensor-core TFLOP/s."""
    bw_tbs: float
    """HBM bandwidth in TB/s."""


GPUS: dict[str, GPU] = {
    "h100": GPU("H100-SXM", 80, 989, 3.35),
    "h800": GPU("H800", 80, 989, 3.35),
    "h200": GPU("H200", 141, 989, 4.8),
    "h20": GPU("H20", 96, 148, 4.0),
    "a100": GPU("A100-80G", 80, 312, 2.0),
    "b200": GPU("B200", 180, 2250, 8.0),
}


# --------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_moe_layers: int = 0
    """Layers whose MLP is a mixture of experts (the rest are dense)."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attn_params(self) -> int:
        h, q, kv = self.hidden_size, self.q_dim, self.kv_dim
        p = h * q + 2 * h * kv + q * h + 2 * h  # q, k, v, o projections + the two RMSNorms of the layer
        p += (q + 2 * kv) if self.qkv_bias else 0
        p += 2 * self.head_dim if self.qk_norm else 0
        return p

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """Routed experts of one MoE layer (what expert parallelism shards)."""
        return self.num_experts * 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def moe_shared_params(self) -> int:
        """Router and shared expert of one MoE layer (sharded like dense weights)."""
        h, s = self.hidden_size, self.shared_expert_intermediate_size
        return h * self.num_experts + (3 * h * s + h if s else 0)

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def total_params(self) -> int:
        head = 0 if self.tie_embeddings else self.embed_params
        body = self.num_layers * self.attn_params + self.num_dense_layers * self.dense_mlp_params
        body += self.num_moe_layers * (self.moe_shared_params + self.expert_params)
        return body + self.embed_params + head + self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters used per token (experts scaled by k/E)."""
        if not self.is_moe:
            return self.total_params
        idle = self.expert_params * (1 - self.experts_per_token / self.num_experts)
        return int(self.total_params - self.num_moe_layers * idle)

    @property
    def compute_params(self) -> int:
        """Active parameters that do matmuls per token: everything but the input embedding lookup."""
        return self.active_params - (0 if self.tie_embeddings else self.embed_params)

    def kv_bytes_per_token(self, tp: int = 1, dtype_bytes: int = 2) -> int:
        """KV cache per token on one GPU of a tp-way engine (KV heads are replicated when tp > kv_heads)."""
        heads = math.ceil(self.num_kv_heads / tp)
        return self.num_layers * heads * self.head_dim * 2 * dtype_bytes


def _spec(name: str, h: int, L: int, a: int, kv: int, inter: int, vocab: int, **kw: Any) -> ModelSpec:
    head_dim = kw.pop("head_dim", h // a)
    if kw.get("num_experts") and "num_moe_layers" not in kw:
        kw["num_moe_layers"] = L
    return ModelSpec(name, h, L, a, kv, head_dim, inter, vocab, **kw)


# Published HF configs (config.json of each checkpoint), so that `--model Qwen2.5-7B` works offline.
_Q2 = {"qkv_bias": True}
_Q3 = {"qk_norm": True, "head_dim": 128}
_E128 = {"num_experts": 128, "experts_per_token": 8}
KNOWN_MODELS: dict[str, ModelSpec] = {
    m.name.lower(): m
    for m in (
        _spec("Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, tie_embeddings=True, **_Q2),
        _spec("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, tie_embeddings=True, **_Q2),
        _spec("Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, **_Q2),
        _spec("Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152064, **_Q2),
        _spec("DeepSeek-R1-Distill-Qwen-1.5B", 1536, 28, 12, 2, 8960, 151936, **_Q2),
        _spec("Qwen3-0.6B", 1024, 28, 16, 8, 3072, 151936, tie_embeddings=True, **_Q3),
        _spec("Qwen3-4B", 2560, 36, 32, 8, 9728, 151936, tie_embeddings=True, **_Q3),
        _spec("Qwen3-8B", 4096, 36, 32, 8, 12288, 151936, **_Q3),
        _spec("Qwen3-32B", 5120, 64, 64, 8, 25600, 151936, **_Q3),
        _spec("Qwen3-30B-A3B", 2048, 48, 32, 4, 6144, 151936, moe_intermediate_size=768, **_Q3, **_E128),
        _spec("Qwen3-235B-A22B", 4096, 94, 64, 4, 12288, 151936, moe_intermediate_size=1536, **_Q3, **_E128),
        _spec("Llama-3-8B", 4096, 32, 32, 8, 14336, 128256),
    )
}
_ALIASES = {"llama-3.1-8b": "llama-3-8b", "meta-llama-3-8b": "llama-3-8b", "meta-llama-3.1-8b": "llama-3-8b"}


def _canonical(name: str) -> str:
    key = name.strip().split("/")[-1].lower()
    key = re.sub(r"-(instruct|base|chat)$", "", key)
    return _ALIASES.get(key, key)


def model_from_hf_config(cfg: dict[str, Any], name: str = "model", source: str = "config.json") -> ModelSpec:
    """A ModelSpec from the fields of a HF config.json (dense Qwen2/Qwen3/Llama, Qwen2-MoE/Qwen3-MoE)."""
    cfg = cfg.get("text_config", cfg)

    def need(key: str) -> int:
        if key not in cfg:
            raise PlanError(f"{source}: missing `{key}` (needed to size the model)")
        return int(cfg[key])

    h, L, a = need("hidden_size"), need("num_hidden_layers"), need("num_attention_heads")
    kv = int(cfg.get("num_key_value_heads") or a)
    mtype = str(cfg.get("model_type", ""))
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)
    moe: dict[str, Any] = {}
    if experts:
        sparse_step = int(cfg.get("decoder_sparse_step") or 1)
        dense_only = set(cfg.get("mlp_only_layers") or [])
        moe_layers = sum(1 for i in range(L) if i not in dense_only and (i + 1) % sparse_step == 0)
        moe = {
            "num_experts": experts,
            "experts_per_token": need("num_experts_per_tok"),
            "moe_intermediate_size": int(cfg.get("moe_intermediate_size") or need("intermediate_size")),
            "shared_expert_intermediate_size": int(cfg.get("shared_expert_intermediate_size") or 0),
            "num_moe_layers": moe_layers,
        }
    return ModelSpec(
        name=name,
        hidden_size=h,
        num_layers=L,
        num_heads=a,
        num_kv_heads=kv,
        head_dim=int(cfg.get("head_dim") or h // a),
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        vocab_size=need("vocab_size"),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", mtype in ("qwen2", "qwen2_moe"))),
        qk_norm=mtype in ("qwen3", "qwen3_moe"),
        **moe,
    )


def load_model(name_or_path: str | ModelSpec) -> ModelSpec:
    """A known model name (`Qwen2.5-7B`, `Qwen/Qwen3-30B-A3B`), a config.json, or a checkpoint directory."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    p = Path(name_or_path)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"{p}: not a readable JSON config ({e})") from None
        return model_from_hf_config(cfg, name=p.parent.name or p.stem, source=str(p))
    key = _canonical(str(name_or_path))
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    known = ", ".join(m.name for m in KNOWN_MODELS.values())
    raise PlanError(f"--model {name_or_path!r}: not a config.json, a checkpoint directory, or a known model ({known})")


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
    """Full activation recomputation (megatron full/uniform, HF gradient checkpointing)."""
    distributed_optimizer: bool = True
    """Megatron: shard the fp32 master weights and Adam moments over data parallelism (ZeRO-1)."""
    optimizer_offload: bool = False
    """Optimizer states live in CPU memory (Megatron's CPU optimizer); this pipeline's trainers cannot yet."""
    grad_bytes: int = 4
    """Bytes per gradient element kept by the trainer (fp32 accumulation)."""
    mb_tokens: int = 0
    """Tokens of one micro-batch of one data-parallel rank, before the cp split (0: seq_len)."""
    offload_in_gen: bool = True
    """Time-shared placement: the trainer's states leave the GPU while the engine generates."""


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
    """Per-GPU GiB: train/* (the worst pipeline stage) and engine/*."""
    problems: list[str] = field(default_factory=list)


PLACEMENTS = ("disaggregated", "time-shared", "space-shared")


# --------------------------------------------------------------------------------------------------- memory
def _layer_act_bytes(m: ModelSpec, moe: bool) -> float:
    """Activation bytes kept for the backward of one layer, per token (before tp/cp division)."""
    h, q, kv = m.hidden_size, m.q_dim, m.kv_dim
    attn = 4 * h + 4 * q + 8 * kv + 4 * m.num_heads  # norm/qkv inputs, Q, K, V, attention output, fp32 LSE
    attn += (2 * q + 2 * kv) if m.qk_norm else 0
    if moe:
        k = m.experts_per_token
        mlp = 4 * h + 4 * m.num_experts + 4 * h * k + 8 * k * m.moe_intermediate_size
        mlp += 8 * m.shared_expert_intermediate_size + (2 * h if m.shared_expert_intermediate_size else 0)
    else:
        mlp = 4 * h + 8 * m.intermediate_size
    return attn + mlp


def _stage_params(m: ModelSpec, p: Parallel, stage: str, backend: str) -> tuple[float, float, int]:
    """(dense params, expert params, layers) held by one rank of the first or last pipeline stage."""
    layers = math.ceil(m.num_layers / p.pp)
    moe_layers = math.ceil(m.num_moe_layers / p.pp)
    dense_layers = max(layers - moe_layers, 0) if m.is_moe else layers
    dense = layers * m.attn_params + dense_layers * m.dense_mlp_params + moe_layers * m.moe_shared_params
    embed = m.embed_params
    if p.pp == 1:
        dense += embed + (0 if m.tie_embeddings else embed) + m.hidden_size
    else:  # a tied head still needs its own copy on the last stage
        dense += embed + (m.hidden_size if stage == "last" else 0)
    experts = moe_layers * m.expert_params
    if backend == "fsdp":
        return dense, experts, layers
    return dense / p.tp, experts / (p.ep * p.etp), layers


def train_memory(m: ModelSpec, p: Parallel, seq_len: int, t: TrainSetup, stage: str = "first") -> dict[str, float]:
    """Per-GPU memory (GiB) of one trainer rank in the first or last pipeline stage."""
    fsdp = t.backend == "fsdp"
    dense, experts, layers = _stage_params(m, p, stage, t.backend)
    tokens = (t.mb_tokens or seq_len) / p.cp  # this GPU's share of the micro-batch's sequence
    shard = 1 if fsdp else p.tp  # sequence parallelism splits the stored activations over tp
    out: dict[str, float] = {}
    if fsdp:
        n = p.world
        total = dense + experts
        out["weights"] = 4 * total / n  # fp32 sharded parameters
        out["grads"] = t.grad_bytes * total / n
        out["optimizer"] = 0.0 if t.optimizer_offload else 8 * total / n
        layer = m.attn_params + max(m.dense_mlp_params, m.moe_shared_params + m.expert_params)
        out["fsdp_gather"] = 2 * (2 * layer + 2 * m.embed_params) + 4 * layer  # 2 bf16 layers + root, fp32 grads
    else:
        dp_dense = p.dp * p.cp
        dp_expert = max(p.tp * p.cp * p.dp // (p.ep * p.etp), 1)
        out["weights"] = 2 * (dense + experts)
        out["grads"] = t.grad_bytes * (dense + experts)
        opt = 12 * (dense / dp_dense + experts / dp_expert) if t.distributed_optimizer else 12 * (dense + experts)
        out["optimizer"] = 0.0 if t.optimizer_offload else opt
    # 1F1B: stage 0 holds pp micro-batches of its layers; the last stage one micro-batch plus the logits.
    in_flight = p.pp if stage == "first" else 1
    if p.vpp > 1 and stage == "first":
        in_flight *= 1 + (p.pp - 1) / (p.pp * p.vpp)
    moe_frac = m.num_moe_layers / m.num_layers
    per_layer = moe_frac * _layer_act_bytes(m, True) + (1 - moe_frac) * _layer_act_bytes(m, False)
    worst_layer = max(_layer_act_bytes(m, m.is_moe), _layer_act_bytes(m, False))
    if t.recompute:
        acts = tokens * (2 * m.hidden_size * layers * in_flight + worst_layer) / shard
    else:
        acts = tokens * per_layer * layers * in_flight / shard
    out["activations"] = acts
    out["logits"] = tokens * m.vocab_size / (1 if fsdp else p.tp) * LOGIT_BYTES if stage == "last" else 0.0
    gb = {k: v / GiB for k, v in out.items()}
    gb["overhead"] = OVERHEAD_GB + FRAGMENTATION * (gb["activations"] + gb["logits"])
    gb["total"] = sum(gb.values())
    return gb


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


def _structure_problems(m: ModelSpec, p: Parallel, t: TrainSetup, e: EngineSetup) -> list[str]:
    probs = []
    if t.backend == "fsdp":
        if p.tp != 1 or p.pp != 1:
            probs.append("fsdp: tp and pp must be 1")
        if m.num_heads % p.cp:
            probs.append(f"fsdp: sequence split cp={p.cp} must divide the {m.num_heads} attention heads")
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
    if m.num_heads % e.tp:
        probs.append(f"engine tp={e.tp} must divide num_attention_heads={m.num_heads}")
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
) -> Feasibility:
    """Does this layout fit? `train_gpus` (disaggregated): trainer GPUs, default parallel.world; the rest serve."""
    m = load_model(model)
    if placement not in PLACEMENTS:
        raise PlanError(f"placement must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
    probs = _structure_problems(m, parallel, train, engine)
    n_train = train_gpus or parallel.world
    if parallel.world != n_train:
        probs.append(f"tp*pp*cp*dp = {parallel.world} != trainer GPUs {n_train}")
    if placement == "disaggregated":
        n_gen = gpus - n_train
        if n_gen < engine.tp:
            probs.append(f"{n_gen} GPUs left for engines, an engine needs tp={engine.tp}")
    elif n_train != gpus:
        probs.append(f"colocated: the trainer must span all {gpus} GPUs, got {n_train}")

    stages = [train_memory(m, parallel, seq_len, train, s) for s in ("first", "last")]
    tr = max(stages, key=lambda d: d["total"])
    en = engine_memory(m, engine, seq_len, gpu_mem)
    engine_gb = en["reserved"] + en["runtime"]
    resident = 0.0 if train.offload_in_gen else tr["weights"] + tr["grads"] + tr["optimizer"]
    if placement == "disaggregated":
        phases = {"train": tr["total"], "generate": engine_gb}
    elif placement == "time-shared":
        phases = {"train": tr["total"], "generate": engine_gb + resident}
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
    breakdown.update({f"engine/{k}": v for k, v in en.items() if k != "kv_tokens"})
    return Feasibility(not probs, max(phases.values()), breakdown, probs)


# --------------------------------------------------------------------------------------------------- throughput
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


# --------------------------------------------------------------------------------------------------- proposal
@dataclass
class Plan:
    model: ModelSpec
    gpu: GPU
    gpus: int
    gpu_mem: float
    seq_len: int
    prompt_len: int
    placement: str
    train_gpus: int
    parallel: Parallel
    train: TrainSetup
    engine: EngineSetup
    num_engines: int
    feasibility: Feasibility
    gen_tokens_per_s: float
    train_tokens_per_s: float
    """Trained response tokens/s (prompt tokens are trained too but not counted)."""
    engine_batch: int
    alternatives: list[tuple[float, Parallel, TrainSetup, int]] = field(default_factory=list)

    @property
    def pipeline_tokens_per_s(self) -> float:
        if self.placement == "disaggregated":
            return min(self.gen_tokens_per_s, self.train_tokens_per_s)
        return 1 / (1 / max(self.gen_tokens_per_s, 1e-9) + 1 / max(self.train_tokens_per_s, 1e-9))


def _pow2(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(max(limit, 1))) + 1)]


def _train_candidates(m: ModelSpec, n: int, samples: int, gpus_per_node: int, allow_offload: bool):
    backends = ["megatron"] if m.is_moe else ["fsdp", "megatron"]
    for backend in backends:
        tps = [1] if backend == "fsdp" else [t for t in _pow2(gpus_per_node) if m.num_kv_heads % t == 0]
        # pp must divide the layers: the config has no uneven first/last stage setting.
        pps = [1] if backend == "fsdp" else [p for p in (1, 2, 3, 4, 6, 8, 12, 16) if m.num_layers % p == 0]
        cps = [1] if backend == "fsdp" else _pow2(8)
        for tp in tps:
            for pp in pps:
                for cp in cps:
                    if n % (tp * pp * cp):
                        continue
                    dp = n // (tp * pp * cp)
                    if samples % dp:
                        continue  # validate(): dp must divide the samples of a mini-batch
                    eps = [e for e in _pow2(m.num_experts) if (tp * cp * dp) % e == 0] if m.is_moe else [1]
                    for ep in eps:
                        for offload in (False, True) if allow_offload else (False,):
                            for recompute in (False, True):
                                par = Parallel(tp=tp, pp=pp, cp=cp, ep=ep, dp=dp)
                                yield par, TrainSetup(backend, recompute=recompute, optimizer_offload=offload)


def _best_trainer(m, n, seq_len, mem_budget, samples, gpus_per_node, allow_offload, ctx):
    """Feasible trainer layouts on n GPUs within a per-GPU memory budget, best first: [(rate, parallel, setup)].

    rate = layout efficiency / FLOPs per token, so that n * peak FLOP/s * MFU * rate is trained tokens/s.
    """
    found = []
    for par, setup in _train_candidates(m, n, samples, gpus_per_node, allow_offload):
        if _structure_problems(m, par, setup, EngineSetup()):
            continue
        peak = max(train_memory(m, par, seq_len, setup, s)["total"] for s in ("first", "last"))
        if peak > mem_budget:
            continue
        rate = train_efficiency(par, setup, samples) / train_flops_per_token(m, ctx, setup.recompute)
        # Ties: fsdp (simpler, ZeRO-3), then fewer model-parallel ranks.
        found.append((rate, setup.backend == "fsdp", -par.tp * par.pp * par.cp, par, setup))
    found.sort(key=lambda x: x[:3], reverse=True)
    return [(r, par, setup) for r, _, _, par, setup in found]


def _best_engine(m, gpu, gpu_mem, seq_len, prompt_len, resp_len, max_gpus, mem_fraction, min_seqs):
    """(engine setup, tokens/s per engine, batch) with the best tokens/s per GPU, or None."""
    best = None
    for tp in _pow2(min(max_gpus, 64)):
        e = EngineSetup(tp=tp, mem_fraction=mem_fraction, min_seqs=min_seqs)
        if m.num_heads % tp:
            continue
        mem = engine_memory(m, e, seq_len, gpu_mem)
        if mem["weights"] + mem["kv_min"] > mem["reserved"]:
            continue
        tps, batch = decode_tokens_per_s(m, e, gpu, gpu_mem, prompt_len, resp_len)
        if best is None or tps / tp > best[1] / best[0].tp * 1.02:  # a larger tp must win clearly
            best = (e, tps, batch)
    return best


def propose(
    model: ModelSpec | str,
    gpus: int,
    gpu_mem: float | None = None,
    seq_len: int = 8192,
    *,
    mode: str = "disaggregated",
    gpu: str = "h100",
    prompt_len: int = 1024,
    samples_per_minibatch: int = 512,
    gpus_per_node: int = 8,
    allow_offload: bool = False,
    min_seqs: int = 4,
) -> Plan:
    """The best modelled layout of `model` on `gpus` GPUs (mode: disaggregated | colocated).

    Responses are assumed to average half of the response budget (seq_len - prompt_len).
    """
    m = load_model(model)
    hw = GPUS.get(gpu.lower())
    if hw is None:
        raise PlanError(f"--gpu {gpu!r}: one of {', '.join(GPUS)}")
    mem = gpu_mem or hw.mem_gb
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1; got {gpus}")
    if not 0 < prompt_len < seq_len:
        raise PlanError(f"prompt length {prompt_len} must be in (0, seq_len={seq_len})")
    resp = (seq_len - prompt_len) / 2
    ctx = prompt_len + resp / 2  # mean context of a trained or decoded token
    resp_frac = resp / (prompt_len + resp)  # share of trained tokens that are response tokens
    args = (m, hw, gpus, mem, seq_len, prompt_len, resp, ctx, resp_frac, samples_per_minibatch, gpus_per_node,
            allow_offload, min_seqs)  # fmt: skip
    if mode == "colocated":
        return _propose_colocated(*args)
    if mode != "disaggregated":
        raise PlanError(f"--mode must be colocated or disaggregated; got {mode!r}")
    if gpus < 2:
        raise PlanError("disaggregated mode needs >= 2 GPUs (one trains, one generates); use --mode colocated")
    return _propose_disaggregated(*args)


def _propose_disaggregated(m, hw, gpus, mem, seq_len, prompt_len, resp, ctx, resp_frac, samples, gpn, offload, seqs):
    """Split the GPUs so that generated and trained response tokens/s balance (maximise their minimum)."""
    eng = _best_engine(m, hw, mem, seq_len, prompt_len, resp, gpus - 1, 0.85, seqs)
    if eng is None:
        raise PlanError(f"{m.name}: no engine of tp <= {gpus - 1} GPUs holds the weights and {seqs} full sequences")
    e, per_engine, batch = eng
    best = None
    step = 1 if gpus <= 16 else gpn // 2
    for n_train in range(step, gpus, step):
        n_gen = gpus - n_train
        if n_gen < e.tp:
            continue
        cands = _best_trainer(m, n_train, seq_len, mem * HEADROOM, samples, gpn, offload, ctx)
        if not cands:
            continue
        gen = (n_gen // e.tp) * per_engine
        train = n_train * hw.tflops * 1e12 * TRAIN_MFU * cands[0][0] * resp_frac
        if best is None or min(gen, train) > best[0] * 1.001:
            best = (min(gen, train), n_train, cands, gen, train)
    if best is None:
        raise PlanError(_no_fit_message(m, gpus, mem, seq_len, offload))
    _, n_train, cands, gen, train = best
    par, setup = cands[0][1], replace(cands[0][2], mb_tokens=seq_len)
    feas = check_feasible(m, par, gpus, mem, seq_len, train=setup, engine=e, train_gpus=n_train)
    alts = [(r / cands[0][0], p, t, n_train) for r, p, t in cands[1:6]]
    return Plan(m, hw, gpus, mem, seq_len, prompt_len, "disaggregated", n_train, par, setup, e,
                (gpus - n_train) // e.tp, feas, gen, train, batch, alts)  # fmt: skip


def _propose_colocated(m, hw, gpus, mem, seq_len, prompt_len, resp, ctx, resp_frac, samples, gpn, offload, seqs):
    """Space-shared: every GPU holds a trainer rank and a tp=1 engine; choose the engine's memory fraction."""
    best = None
    for frac20 in range(17, 5, -1):  # mem_fraction 0.85 .. 0.30 in steps of 0.05
        e = EngineSetup(tp=1, mem_fraction=frac20 / 20, min_seqs=seqs)
        em = engine_memory(m, e, seq_len, mem)
        if em["weights"] + em["kv_min"] > em["reserved"]:
            continue
        budget = mem * HEADROOM - em["reserved"] - em["runtime"]
        cands = _best_trainer(m, gpus, seq_len, budget, samples, gpn, offload, ctx)
        if not cands:
            continue
        per_engine, batch = decode_tokens_per_s(m, e, hw, mem, prompt_len, resp)
        gen = gpus * per_engine
        train = gpus * hw.tflops * 1e12 * TRAIN_MFU * cands[0][0] * resp_frac
        combined = 1 / (1 / gen + 1 / train)  # both share the same GPUs' time
        if best is None or combined > best[0] * 1.001:
            best = (combined, e, cands, gen, train, batch)
    if best is None:
        raise PlanError(
            _no_fit_message(m, gpus, mem, seq_len, offload)
            + " In colocated mode each GPU holds a trainer rank and a whole tp=1 engine; try --mode disaggregated."
        )
    _, e, cands, gen, train, batch = best
    par, setup = cands[0][1], replace(cands[0][2], mb_tokens=seq_len)
    feas = check_feasible(m, par, gpus, mem, seq_len, train=setup, engine=e, placement="space-shared")
    alts = [(r / cands[0][0], p, t, gpus) for r, p, t in cands[1:6]]
    return Plan(m, hw, gpus, mem, seq_len, prompt_len, "space-shared", gpus, par, setup, e, gpus, feas, gen, train,
                batch, alts)  # fmt: skip


def _no_fit_message(m: ModelSpec, gpus: int, mem: float, seq_len: int, allow_offload: bool) -> str:
    states = m.total_params * (2 + 4 + 12) / GiB
    hint = "" if allow_offload else " (optimizer CPU offload not considered)"
    return (
        f"{m.name} ({m.total_params / 1e9:.1f}B params, ~{states:.0f} GiB of bf16 weights + fp32 grads + Adam) "
        f"does not fit on {gpus} x {mem:g} GiB GPUs at seq_len {seq_len} with any layout{hint}: "
        "use more GPUs, a shorter --seq-len, or GPUs with more memory."
    )


# --------------------------------------------------------------------------------------------------- output
def _fmt_par(p: Parallel, t: TrainSetup) -> str:
    parts = [f"tp={p.tp} pp={p.pp} cp={p.cp}", f"ep={p.ep}" if p.ep > 1 else "", f"dp={p.dp}"]
    extra = ["full recompute" if t.recompute else "no recompute"]
    if t.optimizer_offload:
        extra.append("optimizer CPU offload")
    return f"{t.backend:8s} " + " ".join(x for x in parts if x) + ", " + ", ".join(extra)


def explain(plan: Plan) -> str:
    """The plan as readable tables."""
    m, b = plan.model, plan.feasibility.breakdown
    moe = f", MoE {m.num_experts} experts top-{m.experts_per_token}" if m.is_moe else ", dense"
    lines = [
        f"model    {m.name}: {m.total_params / 1e9:.2f}B params ({m.active_params / 1e9:.2f}B active{moe}), "
        f"{m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/{m.num_kv_heads} kv x {m.head_dim}, "
        f"vocab {m.vocab_size}",
        f"cluster  {plan.gpus} x {plan.gpu.name} ({plan.gpu_mem:g} GiB, {plan.gpu.tflops:g} TFLOP/s bf16, "
        f"{plan.gpu.bw_tbs:g} TB/s), placement {plan.placement}, sequence {plan.seq_len} tokens "
        f"(prompt <= {plan.prompt_len})",
        "",
        f"trainer  {plan.train_gpus} GPU(s): {_fmt_par(plan.parallel, plan.train)}",
        f"         micro-batch {plan.train.mb_tokens} tokens per data-parallel rank",
        "  per-GPU memory (worst pipeline stage)            GiB",
    ]
    labels = {
        "weights": "weights (bf16 shard; fsdp: fp32 shard)",
        "grads": f"gradients ({plan.train.grad_bytes} B/param)",
        "optimizer": "Adam fp32 master+m+v (sharded over dp)",
        "fsdp_gather": "fsdp gathered layers + unsharded grads",
        "activations": "activations" + (" (full recompute)" if plan.train.recompute else ""),
        "logits": "logits (last stage)",
        "overhead": "CUDA/NCCL + fragmentation",
        "total": "total",
    }
    for key, label in labels.items():
        if f"train/{key}" in b:
            lines.append(f"    {label:45s} {b[f'train/{key}']:6.1f}")
    kv_tok = m.kv_bytes_per_token(plan.engine.tp)
    lines += [
        "",
        f"engines  {plan.num_engines} x tp={plan.engine.tp} (mem_fraction {plan.engine.mem_fraction:g})",
        f"    weights per GPU {b['engine/weights']:6.1f} GiB;  KV pool {b['engine/kv_pool']:6.1f} GiB;  "
        f"KV per token {kv_tok / 1024:.1f} KiB = {m.num_layers} layers x {math.ceil(m.num_kv_heads / plan.engine.tp)}"
        f" kv heads x {m.head_dim} x 2 (K,V) x 2 B",
        f"    running batch ~{plan.engine_batch} sequences per engine at the mean context",
        "",
        "throughput model (response tokens/s)",
        f"    generation {plan.gen_tokens_per_s:12,.0f}   (decode, memory-bound, {DECODE_BW_EFF:.0%} of HBM bandwidth)",
        f"    training   {plan.train_tokens_per_s:12,.0f}   ({TRAIN_MFU:.0%} MFU)",
        f"    pipeline   {plan.pipeline_tokens_per_s:12,.0f}",
        f"peak per GPU {plan.feasibility.peak_gb:.1f} / {plan.gpu_mem:g} GiB: "
        + ("fits" if plan.feasibility.ok else "; ".join(plan.feasibility.problems)),
    ]
    if plan.alternatives:
        lines += ["", "next-best trainer layouts (modelled speed relative to the chosen one)"]
        lines += [f"    {s:.3f}  {_fmt_par(p, t)}" for s, p, t, _ in plan.alternatives]
    return "\n".join(lines)


PRESET_FOR_MODEL = {
    "qwen2.5-0.5b": "qwen2.5-0.5b-1gpu.yaml",
    "qwen2.5-1.5b": "qwen2.5-1.5b-1gpu.yaml",
    "qwen2.5-7b": "qwen2.5-7b-8gpu.yaml",
    "qwen2.5-32b": "dapo-qwen2.5-32b-128gpu.yaml",
    "qwen3-30b-a3b": "qwen3-30b-a3b-moe.yaml",
}


def preset_for(m: ModelSpec) -> Path:
    """The preset a generated config derives from: the model's own, or the DAPO base."""
    own = CONFIGS / PRESET_FOR_MODEL.get(_canonical(m.name), "base/dapo.yaml")
    return own if own.is_file() else CONFIGS / "base" / "dapo.yaml"


def config_overrides(plan: Plan, model_path: str, base_max_new: int = 0) -> dict[str, Any]:
    """The config sections the plan sets (everything else comes from the base preset)."""
    p, t, e = plan.parallel, plan.train, plan.engine
    shared = plan.placement != "disaggregated"
    max_new = plan.seq_len - plan.prompt_len
    running = max(plan.engine_batch, 1)
    out: dict[str, Any] = {
        "model": {"path": model_path, "tokenizer": model_path, "dtype": "bfloat16"},
        "data": {"max_prompt_tokens": plan.prompt_len},
        "rollout": {"max_new_tokens": max_new, "max_inflight_per_engine": running},
        "engine": {
            "backend": "sglang",
            "num_engines": plan.num_engines,
            "tp": e.tp,
            "gpus_per_engine": 0.5 if shared else float(e.tp),
            "mem_fraction": e.mem_fraction,
            "max_running_requests": running,
        },
        "trainer": {
            "backend": t.backend,
            "world_size": plan.train_gpus,
            "gpus_per_rank": 0.5 if shared else 1.0,
            "parallel": {"tp": p.tp, "pp": p.pp, "vpp": 1, "cp": p.cp, "ep": p.ep, "etp": p.etp, "dp": p.dp},
            "recompute": t.recompute,
            "distributed_optimizer": t.distributed_optimizer,
            "micro_batch_size": 1,
            "max_tokens_per_micro_batch": t.mb_tokens,
        },
        "weight_sync": {"mode": "colocated" if shared else "disaggregated"},
        "cluster": {"address": "local" if plan.gpus <= 8 else "auto", "num_gpus": plan.gpus if plan.gpus <= 8 else 0},
    }
    if max_new != base_max_new:  # keep DAPO's L_cache / L_max = 4096 / 20480 when the length changes
        out["algorithm"] = {"overlong": {"cache_len": min(4096, max_new // 5)}}
    return out


def write_config(plan: Plan, out: str | os.PathLike, model_path: str = "") -> Path:
    """Write the plan as a YAML preset derived from the model's preset; check it with load_config."""
    from omegaconf import OmegaConf

    from pipeline.config import ConfigError, load_config

    out = Path(out).resolve()
    base = preset_for(plan.model)
    inside = out.is_relative_to(CONFIGS.parent)
    rel = os.path.relpath(base, out.parent) if inside else str(base)  # relative inside the repo, else absolute
    base_max_new = load_config(base).rollout.max_new_tokens
    path = model_path or f"/models/{plan.model.name}"
    header = ["# Generated by `dapo plan`. The numbers behind it:", "#"]
    header += [f"# {line}".rstrip() for line in explain(plan).splitlines()]
    if plan.train.optimizer_offload:
        header.append("# NOTE: this layout needs optimizer CPU offload, which trainer.* cannot express yet.")
    if plan.placement != "disaggregated" and plan.gpus > 1:
        header.append("# NOTE: colocated: each GPU must hold one trainer rank and one engine (0.5 + 0.5 GPU).")
    body = OmegaConf.to_yaml(OmegaConf.create(config_overrides(plan, path, base_max_new)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + f"\nbase: {rel}\n" + body)
    try:
        load_config(out)
    except ConfigError as e:
        raise PlanError(f"the generated config {out} does not validate: {e}") from None
    return out


def check_config(cfg: Any, gpu_mem: float = 80.0, model: str | ModelSpec | None = None) -> Feasibility:
    """check_feasible() for a loaded Config: the model from model.path (a checkpoint, or its basename as a known
    name, so placeholder paths work), placement from weight_sync.mode, sizes from rollout/data/trainer."""
    t, e = cfg.trainer, cfg.engine
    m = load_model(model or (cfg.model.path if Path(cfg.model.path).exists() else Path(cfg.model.path).name))
    p = t.parallel
    par = Parallel(tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, dp=p.dp, vpp=p.vpp)
    seq_len = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    setup = TrainSetup(t.backend, t.recompute, t.distributed_optimizer, mb_tokens=t.max_tokens_per_micro_batch)
    engine = EngineSetup(tp=e.tp, mem_fraction=e.mem_fraction)
    if cfg.weight_sync.mode == "colocated":
        return check_feasible(m, par, t.world_size, gpu_mem, seq_len, train=setup, engine=engine,
                              placement="space-shared")  # fmt: skip
    gpus = t.world_size + e.num_engines * e.tp
    return check_feasible(m, par, gpus, gpu_mem, seq_len, train=setup, engine=engine, train_gpus=t.world_size)


def _base_settings(m: ModelSpec) -> tuple[int, int, int]:
    """(prompt tokens, response tokens, samples per mini-batch) of the preset the config will derive from."""
    from pipeline.config import load_config

    cfg = load_config(preset_for(m))
    samples = cfg.trainer.batch_size * cfg.rollout.n_samples_per_prompt // cfg.trainer.num_minibatches
    return cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens, samples


def plan_main(argv: list[str]) -> int:
    """`dapo plan --model M --gpus N [...]`: print the plan, optionally write a config; 2 on a bad request."""
    from pipeline.config import ConfigError

    ap = argparse.ArgumentParser(prog="dapo plan", description="Propose parallelism for a model and a GPU count.")
    ap.add_argument("--model", help="HF config.json, checkpoint dir, or a known name (Qwen2.5-7B)")
    ap.add_argument("--gpus", type=int, help="total GPUs")
    ap.add_argument("--check", default="", help="instead: check an existing config YAML's layout against --gpu-mem")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default: that of --gpu)")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU type (FLOP/s, bandwidth)")
    ap.add_argument("--seq-len", type=int, default=0, help="prompt + response tokens (default: the preset's)")
    ap.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (default: the preset's)")
    ap.add_argument("--mode", default="disaggregated", choices=["colocated", "disaggregated"])
    ap.add_argument("--gpus-per-node", type=int, default=8, help="largest tensor-parallel group")
    ap.add_argument("--allow-offload", action="store_true", help="consider optimizer CPU offload")
    ap.add_argument("--model-path", default="", help="model.path written to the config (default /models/<name>)")
    ap.add_argument("--out", default="", help="write a config YAML here")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    args = ap.parse_args(argv)
    if args.check:
        return _check_main(args.check, args.gpu_mem or GPUS[args.gpu].mem_gb, args.model)
    if not args.model or not args.gpus:
        ap.error("--model and --gpus are required (or --check CONFIG)")
    try:
        m = load_model(args.model)
        base_prompt, base_resp, samples = _base_settings(m)
        seq_len = args.seq_len or base_prompt + base_resp
        prompt_len = args.prompt_len or min(base_prompt, seq_len // 2)
        plan = propose(m, args.gpus, args.gpu_mem, seq_len, mode=args.mode, gpu=args.gpu, prompt_len=prompt_len,
                       samples_per_minibatch=samples, gpus_per_node=args.gpus_per_node,
                       allow_offload=args.allow_offload)  # fmt: skip
        if args.json:
            print(json.dumps(_plan_dict(plan), indent=2))
        else:
            print(explain(plan))
        if args.out:
            path = write_config(plan, args.out, args.model_path)
            print(f"\nwrote {path}", file=sys.stderr if args.json else sys.stdout)
    except (PlanError, ConfigError) as e:
        print(f"dapo plan: {e}", file=sys.stderr)
        return 2
    return 0


def _check_main(path: str, gpu_mem: float, model: str | None) -> int:
    from pipeline.config import ConfigError, load_config

    try:
        f = check_config(load_config(path), gpu_mem, model)
    except (PlanError, ConfigError) as e:
        print(f"dapo plan: {e}", file=sys.stderr)
        return 2
    for key, gb in f.breakdown.items():
        print(f"  {key:28s} {gb:8.1f} GiB")
    print(f"peak per GPU {f.peak_gb:.1f} / {gpu_mem:g} GiB: " + ("fits" if f.ok else "; ".join(f.problems)))
    return 0 if f.ok else 1


def _plan_dict(plan: Plan) -> dict[str, Any]:
    return {
        "model": plan.model.name,
        "placement": plan.placement,
        "train_gpus": plan.train_gpus,
        "parallel": asdict(plan.parallel),
        "train": asdict(plan.train),
        "engine": asdict(plan.engine),
        "num_engines": plan.num_engines,
        "peak_gb": round(plan.feasibility.peak_gb, 2),
        "breakdown_gb": {k: round(v, 2) for k, v in plan.feasibility.breakdown.items()},
        "gen_tokens_per_s": round(plan.gen_tokens_per_s),
        "train_tokens_per_s": round(plan.train_tokens_per_s),
    }
