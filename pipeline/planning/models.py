"""Model and hardware descriptions for `dapo plan`: parameter counts from a Hugging Face config, GPU specs.

Contract:
- `load_model(name_or_path)` reads a HF `config.json` (a file or a checkpoint directory) or a name from the
  embedded table (`KNOWN_MODELS`, offline) and returns a `ModelSpec`.
- Only architectures whose memory the planner can size are accepted: Qwen2/2.5, Qwen3, Qwen2-MoE/Qwen3-MoE,
  Llama, Mistral (standard multi-head / grouped-query attention, SwiGLU MLP). Anything else -- DeepSeek-V2/V3's
  multi-head latent attention (compressed KV: `kv_lora_rank`, `q_lora_rank`), sliding-window layers, an unknown
  `model_type` -- raises `PlanError` naming the field or type the planner cannot size, instead of a silent
  wrong estimate.
- Parameters: attention (q, k, v, o; qkv bias for Qwen2; q/k norms for Qwen3), SwiGLU MLP 3*h*I, MoE layers
  router h*E + E*3*h*I_moe (+ shared expert), embeddings V*h (+ untied head), RMSNorms.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = float(2**30)


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

SUPPORTED_TYPES = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "llama", "mistral")
"""HF model_type values whose layers the memory model itemises."""
UNSIZABLE_FIELDS = {
    "kv_lora_rank": "multi-head latent attention (compressed KV cache)",
    "q_lora_rank": "multi-head latent attention (low-rank queries)",
    "qk_rope_head_dim": "multi-head latent attention (decoupled RoPE heads)",
    "n_shared_experts": "DeepSeek-style shared experts",
    "num_nextn_predict_layers": "multi-token-prediction layers",
}
"""Config fields whose memory and FLOPs the planner does not model: their presence refuses the model."""


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

    _refuse_unsizable(cfg, source)
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


def _refuse_unsizable(cfg: dict[str, Any], source: str) -> None:
    """PlanError naming what the memory model does not cover (see the module docstring)."""
    mtype = cfg.get("model_type")
    if mtype is not None and mtype not in SUPPORTED_TYPES:
        raise PlanError(
            f"{source}: model_type {mtype!r} is not one the planner can size (it itemises {', '.join(SUPPORTED_TYPES)})"
        )
    unknown = [f"`{k}` ({why})" for k, why in UNSIZABLE_FIELDS.items() if cfg.get(k) not in (None, 0, [], "")]
    other = sorted({t for t in cfg.get("layer_types") or [] if t != "full_attention"})
    if other:
        unknown.append(f"`layer_types` {other} (only full attention is modelled)")
    if cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        unknown.append("`use_sliding_window` (sliding-window attention layers)")
    if unknown:
        raise PlanError(
            f"{source}: cannot size this architecture: the memory model does not cover {'; '.join(unknown)}"
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
