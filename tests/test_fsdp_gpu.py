"""GPU smoke test of the torch (FSDP) backend on one rank, no process group: bf16 compute on CUDA gives logprobs
close to the fp32 HF model's on CPU, and one training step is finite, moves the weights and keeps them on the GPU.
Skipped on CPU machines (marker gpu)."""

from __future__ import annotations

import pytest
import torch

from pipeline.algorithm.losses import make_loss_fn
from pipeline.config import Config
from pipeline.testing.megatron import random_micro_batches, save_tiny_hf

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_bf16_gpu_step(tmp_path):
    from engines.fsdp.backend import build_backend

    model = save_tiny_hf(str(tmp_path / "hf"), "qwen2", vocab_size=200, tie=True, seed=1)
    cfg = Config()
    cfg.data.train_path = "synthetic:arith"
    cfg.trainer.backend = "fsdp"
    cfg.trainer.world_size = 1
    cfg.trainer.lr, cfg.trainer.warmup_steps = 1e-3, 0
    cfg.model.dtype = "bfloat16"
    cfg.rollout.temperature = 1.0
    backend = build_backend(cfg, 0, 1)
    backend.setup(str(tmp_path / "hf"))
    assert all(p.is_cuda for p in backend.model.parameters())
    mbs = random_micro_batches(2, 3, 200, seed=5)
    lps = backend.forward_logprobs(mbs)
    for mb, got in zip(mbs, lps, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=mb.input_ids).logits.float(), dim=-1)
        want = torch.zeros_like(got)
        want[:, 1:] = logp[:, :-1].gather(2, mb.input_ids[:, 1:, None])[..., 0]
        mask = mb.attention_mask.bool()
        mask[:, 0] = False
        assert (got.float()[mask] - want[mask]).abs().max() < 0.1  # bf16 activations
    before = {n: p.detach().float().cpu().clone() for n, p in backend.model.named_parameters()}
    metrics = backend.train_minibatch(mbs, make_loss_fn(cfg.algorithm))
    assert 0 < metrics["grad_norm"] < 1e3 and torch.isfinite(torch.tensor(metrics["loss"]))
    moved = [n for n, p in backend.model.named_parameters() if not torch.equal(p.detach().float().cpu(), before[n])]
    assert len(moved) > len(before) // 2, moved  # lr 1e-3: the step reaches the weights
    assert all(p.is_cuda for p in backend.model.parameters())
    torch.cuda.synchronize()
