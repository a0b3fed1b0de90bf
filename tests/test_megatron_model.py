"""Megatron GPTModel built from a HF config gives the HF model's logits; the backend's packed (THD) forward gives
HF's per-token log-probs on a right-padded, variable-length batch, with the CPU loop and with flex_attention (the
packed kernel CUDA runs without TE). One gloo process."""

from __future__ import annotations

import os

import pytest
import torch

from engines.megatron.launch import init_dist, spawn
from pipeline.testing.megatron import random_micro_batches, save_tiny_hf, tiny_config


def _logits_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    init_dist(rank, world_size, port)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from transformers import AutoConfig

    from engines.megatron.backend import HFWeights, MegatronBackend, build_backend
    from engines.megatron.convert import hf_to_megatron
    from engines.megatron.cpu_compat import enable_cpu_compat
    from engines.megatron.model import build_model
    from pipeline.config import ParallelConfig

    enable_cpu_compat()
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1)
    results: dict[str, object] = {}
    ids = torch.randint(1, 200, (2, 33), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(33).expand(2, 33)
    for kind in ("qwen2", "qwen3", "llama", "qwen3_moe"):
        hf_dir = os.path.join(tmp, kind)
        ref = torch.load(os.path.join(hf_dir, "ref_logits.pt"))
        config = AutoConfig.from_pretrained(hf_dir)
        chunks, _, arch = build_model(config, ParallelConfig())
        chunks[0].load_state_dict(hf_to_megatron(HFWeights(hf_dir).get, arch), strict=True)
        chunks[0].eval()
        with torch.no_grad():
            out = chunks[0](input_ids=ids, position_ids=pos, attention_mask=None)
        results[kind] = (tuple(out.shape), (out[..., : arch.vocab_size] - ref).abs().max().item())
    ps.destroy_model_parallel()

    mbs = random_micro_batches(2, 3, 200, seed=5)
    backend = build_backend(tiny_config(), 0, 1)
    backend.setup(os.path.join(tmp, "qwen2"))
    results["logprobs"] = backend.forward_logprobs(mbs)
    os.environ["DAPO_PACKED_ATTENTION"] = "flex"  # the one-call kernel of CUDA without TE, run eagerly on CPU
    results["flex_logprobs"] = backend.forward_logprobs(mbs)
    del os.environ["DAPO_PACKED_ATTENTION"]
    padded = MegatronBackend(tiny_config(), 0, 1, packing=False)  # the unpacked (B, T) baseline layout
    padded.setup(os.path.join(tmp, "qwen2"))
    results["padded_logprobs"] = padded.forward_logprobs(mbs)
    torch.save(results, os.path.join(tmp, "results.pt"))


def _hf_logprobs(model: torch.nn.Module, mb) -> torch.Tensor:
    """Reference per-token log-probs, each row run alone without padding (aligned with input_ids)."""
    out = torch.zeros(mb.input_ids.shape)
    for b in range(mb.input_ids.shape[0]):
        n = int(mb.attention_mask[b].sum())
        ids = mb.input_ids[b : b + 1, :n]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        out[b, 1:n] = logp[0, :-1].gather(1, ids[0, 1:, None])[:, 0]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("mlogits"))
    ids = torch.randint(1, 200, (2, 33), generator=torch.Generator().manual_seed(0))
    models = {}
    for kind, tie in (("qwen2", True), ("qwen3", False), ("llama", False), ("qwen3_moe", False)):
        model = save_tiny_hf(os.path.join(tmp, kind), kind, vocab_size=200, tie=tie, seed=1)
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits.float(), os.path.join(tmp, kind, "ref_logits.pt"))
        models[kind] = model
    spawn(_logits_worker, 1, tmp, timeout_s=150)
    return torch.load(os.path.join(tmp, "results.pt")), models


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama", "qwen3_moe"])
def test_megatron_logits_equal_hf(run, kind):
    results, _ = run
    shape, maxdiff = results[kind]
    assert shape == (2, 33, 256)  # vocabulary 200 padded to a multiple of 128
    assert maxdiff < 1e-4


def test_packed_forward_logprobs_equal_hf(run):
    results, models = run
    mbs = random_micro_batches(2, 3, 200, seed=5)
    assert any((mb.attention_mask == 0).any() for mb in mbs)  # padding present: packing is exercised
    for mb, got, unpacked, flex in zip(
        mbs, results["logprobs"], results["padded_logprobs"], results["flex_logprobs"], strict=True
    ):
        want = _hf_logprobs(models["qwen2"], mb)
        assert (flex - want).abs().max().item() < 1e-4  # SDPACoreAttention's THD path through flex_attention
        assert (unpacked - want).abs().max().item() < 1e-4
        assert got.shape == mb.input_ids.shape
        assert (got[:, 0] == 0).all() and (got[mb.attention_mask == 0] == 0).all()
        assert (got - want).abs().max().item() < 1e-4
        assert want[mb.attention_mask.bool()].sum() < -1.0  # non-trivial values were compared
