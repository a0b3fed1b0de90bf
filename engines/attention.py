"""Packed (THD) causal attention in one kernel call, shared by the megatron and FSDP trainer backends.

Contract:
- `packed_causal_attention(q, k, v, cu_seqlens, max_seqlen, scale) -> out`: q `(T, Hq, D)`, k/v `(T, Hkv, D)` with
  Hq a multiple of Hkv (GQA: each key/value head serves a contiguous block of Hq/Hkv query heads), sequences back
  to back at `cu_seqlens` (`(n + 1,)` int32, 0 first, T last; empty sequences allowed), each attending causally to
  itself only. Returns `(T, Hq, D)` in q's dtype. Differentiable in q, k and v; no dropout (RL fine-tuning).
- The implementation is chosen per call from the device and dtype, and each choice is logged once:
  * `te`: transformer-engine's fused THD attention, when TE is importable, on CUDA, in bf16/fp16;
  * `varlen`: torch's `torch.nn.attention.varlen.varlen_attn` (flash attention on packed rows), on CUDA in
    bf16/fp16 when the installed torch has it (2.10+; its keyword arguments differ between releases and are read
    from its signature);
  * `flex`: `flex_attention` with a document-causal `BlockMask`, compiled once on CUDA, eager on CPU. The block mask
    is built once per micro-batch and reused by every layer (cached on the identity of the `cu_seqlens` tensor,
    which both backends hand unchanged to every layer). On CUDA it is the fp32 path and the fallback;
  * `loop`: one causal `scaled_dot_product_attention` per sequence: the CPU path and the reference every other
    implementation is tested against (tests/test_packed_attention.py).
  `DAPO_PACKED_ATTENTION=te|varlen|flex|loop` forces one (an unavailable one raises).
- transformers: `register_hf_attention()` registers `hf_packed_attention` under `HF_ATTENTION` in its
  AttentionInterface (same API in transformers 5.17 and 5.25); a model loaded with that `attn_implementation` runs
  one packed row `(1, t)` with `dapo_cu_seqlens` (and `dapo_max_seqlen`) among its forward kwargs, which
  transformers hands to every attention call; it builds no attention mask for such an implementation.
- Context parallelism is not handled here: megatron's `SDPACoreAttention._forward_thd_cp` stays the CPU path for
  cp > 1, and on GPUs CP runs in transformer-engine.
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("te", "varlen", "flex", "loop")
_ENV = "DAPO_PACKED_ATTENTION"
_logged: set[tuple[str, str, torch.dtype]] = set()


# --------------------------------------------------------------------------------------------------- reference
def loop_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """One causal SDPA per sequence: the reference (and the CPU path). Shapes as `packed_causal_attention`."""
    rep = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, h, s, d)
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)[0].transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)


# --------------------------------------------------------------------------------------------------- flex
_FLEX_BLOCK = 128
_mask_cache: dict[str, Any] = {}
_compiled_flex: Callable | None = None


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) index of the sequence each position belongs to (positions past cu_seqlens[-1] get their own id)."""
    pos = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)


def document_causal_block_mask(cu_seqlens: torch.Tensor, total: int) -> Any:
    """The document-causal BlockMask of a packed row, cached on the cu_seqlens tensor object (one per micro-batch,
    reused by every layer)."""
    from torch.nn.attention.flex_attention import create_block_mask

    cached = _mask_cache.get("last")
    if cached is not None and cached[0]() is cu_seqlens and cached[1] == total:
        return cached[2]
    # The kernel works in blocks of 128 positions; the mask function may be evaluated past T in the last block, so
    # the ids cover a whole number of blocks (the extra positions form one more "document" nobody reads).
    padded = -(-total // _FLEX_BLOCK) * _FLEX_BLOCK
    doc = document_ids(cu_seqlens, padded)

    def mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    mask = create_block_mask(mask_mod, None, None, total, total, device=cu_seqlens.device)
    _mask_cache["last"] = (weakref.ref(cu_seqlens), total, mask)
    return mask


def flex_attention_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> torch.Tensor:
    """flex_attention over the whole row with the document-causal block mask (compiled on CUDA, eager on CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn: Callable = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    block_mask = document_causal_block_mask(cu_seqlens, q.shape[0])
    qb, kb, vb = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, h, T, d)
    out = fn(qb, kb, vb, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


# --------------------------------------------------------------------------------------------------- varlen
def _varlen_fn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """torch's varlen flash attention. Its signature changed between releases (2.10: `is_causal`, no scale; 2.11:
    keyword `scale` and `window_size=(-1, 0)` for causal; 2.12: also `enable_gqa`), so the keywords come from it.
    Flash attention takes fewer key/value heads natively (GQA); 2.12+ only wants to be told."""
    fn = _varlen_fn()
    assert fn is not None
    params = inspect.signature(fn).parameters
    kw: dict[str, Any] = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scale
    else:  # the kernel's default is 1/sqrt(D)
        q = q * (scale * q.shape[-1] ** 0.5)
    if "enable_gqa" in params and q.shape[1] != k.shape[1]:
        kw["enable_gqa"] = True
    # Flash attention needs a unit stride in the head dimension only (megatron's q/k/v are views of one QKV tensor).
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cu = cu_seqlens.to(torch.int32)
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kw)


# --------------------------------------------------------------------------------------------------- TE
_te_modules: dict[tuple, Any] = {}


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def te_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """transformer-engine's DotProductAttention in THD format (one module per head layout, no parameters)."""
    from transformer_engine.pytorch import DotProductAttention

    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    key = (hq, hkv, d, scale)
    if key not in _te_modules:
        _te_modules[key] = DotProductAttention(
            hq,
            d,
            num_gqa_groups=hkv,
            attention_dropout=0.0,
            qkv_format="thd",
            attn_mask_type="padding_causal",
            softmax_scale=scale,
        )
    cu = cu_seqlens.to(torch.int32)
    out = _te_modules[key](
        q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen
    )
    return out.reshape(q.shape[0], hq, d)


