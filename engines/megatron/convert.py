"""In-memory Hugging Face <-> megatron-core weight conversion, sharded by (tp rank, pp rank, vp stage, ep rank).

Contract:
- `arch_from_hf(hf_config, make_vocab_size_divisible_by, tp)` -> `ArchInfo`, the shape facts both directions need.
- `hf_to_megatron(get, arch, tp_rank=..., tp=..., pp_rank=..., pp=..., vp_stage=..., vpp=..., ep_rank=..., ep=...,
  te=...)` returns the state dict (megatron names, local layer indices) of one model chunk, reading full HF tensors
  through `get(hf_name)` (so a caller can stream them from safetensors).
- `megatron_to_hf(shards, arch, ...)` is the inverse for one chunk: `shards[r]` is TP rank r's chunk state dict;
  returns full HF tensors. HF -> Megatron(tp, pp) -> HF is bit-exact (pure slicing and concatenation).
- `megatron_to_hf_named_tensors(model_chunks, arch, te=...)` is the streaming, distributed form used for weight
  sync: every rank calls it and iterates it to the end; TP-sharded parameters are all-gathered within the TP group
  (expert parameters also across the expert-parallel group), and only the sync-source ranks
  (`is_sync_source()`: tp rank 0, dp rank 0, cp rank 0 — one per PP stage) yield `(hf_name, full tensor)`, each
  for the layers of its own stage. With tied embeddings `lm_head.weight` is not emitted (the engine ties it).
- Layouts: megatron fuses q/k/v into `linear_qkv` grouped per key/value head (`[q heads of group g, k_g, v_g]` for
  each group g, TP splitting the groups), fuses gate/up into `linear_fc1` (`[gate shard; up shard]` per TP rank),
  splits the vocabulary (padded with zero rows to `padded_vocab_size`) across TP, splits o_proj/down_proj along
  their input dimension, and numbers layers locally per chunk: global layer = chunk offset + local index, with
  the uniform split of `chunk_layers`. The transformer-engine spec (`te=True`) fuses the pre-attention and
  pre-MLP norms into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight` (dense MLP only).
- Qwen3-MoE experts use the on-disk HF names `mlp.experts.{E}.{gate,up,down}_proj.weight` and `mlp.gate.weight`;
  megatron names `mlp.experts.local_experts.{e}` (SequentialMLP) or `mlp.experts.linear_fc{1,2}.weight{e}`
  (TE grouped GEMM); local expert e of EP rank r is global expert r * (E / ep) + e.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


# --------------------------------------------------------------------------------------------------- shapes
def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the next multiple of divisible_by * tp."""
    multiple = max(divisible_by, 1) * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    padded_vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_topk: int = 0
    moe_norm_topk: bool = True

    def check_parallel(self, tp: int, pp: int, vpp: int = 1, ep: int = 1) -> None:
        """ValueError naming the config key when the model cannot be split this way."""
        for what, n in (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads)):
            if n % tp:
                raise ValueError(f"trainer.parallel.tp: {tp} does not divide the model's {what} ({n})")
        ffn = self.moe_ffn_hidden_size if self.num_experts else self.ffn_hidden_size
        if ffn % tp:
            raise ValueError(f"trainer.parallel.tp: {tp} does not divide the MLP width ({ffn})")
        if self.num_layers % (pp * vpp):
            raise ValueError(
                f"trainer.parallel.pp: pp*vpp = {pp * vpp} does not divide num_hidden_layers ({self.num_layers})"
            )
        if self.num_experts and self.num_experts % ep:
            raise ValueError(f"trainer.parallel.ep: {ep} does not divide num_experts ({self.num_experts})")
        if not self.num_experts and ep != 1:
            raise ValueError(f"trainer.parallel.ep: {ep} > 1 needs a mixture-of-experts model")


