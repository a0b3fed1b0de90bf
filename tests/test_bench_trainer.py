"""The trainer benchmark: its FLOP and parameter counts against hand-computed values and HF's models, and one run of
the tiny shape on CPU through both backends (finite figures, the same first loss from the same weights)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.bench_trainer import (
    SHAPES,
    Shape,
    device_peak_flops,
    format_table,
    hf_config,
    matmul_params,
    param_count,
    run,
    train_flops,
)


def test_flops_and_mfu_by_hand():
    s = Shape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10, tie=True)
    # per layer: q 8*8+8, k and v 8*4+4 each, o 8*8, MLP 3*8*16, two norms 8: 608; x2 + final norm 8 + embedding 80
    assert param_count(s) == 2 * 608 + 8 + 80 == 1304
    assert matmul_params(s) == 1304
    untied = Shape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10, tie=False)
    assert param_count(untied) == 1384 and matmul_params(untied) == 1304  # the input embedding is a lookup
    # 6 N tokens = 6 * 1304 * 8; attention 6 * layers * heads * head_dim * (3^2 + 5^2) = 6 * 2 * 2 * 4 * 34
    assert train_flops(s, [3, 5]) == 62592 + 3264
    assert device_peak_flops("NVIDIA H200") == 989e12 and device_peak_flops("cpu") is None


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_param_count_matches_hf(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(SHAPES[name]))
    assert sum(p.numel() for p in model.parameters()) == param_count(SHAPES[name])


def test_tiny_benchmark_on_cpu():
    r = run(quick=True, shape="tiny")
    assert r["shape"] == "tiny" and r["tokens"] > 0
    for b in ("megatron", "fsdp"):
        for k in ("train_tokens_per_s", "logprob_tokens_per_s", "logprob_over_train_ratio", "peak_mem_gib"):
            v = r[f"{b}_{k}"]
            assert math.isfinite(v) and v > 0, (b, k, v)
        assert (r[f"{b}_mfu"] is None) == (not torch.cuda.is_available())
        assert math.isfinite(r[f"{b}_first_loss"])
    # Same random weights, same batch, on policy: the backends' first losses agree (fp32 on CPU).
    assert abs(r["megatron_first_loss"] - r["fsdp_first_loss"]) <= 1e-3 * abs(r["fsdp_first_loss"]) + 1e-5
    table = format_table(r, ["megatron", "fsdp"])
    assert "| megatron |" in table and "| fsdp |" in table
