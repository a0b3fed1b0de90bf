"""Build a megatron-core GPTModel (one chunk per virtual pipeline stage) from a Hugging Face config.

Contract:
- `build_model(hf_config, parallel, dtype=..., recompute=..., use_te=None)` returns `list[GPTModel]`, one chunk per
  virtual pipeline stage of this rank, with the layers, embeddings and head this (pp rank, vp stage) owns.
  `parallel_state.initialize_model_parallel` must have run. Weights are whatever megatron initialises; load real
  ones with `engines.megatron.convert`.
- Supported `model_type`s: qwen2 (QKV bias), qwen3 (QK RMSNorm, explicit head_dim), llama / mistral (optionally
  llama3 RoPE scaling), all with GQA, SwiGLU, RMSNorm, RoPE theta and tied or untied embeddings; qwen3_moe builds a
  megatron MoE layer (top-k softmax router, renormalised top-k, no shared expert). Anything else raises
  `ValueError` naming the field. MoE logits equal HF's (tests/test_megatron_model.py) and EP=2 trains like EP=1 on
  CPU (tests/test_megatron_ep.py); MoE with tp > 1 needs sequence parallelism, hence TE (megatron's MoE layer refuses
  to train otherwise).
- The layer spec: transformer-engine's when TE is importable (`use_te=None`) or requested, else megatron's local
  spec with its core attention replaced by `SDPACoreAttention`, which also accepts packed sequences (THD,
  `PackedSeqParams` with `cu_seqlens`: one `engines.attention.packed_causal_attention` call per layer) and context
  parallelism on them, so sequence packing and cp > 1 run on CPU (and packing runs on CUDA without TE).
- The padded vocabulary is `convert.padded_vocab_size(vocab, make_vocab_size_divisible_by, tp)`; the extra logit
  columns are masked out by the backend's vocab-parallel log-softmax, never trained towards.
- Dropout is 0 (RL fine-tuning; and it keeps TP/PP/DP runs comparable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from engines.attention import packed_causal_attention
from engines.megatron.context_parallel import cp_gather, cp_partition_index
from engines.megatron.convert import ArchInfo, arch_from_hf
from pipeline.contracts.config import ParallelConfig

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "qwen3_moe")


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------- attention
class SDPACoreAttention(MegatronModule):
    """Causal attention for megatron's local spec: torch's scaled_dot_product_attention, and for packed rows with
    cp = 1 engines/attention.py's one-call kernel (varlen / flex_attention on CUDA, the per-sequence loop on CPU).

    Takes what megatron's `SelfAttention` hands its core attention: sbhd tensors `[s, b, heads, dim]`, or with
    `packed_seq_params.qkv_format == "thd"` packed tensors `[t, heads, dim]` holding sequences back to back at
    `cu_seqlens_q` (each sequence attends causally to itself only). Returns `[s, b, heads*dim]` / `[t, heads*dim]`.

    Context parallelism (cp > 1, THD only): the tensors are this CP rank's share of the row, chunks r and 2*cp-1-r
    of every slot `cu_seqlens_q_padded` (engines/megatron/context_parallel.py). Keys and values are all-gathered
    over the CP group (the backward sums their gradients over the group) and each local query attends causally to
    its slot's keys up to its global position. A slot's tail beyond the real length (`cu_seqlens_q`) only ever
    comes after the real tokens, so causality keeps real tokens from attending to it, as TE's padding does; the
    tail's own outputs are never read. Megatron's RoPE gives the chunks their global positions (`apply_rotary_pos_emb`
    with `cu_seqlens_q_padded` and the CP rank; tests/test_megatron_context_parallel.py).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        self._cp_group = getattr(pg_collection, "cp", None)  # else megatron's global one, looked up when needed
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.softmax_scale
        if self.softmax_scale is None:
            self.softmax_scale = 1.0 / math.sqrt(config.kv_channels)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (b, hq, s, d), k/v (b, hkv, s, d) -> (b, hq, s, d); causal unless a boolean mask (True = attend)."""
        if k.shape[1] != q.shape[1]:  # GQA: each key/value head serves a contiguous block of query heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.dropout if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, scale=self.softmax_scale
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention: attention_bias is not supported")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if self.config.context_parallel_size > 1:
                return self._forward_thd_cp(query, key, value, packed_seq_params)
            return self._forward_thd(query, key, value, packed_seq_params)
        if self.config.context_parallel_size > 1:
            raise ValueError("trainer.parallel.cp > 1: SDPACoreAttention has context parallelism for packed rows only")
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        # Megatron's masks are True where attention is NOT allowed; SDPA's boolean masks are True where it is.
        mask = None if attention_mask is None else ~attention_mask
        out = self._sdpa(q, k, v, mask)  # (b, h, s, d)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    def _forward_thd(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, psp: PackedSeqParams
    ) -> torch.Tensor:
        """Packed sequences in one kernel call per layer (engines/attention.py: TE / torch varlen / flex_attention on
        CUDA, the per-sequence SDPA loop on CPU): no cross-sequence attention, no padding compute."""
        if self.dropout > 0 and self.training:  # the packed kernels have no dropout: the loop under megatron's RNG
            return self._forward_thd_loop(query, key, value, psp)
        max_seqlen = int(psp.max_seqlen_q) if psp.max_seqlen_q is not None else None
        out = packed_causal_attention(query, key, value, psp.cu_seqlens_q, max_seqlen, self.softmax_scale)
        return out.reshape(out.shape[0], -1)

    def _forward_thd_loop(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, psp: PackedSeqParams
    ) -> torch.Tensor:
        """Packed sequences, one causal SDPA per sequence (with dropout)."""
        bounds = psp.cu_seqlens_q.tolist()
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end == start:
                continue
            q, k, v = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # (1, h, s, d)
            outs.append(self._sdpa(q, k, v, None)[0].transpose(0, 1))  # (s, h, d)
        out = torch.cat(outs, dim=0)
        return out.reshape(out.shape[0], -1)

    def _forward_thd_cp(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, psp: PackedSeqParams
    ) -> torch.Tensor:
        """This CP rank's queries against the whole row's keys and values (see the class docstring)."""
        if psp.cu_seqlens_q_padded is None:
            raise ValueError("context parallelism needs PackedSeqParams.cu_seqlens_q_padded (2*cp-aligned slots)")
        group = self._cp_group if self._cp_group is not None else parallel_state.get_context_parallel_group()
        cp, rank = group.size(), group.rank()
        slots = psp.cu_seqlens_q_padded
        indices = [cp_partition_index(slots, cp, r) for r in range(cp)]
        total = int(slots[-1])
        kv = cp_gather(torch.cat([key, value], dim=1), indices, total, group, dim=0, sum_grads=True)
        key, value = kv.split([key.shape[1], value.shape[1]], dim=1)  # (total, hkv, d) each, in row order
        mine = indices[rank]  # the row position of each local token
        bounds = slots.tolist()
        outs, local = [], 0
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            n = (end - start) // cp
            q_pos = mine[local : local + n] - start  # (n,) positions within the slot: chunks r and 2*cp-1-r
            q = query[local : local + n].transpose(0, 1).unsqueeze(0)  # (1, hq, n, d)
            seen = int(q_pos[-1]) + 1  # the late chunk's last position: no query looks further
            k, v = (x[start : start + seen].transpose(0, 1).unsqueeze(0) for x in (key, value))
            mask = torch.arange(seen, device=q.device) <= q_pos.unsqueeze(1)  # (n, seen), True = attend
            outs.append(self._sdpa(q, k, v, mask)[0].transpose(0, 1))  # (n, hq, d)
            local += n
        out = torch.cat(outs, dim=0)
        return out.reshape(out.shape[0], -1)


# --------------------------------------------------------------------------------------------------- config
@dataclass
class BuildOptions:
    dtype: torch.dtype = torch.float32
    """Parameter dtype (bfloat16 on GPU for real runs)."""
    recompute: bool = False
    """Full activation recomputation of every transformer layer."""
    use_te: bool | None = None
    """Transformer-engine spec; None: when importable."""
    make_vocab_size_divisible_by: int = 128
    """The padded vocabulary is a multiple of this times tp (megatron's convention)."""


def _check_hf(hf_config: Any) -> None:
    mt = getattr(hf_config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model.path: model_type {mt!r} is not supported by the megatron backend ({SUPPORTED_MODEL_TYPES})"
        )
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"model.path: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("model.path: use_sliding_window=True is not supported by the megatron backend")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("model.path: mlp_bias=True is not supported by the megatron backend")


def rope_settings(hf_config: Any) -> tuple[float, float | None]:
    """(rope theta, llama3 scaling factor or None) from a transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) config. Scalings megatron's GPTModel cannot express raise ValueError."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {}) or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for k, want in fixed.items():
            if float(scaling.get(k, want)) != want:
                raise ValueError(f"model.path: rope_scaling.{k}={scaling[k]} (megatron's llama3 scaling fixes {want})")
        return float(theta), float(scaling["factor"])
    raise ValueError(f"model.path: rope scaling type {kind!r} is not supported by the megatron backend")


def transformer_config(
    hf_config: Any, parallel: ParallelConfig, opts: BuildOptions, arch: ArchInfo | None = None
) -> TransformerConfig:
    """The megatron TransformerConfig equivalent to a HF config under the given parallelism."""
    _check_hf(hf_config)
    arch = arch or arch_from_hf(hf_config)
    on_gpu = torch.cuda.is_available()
    use_te = te_available() if opts.use_te is None else opts.use_te
    kw: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=float(getattr(hf_config, "initializer_range", 0.02)),
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp if parallel.vpp > 1 else None,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        # Sequence parallelism with TE (megatron requires it for MoE + TP); torch's norms of the local spec reject
        # it. The backend pads packed micro-batches to a multiple of tp for it.
        sequence_parallel=use_te and parallel.tp > 1,
        params_dtype=opts.dtype,
        pipeline_dtype=opts.dtype,
        bf16=opts.dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        # The backend's loss shares are already normalised: no division by the number of micro-batches, and DDP
        # sums (not averages) over DP ranks. See backend.py for how the token scaling is disabled.
        calculate_per_token_loss=True,
        # The backend pads the packed micro-batches of a pipeline-parallel mini-batch to one length, so stages
        # exchange fixed shapes (seq_length = that length, micro_batch_size = 1).
        variable_seq_lengths=False,
        moe_token_dispatcher_type="alltoall",
        deallocate_pipeline_outputs=True,
        # gloo: batched isend/irecv can pair two same-direction messages of one peer in the wrong order (at pp=2
        # with vpp the previous and the next stage are the same rank), swapping activations and gradients; the
        # unbatched even/odd ordering is correct. NCCL keeps megatron's default.
        batch_p2p_comm=on_gpu,
    )
    if opts.recompute:
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if arch.num_experts:
        kw.update(
            num_moe_experts=arch.num_experts,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_router_topk=arch.moe_topk,
            moe_router_pre_softmax=not arch.moe_norm_topk,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=float(getattr(hf_config, "router_aux_loss_coef", 0.0)),
            moe_grouped_gemm=use_te and on_gpu,
            # fp32 router GEMM needs TE in megatron-core 0.16 (it names te_general_gemm unconditionally).
            moe_router_dtype="fp32" if use_te else None,
        )
    return TransformerConfig(**kw)


def _shim_moe_without_te() -> None:
    """megatron-core 0.16.1's router GEMM reads the module global `te_general_gemm`, which is only defined when
    transformer-engine imports; define it as None (its "no TE" value) so the plain torch path runs."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def layer_spec(config: TransformerConfig, use_te: bool) -> ModuleSpec:
    """Transformer-engine spec, or the local spec with `SDPACoreAttention`."""
    num_experts = config.num_moe_experts
    if num_experts and not use_te:
        _shim_moe_without_te()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=config.qk_layernorm
        )
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm, normalization="RMSNorm"
    )
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def build_model(
    hf_config: Any, parallel: ParallelConfig, opts: BuildOptions | None = None
) -> tuple[list[GPTModel], TransformerConfig, ArchInfo]:
    """This rank's model chunks (one per virtual pipeline stage), the TransformerConfig and the ArchInfo."""
    opts = opts or BuildOptions()
    use_te = te_available() if opts.use_te is None else opts.use_te
    arch = arch_from_hf(hf_config, make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by, tp=parallel.tp)
    arch.check_parallel(parallel.tp, parallel.pp, parallel.vpp, parallel.ep)
    config = transformer_config(hf_config, parallel, opts, arch)
    spec = layer_spec(config, use_te)
    theta, llama3_factor = rope_settings(hf_config)
    vpp = parallel.vpp if parallel.vpp > 1 else None
    chunks = []
    for v in range(parallel.vpp):
        vp_stage = v if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.padded_vocab_size,
            max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=theta,
            rope_scaling=llama3_factor is not None,
            rope_scaling_factor=llama3_factor or 8.0,
            vp_stage=vp_stage,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks, config, arch
