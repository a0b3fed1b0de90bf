"""engines/attention.py: every packed-attention implementation equals the per-sequence loop reference.

CPU: the loop against dense masked attention computed by hand (forward and backward), flex_attention (eager; torch
has no flex backward on CPU) against the loop, the block-mask cache, the implementation choice. GPU (`-m gpu`):
varlen / flex / TE against the loop in fp32 on the same device, forward and backward, fp32 and bf16 tolerances.
"""

from __future__ import annotations

import pytest
import torch

from engines import attention
from engines.attention import choose_implementation, document_causal_block_mask, packed_causal_attention

LAYOUTS = [
    [7],
    [1, 1, 1],
    [5, 1, 130, 0, 7, 1],  # length-1 and empty sequences, one longer than a 128-position block
    [64, 64, 3, 200],
]


def _packed(lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    t = int(cu[-1])
    q, k, v = (torch.randn(t, h, d, generator=g).to(device, dtype) for h in (hq, hkv, hkv))
    return q, k, v, cu


def _dense_reference(q, k, v, cu, scale):
    """Attention over the whole row with an explicit (T, T) same-sequence-and-causal mask, in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    t = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    pos = torch.arange(t)
    allowed = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("lens", LAYOUTS)
def test_loop_reference_equals_dense_masked_attention(lens):
    q, k, v, cu = _packed(lens, hq=4, hkv=2, d=8, dtype=torch.float64)
    for x in (q, k, v):
        x.requires_grad_(True)
    scale = 0.3
    out = packed_causal_attention(q, k, v, cu, scale=scale, impl="loop")
    ref = _dense_reference(q, k, v, cu, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lens", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flex_equals_loop_on_cpu(lens, dtype):
    q, k, v, cu = _packed(lens, hq=6, hkv=2, d=16, dtype=dtype)
    with torch.no_grad():
        ref = packed_causal_attention(q, k, v, cu, impl="loop")
        out = packed_causal_attention(q, k, v, cu, impl="flex")
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_block_mask_is_built_once_per_cu_seqlens():
    _, _, _, cu = _packed([3, 9], 2, 2, 4, torch.float32)
    m1 = document_causal_block_mask(cu, 12)
    assert document_causal_block_mask(cu, 12) is m1  # every layer of the micro-batch reuses it
    assert document_causal_block_mask(cu.clone(), 12) is not m1  # the next micro-batch gets its own


def test_choice_on_cpu_and_forced(monkeypatch):
    monkeypatch.delenv("DAPO_PACKED_ATTENTION", raising=False)
    assert choose_implementation(torch.device("cpu"), torch.float32) == "loop"
    monkeypatch.setenv("DAPO_PACKED_ATTENTION", "flex")
    assert choose_implementation(torch.device("cpu"), torch.float32) == "flex"
    monkeypatch.setenv("DAPO_PACKED_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="DAPO_PACKED_ATTENTION"):
        choose_implementation(torch.device("cpu"), torch.float32)


def test_bad_shapes_raise():
    q, k, v, cu = _packed([4], 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="packed attention"):
        packed_causal_attention(q, k, v, cu)


# --------------------------------------------------------------------------------------------------- GPU
def _cuda_impls() -> list[str]:
    impls = ["flex"]
    if attention._varlen_fn() is not None:
        impls.append("varlen")
    if attention.te_available():
        impls.append("te")
    return impls


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [[5, 1, 130, 0, 7, 1], [1000, 24, 1, 2071, 513]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_equal_loop(lens, dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    for impl in _cuda_impls():
        if impl in ("varlen", "te") and dtype == torch.float32:
            continue  # flash / fused kernels are half-precision only
        q, k, v, cu = _packed(lens, hq=12, hkv=2, d=128, dtype=dtype, device="cuda")
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
        # Reference: the loop in fp32 on the same inputs.
        ref_in = [x.float().requires_grad_(True) for x in (q, k, v)]
        ref = packed_causal_attention(*ref_in, cu, impl="loop")
        ref_grads = torch.autograd.grad(ref, ref_in, grad_out.float())
        test_in = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = packed_causal_attention(*test_in, cu, impl=impl)
        grads = torch.autograd.grad(out, test_in, grad_out)
        assert out.dtype == dtype and out.shape == q.shape
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.float(), ref, **tol, msg=f"{impl} forward")
        for name, a, b in zip("qkv", grads, ref_grads, strict=True):
            # Gradients of k/v sum over many queries: compare relative to their scale.
            scale = b.abs().max().clamp_min(1.0)
            torch.testing.assert_close(a.float() / scale, b / scale, **tol, msg=f"{impl} d{name}")


@pytest.mark.gpu
def test_cuda_bf16_uses_one_kernel_implementation():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    want = "te" if attention.te_available() else ("varlen" if attention._varlen_fn() is not None else "flex")
    assert choose_implementation(torch.device("cuda"), torch.bfloat16) == want
    assert choose_implementation(torch.device("cuda"), torch.float32) == "flex"
