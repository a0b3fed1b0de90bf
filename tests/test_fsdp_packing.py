"""FSDP backend, packed rows (the default) against the right-padded layout on a tiny Qwen2 (GQA, tied embeddings):
same per-token log-probs, loss, metrics, gradient norm and optimizer update to fp32 precision, on micro-batches
with sequences of several lengths (1 and 2 tokens included). One process, CPU."""

from __future__ import annotations

import pytest
import torch

from engines.attention import HF_ATTENTION
from engines.fsdp.backend import FSDPBackend
from pipeline.algorithm.losses import make_loss_fn
from pipeline.contracts.backend import MicroBatch
from pipeline.testing.megatron import assert_same_update, micro_batches, save_tiny_hf, tiny_config

VOCAB = 200
# fp32 kernels differ in summation order: ~1e-6 on CPU; on CUDA (flex_attention vs SDPA's kernels) up to ~1e-5.
FP32_ATOL = 5e-5 if torch.cuda.is_available() else 2e-6
LAYOUTS = [[1, 17, 5], [2, 24], [9, 1, 1, 13]]  # rows of each micro-batch, right-padded to the longest


def _micro_batches(seed: int = 3) -> list[MicroBatch]:
    return micro_batches(LAYOUTS, VOCAB, torch.Generator().manual_seed(seed))


def _backend(model_dir: str, packing: bool, dtype: str = "float32") -> FSDPBackend:
    cfg = tiny_config()
    cfg.trainer.backend = "fsdp"
    cfg.model.dtype = dtype
    cfg.rollout.temperature = 0.7  # a temperature other than 1 reaches both layouts' heads alike
    backend = FSDPBackend(cfg, 0, 1, packing=packing)
    backend.setup(model_dir)
    return backend


def _weights(backend: FSDPBackend) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backend.named_hf_weights()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fsdp_pack") / "qwen2")
    save_tiny_hf(path, "qwen2", vocab_size=VOCAB, tie=True, seed=1)
    return path


def test_packed_is_the_default_and_uses_the_packed_kernel(model_dir):
    backend = _backend(model_dir, packing=True)
    assert backend.packing and backend.model.config._attn_implementation == HF_ATTENTION
    with pytest.raises(ValueError, match="dapo_cu_seqlens"):  # a packed model never silently runs unmasked rows
        backend.compute.model(input_ids=torch.ones(1, 4, dtype=torch.long, device=backend.device))


def test_packed_logprobs_equal_padded(model_dir, monkeypatch):
    mbs = _micro_batches()
    padded = _backend(model_dir, packing=False).forward_logprobs(mbs)
    packed_backend = _backend(model_dir, packing=True)
    packed = packed_backend.forward_logprobs(mbs)
    monkeypatch.setenv("DAPO_PACKED_ATTENTION", "flex")  # CUDA's kernel without TE, eager on CPU
    flex = packed_backend.forward_logprobs(mbs)
    for mb, a, b, c in zip(mbs, packed, padded, flex, strict=True):
        assert a.shape == mb.input_ids.shape
        assert (a[:, 0] == 0).all() and (a[mb.attention_mask == 0] == 0).all()
        real = mb.attention_mask.bool()  # the padded layout leaves values on its padding (no loss reads them)
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=FP32_ATOL)
        torch.testing.assert_close(c, a, rtol=0, atol=FP32_ATOL)
    assert sum(float(x[mb.attention_mask.bool()].sum()) for x, mb in zip(padded, mbs, strict=True)) < -10.0


def test_packed_training_step_equals_padded(model_dir):
    mbs = _micro_batches()
    results = {}
    for packing in (False, True):
        backend = _backend(model_dir, packing)
        loss_fn = make_loss_fn(backend.cfg.algorithm)
        before = _weights(backend)
        metrics = backend.train_minibatch(mbs, loss_fn)
        results[packing] = (metrics, before, _weights(backend), backend.cfg.trainer.lr)
    (m_pad, b_pad, a_pad, lr), (m_pack, b_pack, a_pack, _) = results[False], results[True]
    assert set(m_pack) == set(m_pad) and m_pad["grad_norm"] > 0
    for k, v in m_pad.items():
        assert m_pack[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert_same_update(b_pack, a_pack, b_pad, a_pad, lr)


def test_packed_row_holds_no_padding():
    from engines.packing import pack_micro_batch

    for mb in _micro_batches():
        pk = pack_micro_batch(mb, torch.device("cpu"))
        assert pk.input_ids.shape == (1, int(mb.attention_mask.sum()))
        assert pk.cu_seqlens.tolist() == [0, *mb.attention_mask.sum(1).cumsum(0).tolist()]


@pytest.mark.gpu
def test_bf16_packed_on_cuda_equals_padded(tmp_path):
    """bf16 compute on CUDA: the packed row runs the one-call kernel (TE / torch varlen) and gives the padded
    layout's log-probs and loss to bf16 precision. (Measured on one H200, torch 2.11 + transformers 5.17, with
    this model: identical log-probs, loss and gradient norm.)"""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from engines.attention import choose_implementation

    model_dir = str(tmp_path / "qwen2")
    save_tiny_hf(model_dir, "qwen2", vocab_size=VOCAB, tie=True, seed=1, hidden_size=256)  # head_dim 64

    assert choose_implementation(torch.device("cuda"), torch.bfloat16) in ("te", "varlen")
    mbs = _micro_batches()
    out = {}
    for packing in (False, True):
        backend = _backend(model_dir, packing, dtype="bfloat16")
        lps = backend.forward_logprobs(mbs)
        out[packing] = (lps, backend.train_minibatch(mbs, make_loss_fn(backend.cfg.algorithm)))
    for mb, a, b in zip(mbs, out[True][0], out[False][0], strict=True):
        real = mb.attention_mask.bool()
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=3e-2)
    for k in ("loss", "grad_norm"):
        assert out[True][1][k] == pytest.approx(out[False][1][k], rel=2e-2, abs=1e-3), k