def arch_from_hf(hf_config: Any, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> ArchInfo:
    c = hf_config
    mt = c.model_type
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    moe = mt == "qwen3_moe"
    if moe and (getattr(c, "mlp_only_layers", None) or getattr(c, "decoder_sparse_step", 1) != 1):
        raise ValueError(
            "model.path: qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step) is not supported"
        )
    return ArchInfo(
        model_type=mt,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        ffn_hidden_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        padded_vocab_size=padded_vocab_size(c.vocab_size, make_vocab_size_divisible_by, tp),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        qkv_bias=mt == "qwen2" or bool(getattr(c, "attention_bias", False)),
        qk_norm=mt in ("qwen3", "qwen3_moe"),
        num_experts=int(getattr(c, "num_experts", 0) or 0) if moe else 0,
        moe_ffn_hidden_size=int(getattr(c, "moe_intermediate_size", 0) or 0) if moe else 0,
        moe_topk=int(getattr(c, "num_experts_per_tok", 0) or 0) if moe else 0,
        moe_norm_topk=bool(getattr(c, "norm_topk_prob", True)),
    )


def chunk_layers(arch: ArchInfo, pp: int, vpp: int, pp_rank: int, vp_stage: int) -> range:
    """Global layer indices held by chunk (pp_rank, vp_stage): megatron's uniform split."""
    per_chunk = arch.num_layers // (pp * vpp)
    start = vp_stage * (arch.num_layers // vpp) + pp_rank * per_chunk
    return range(start, start + per_chunk)


def chunk_has_embedding(pp_rank: int, vp_stage: int) -> bool:
    return pp_rank == 0 and vp_stage == 0


def chunk_has_head(pp_rank: int, pp: int, vp_stage: int, vpp: int) -> bool:
    return pp_rank == pp - 1 and vp_stage == vpp - 1


# --------------------------------------------------------------------------------------------------- name tables
# kind: rep (replicated) | qkv (q, k, v fused per group) | gate_up (fused gate/up) | row (split dim 1) | vocab
_EMB = ("embedding.word_embeddings.weight", "vocab", ("model.embed_tokens.weight",))
_FINAL_NORM = ("decoder.final_layernorm.weight", "rep", ("model.norm.weight",))


def _layer_table(arch: ArchInfo, te: bool) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Megatron layer-parameter suffix -> (kind, HF layer-parameter suffixes)."""
    a = "self_attn."
    t: dict[str, tuple[str, tuple[str, ...]]] = {
        "self_attention.linear_qkv.weight": ("qkv", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")),
        "self_attention.linear_proj.weight": ("row", (a + "o_proj.weight",)),
    }
    if arch.qkv_bias:
        t["self_attention.linear_qkv.bias"] = ("qkv", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"))
    if arch.qk_norm:
        t["self_attention.q_layernorm.weight"] = ("rep", (a + "q_norm.weight",))
        t["self_attention.k_layernorm.weight"] = ("rep", (a + "k_norm.weight",))
    in_norm = "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight"
    t[in_norm] = ("rep", ("input_layernorm.weight",))
    mlp_norm = "mlp.linear_fc1.layer_norm_weight" if te and not arch.num_experts else "pre_mlp_layernorm.weight"
    t[mlp_norm] = ("rep", ("post_attention_layernorm.weight",))
    if arch.num_experts:
        t["mlp.router.weight"] = ("rep", ("mlp.gate.weight",))
    else:
        t["mlp.linear_fc1.weight"] = ("gate_up", ("mlp.gate_proj.weight", "mlp.up_proj.weight"))
        t["mlp.linear_fc2.weight"] = ("row", ("mlp.down_proj.weight",))
    return t


_EXPERT_SEQ = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")
_EXPERT_TE = re.compile(r"mlp\.experts\.(linear_fc1|linear_fc2)\.weight(\d+)$")
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")


def _expert_entry(suffix: str, local: int, n_local: int, ep_rank: int) -> tuple[str, tuple[str, ...]]:
    g = ep_rank * n_local + local
    p = f"mlp.experts.{g}."
    if suffix == "linear_fc1":
        return "gate_up", (p + "gate_proj.weight", p + "up_proj.weight")
    return "row", (p + "down_proj.weight",)


def _parse_expert(rest: str) -> tuple[int, str] | None:
    m = _EXPERT_SEQ.match(rest)
    if m:
        return int(m.group(1)), m.group(2)
    m = _EXPERT_TE.match(rest)
    if m:
        return int(m.group(2)), m.group(1)
    return None


def resolve(
    name: str, arch: ArchInfo, layer_offset: int, te: bool, ep_rank: int = 0, ep: int = 1
) -> tuple[str, tuple[str, ...]]:
    """(kind, full HF names) of one megatron chunk parameter."""
    if name == _EMB[0]:
        return _EMB[1], _EMB[2]
    if name == _FINAL_NORM[0]:
        return _FINAL_NORM[1], _FINAL_NORM[2]
    if name == "output_layer.weight":
        return "vocab", ("model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight",)
    m = _LAYER.match(name)
    if not m:
        raise KeyError(f"unknown megatron parameter {name!r}")
    layer, rest = int(m.group(1)) + layer_offset, m.group(2)
    prefix = f"model.layers.{layer}."
    expert = _parse_expert(rest)
    if expert is not None:
        kind, hf = _expert_entry(expert[1], expert[0], arch.num_experts // ep, ep_rank)
    else:
        table = _layer_table(arch, te)
        if rest not in table:
            raise KeyError(f"unknown megatron layer parameter {name!r}")
        kind, hf = table[rest]
    return kind, tuple(prefix + h for h in hf)


def chunk_param_names(
    arch: ArchInfo, pp_rank: int, pp: int, vp_stage: int, vpp: int, te: bool, ep: int = 1
) -> list[str]:
    """The megatron parameter names of one chunk (local layer indices), in a deterministic order."""
    names = []
    if chunk_has_embedding(pp_rank, vp_stage):
        names.append(_EMB[0])
    per_layer = list(_layer_table(arch, te))
    if arch.num_experts:
        for e in range(arch.num_experts // ep):
            per_layer += [
                f"mlp.experts.local_experts.{e}.linear_fc1.weight",
                f"mlp.experts.local_experts.{e}.linear_fc2.weight",
            ]
    for i in range(len(chunk_layers(arch, pp, vpp, pp_rank, vp_stage))):
        names += [f"decoder.layers.{i}.{s}" for s in per_layer]
    if chunk_has_head(pp_rank, pp, vp_stage, vpp):
        names.append(_FINAL_NORM[0])
        if not (arch.tie_word_embeddings and chunk_has_embedding(pp_rank, vp_stage)):
            names.append("output_layer.weight")
    return names


# --------------------------------------------------------------------------------------------------- split / merge
def _split_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ArchInfo, tp: int) -> list[torch.Tensor]:
    """Full q/k/v (weight (out, in) or bias (out,)) -> per-TP-rank fused linear_qkv shards."""
    ng, d = arch.num_kv_heads, arch.head_dim
    qpg = arch.num_heads // ng
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(ng, qpg * d, *tail), k.reshape(ng, d, *tail), v.reshape(ng, d, *tail)], dim=1)
    return [c.reshape(-1, *tail) for c in fused.chunk(tp, dim=0)]


def _merge_qkv(shards: Sequence[torch.Tensor], arch: ArchInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ng, d = arch.num_kv_heads, arch.head_dim
    qpg = arch.num_heads // ng
    tail = shards[0].shape[1:]
    fused = torch.cat([s.reshape(-1, (qpg + 2) * d, *tail) for s in shards], dim=0)  # (ng, (qpg+2)*d, ...)
    q, k, v = fused.split([qpg * d, d, d], dim=1)
    return q.reshape(ng * qpg * d, *tail), k.reshape(ng * d, *tail), v.reshape(ng * d, *tail)


def split_for_tp(kind: str, hf: Sequence[torch.Tensor], arch: ArchInfo, tp: int) -> list[torch.Tensor]:
    """Full HF tensor(s) of one megatron parameter -> its shard on each TP rank."""
    if kind == "rep":
        return [hf[0]] * tp
    if kind == "qkv":
        return _split_qkv(hf[0], hf[1], hf[2], arch, tp)
    if kind == "gate_up":
        gates, ups = hf[0].chunk(tp, dim=0), hf[1].chunk(tp, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(gates, ups, strict=True)]
    if kind == "row":
        return list(hf[0].chunk(tp, dim=1))
    if kind == "vocab":
        w = hf[0]
        pad = arch.padded_vocab_size - w.shape[0]
        if pad < 0:
            raise ValueError(f"vocabulary {w.shape[0]} is larger than the padded vocabulary {arch.padded_vocab_size}")
        if pad:
            w = torch.cat([w, w.new_zeros(pad, *w.shape[1:])], dim=0)
        return list(w.chunk(tp, dim=0))
    raise ValueError(f"unknown parameter kind {kind!r}")


def merge_from_tp(kind: str, shards: Sequence[torch.Tensor], arch: ArchInfo) -> list[torch.Tensor]:
    """Inverse of split_for_tp: the full HF tensor(s), in the order of the HF names."""
    if kind == "rep":
        return [shards[0]]
    if kind == "qkv":
        return list(_merge_qkv(shards, arch))
    if kind == "gate_up":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    if kind == "row":
        return [torch.cat(list(shards), dim=1)]
    if kind == "vocab":
        return [torch.cat(list(shards), dim=0)[: arch.vocab_size]]
    raise ValueError(f"unknown parameter kind {kind!r}")


def is_tp_sharded(kind: str) -> bool:
    return kind != "rep"


# --------------------------------------------------------------------------------------------------- dict form
def hf_to_megatron(
    get: Callable[[str], torch.Tensor],
    arch: ArchInfo,
    *,
    tp_rank: int = 0,
    tp: int = 1,
    pp_rank: int = 0,
    pp: int = 1,
    vp_stage: int = 0,
    vpp: int = 1,
    ep_rank: int = 0,
    ep: int = 1,
    te: bool = False,
) -> dict[str, torch.Tensor]:
    """One chunk's megatron state dict (see the module docstring)."""
    offset = chunk_layers(arch, pp, vpp, pp_rank, vp_stage).start
    out = {}
    for name in chunk_param_names(arch, pp_rank, pp, vp_stage, vpp, te, ep):
        kind, hf_names = resolve(name, arch, offset, te, ep_rank, ep)
        out[name] = split_for_tp(kind, [get(h) for h in hf_names], arch, tp)[tp_rank].contiguous()
    return out


def megatron_to_hf(
    shards: Sequence[dict[str, torch.Tensor]],
    arch: ArchInfo,
    *,
    pp_rank: int = 0,
    pp: int = 1,
    vp_stage: int = 0,
    vpp: int = 1,
    ep_rank: int = 0,
    ep: int = 1,
    te: bool = False,
) -> dict[str, torch.Tensor]:
    """Full HF tensors of one chunk from its TP shards (`shards[r]` = TP rank r's state dict)."""
    offset = chunk_layers(arch, pp, vpp, pp_rank, vp_stage).start
    out: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        if name.endswith("_extra_state"):
            continue
        kind, hf_names = resolve(name, arch, offset, te, ep_rank, ep)
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # a copy of the embedding on the last stage
        full = merge_from_tp(kind, [s[name] for s in shards], arch)
        out.update(zip(hf_names, full, strict=True))
    return out


# --------------------------------------------------------------------------------------------------- distributed
def is_sync_source() -> bool:
    """tp rank 0, dp rank 0, cp rank 0: one weight-sync source per pipeline stage."""
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_data_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )


def _all_gather(t: torch.Tensor, group: Any) -> list[torch.Tensor]:
    size = dist.get_world_size(group)
    if size == 1:
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(out, t, group=group)
    return out


def megatron_to_hf_named_tensors(
    model_chunks: Sequence[torch.nn.Module], arch: ArchInfo, *, te: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream full HF-named tensors from live model chunks (see the module docstring). Every rank must iterate it
    to the end: TP (and EP) peers of a source rank take part in the gathers."""
    from megatron.core import parallel_state as ps

    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    vpp = len(model_chunks)
    tp_group = ps.get_tensor_model_parallel_group()
    ep = ps.get_expert_model_parallel_world_size()
    ep_rank = ps.get_expert_model_parallel_rank()
    dense_part = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    expert_part = ps.get_expert_data_parallel_rank() == 0 if arch.num_experts else False
    source = is_sync_source()
    for v, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)  # unwrap megatron DDP
        offset = chunk_layers(arch, pp, vpp, pp_rank, v).start
        for name, param in module.named_parameters():
            if name == "output_layer.weight" and arch.tie_word_embeddings:
                continue
            expert = arch.num_experts and _LAYER.match(name) and _parse_expert(_LAYER.match(name).group(2))
            if not (expert_part if expert else dense_part):
                continue
            data = param.detach()
            if expert:
                shards = _all_gather(data, ps.get_expert_tensor_parallel_group())
                per_ep = [_all_gather(s, ps.get_expert_model_parallel_group()) for s in shards]  # [tp][ep]
                for r in range(ep):
                    kind, hf_names = resolve(name, arch, offset, te, r, ep)
                    if source:
                        yield from zip(hf_names, merge_from_tp(kind, [s[r] for s in per_ep], arch), strict=True)
                continue
            kind, hf_names = resolve(name, arch, offset, te, ep_rank, ep)
            shards = _all_gather(data, tp_group) if is_tp_sharded(kind) else [data]
            if source:
                yield from zip(hf_names, merge_from_tp(kind, shards, arch), strict=True)