# --------------------------------------------------------------------------------------------------- choice
def choose_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """Which implementation runs for tensors of this device and dtype (see the module docstring)."""
    forced = os.environ.get(_ENV, "").strip()
    if forced:
        if forced not in IMPLEMENTATIONS:
            raise ValueError(f"{_ENV}={forced!r}: expected one of {IMPLEMENTATIONS}")
        return forced
    if device.type != "cuda":
        return "loop"
    half = dtype in (torch.bfloat16, torch.float16)
    if half and te_available():
        return "te"
    if half and _varlen_fn() is not None:
        return "varlen"
    return "flex"


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    scale: float | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence: q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D).

    `max_seqlen` (the longest sequence) is computed from `cu_seqlens` when not given (a device sync); `scale`
    defaults to 1/sqrt(D); `impl` overrides the automatic choice."""
    if q.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or q.shape[1] % k.shape[1]:
        raise ValueError(f"packed attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    impl = impl or choose_implementation(q.device, q.dtype)
    tag = (impl, q.device.type, q.dtype)
    if tag not in _logged:
        _logged.add(tag)
        log.info("packed attention: %s on %s in %s", impl, q.device.type, q.dtype)
    if impl == "loop":
        return loop_attention(q, k, v, cu_seqlens, scale)
    if impl == "flex":
        return flex_attention_packed(q, k, v, cu_seqlens, scale)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if impl == "varlen":
        if _varlen_fn() is None:
            raise RuntimeError(f"packed attention: torch {torch.__version__} has no torch.nn.attention.varlen")
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    if impl == "te":
        return te_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    raise ValueError(f"packed attention: unknown implementation {impl!r} (expected one of {IMPLEMENTATIONS})")


# --------------------------------------------------------------------------------------------------- transformers
HF_ATTENTION = "dapo_packed"
"""The name `register_hf_attention` gives the packed kernel in transformers' AttentionInterface."""


def hf_packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for one packed row: query (1, Hq, t, D), key/value (1, Hkv, t, D) ->
    ((1, t, Hq, D), None). The sequence bounds come through the model's forward kwargs as `dapo_cu_seqlens` (and
    optionally `dapo_max_seqlen`); the row needs no attention mask (transformers builds none for an implementation
    without a registered mask function)."""
    cu = kwargs.get("dapo_cu_seqlens")
    if cu is None:
        raise ValueError(f"attn_implementation={HF_ATTENTION!r} needs the forward kwarg dapo_cu_seqlens (packed rows)")
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError(f"{HF_ATTENTION}: one packed row without attention mask; got query {tuple(query.shape)}")
    if sliding_window is not None or dropout:
        raise ValueError(f"{HF_ATTENTION}: sliding-window attention and attention dropout are not supported")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (t, h, d)
    out = packed_causal_attention(q, k, v, cu, kwargs.get("dapo_max_seqlen"), scaling)
    return out.unsqueeze(0), None


def register_hf_attention() -> str:
    """Register the packed kernel with transformers (idempotent); returns the `attn_implementation` name."""
    from transformers import AttentionInterface

    AttentionInterface.register(HF_ATTENTION, hf_packed_attention)
    return HF_ATTENTION
