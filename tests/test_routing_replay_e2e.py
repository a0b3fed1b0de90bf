"""End to end with MoE rollout routing replay on CPU: a tiny Qwen3-MoE served by the CPU engine (routed experts on),
the megatron trainer replaying them, weight sync into the engine's fused experts, partial rollouts resumed across
the updates; the routing metrics reach the run's history."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_moe_run_with_routing_replay(tmp_path):
    from pipeline.config import ROUTED_EXPERTS_FLAG, load_config
    from pipeline.runtime.train import train
    from pipeline.testing.tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "moe", seed=0, model_type="qwen3_moe", max_position=512, init_std=0.02)
    cfg = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [
            f"model.path={model}",
            f"model.tokenizer={model}",
            "model.warm_start_steps=0",  # a random policy: every answer wrong, so no dynamic sampling
            "algorithm.dynamic_sampling=false",
            "algorithm.routing_replay=rollout",
            "trainer.backend=megatron",
            "trainer.total_steps=2",
            "trainer.batch_size=2",
            "rollout.n_samples_per_prompt=4",
            "rollout.max_new_tokens=16",
            "rollout.partial_rollout=resume",
            "algorithm.overlong.cache_len=4",
            "trainer.micro_batch_size=4",
            "weight_sync.checksum=true",  # the engine's fused experts hold exactly what the trainer sent
            f"logging.dir={tmp_path}",
            "logging.run_name=moe",
            "eval.every=0",
        ],
    )
    assert ROUTED_EXPERTS_FLAG in cfg.engine.extra_args
    result = train(cfg)
    assert result.steps == 2 and result.engine_versions == ["2"]
    first, second = result.history
    # Step 1 trains on samples of the weights the trainer holds: with replay its logprobs are the engine's.
    assert first["train/rollout/logprob_abs_diff"] < 1e-4 and first["train/rollout/kl_k3"] < 1e-6
    for m in result.history:
        assert 0 <= m["train/moe/routing_mismatch"] <= m["train/moe/routing_mismatch_tokens"] <= 1
        assert m["train/rollout/logprob_abs_diff_replay"] == m["train/rollout/logprob_abs_diff"]
        assert "train/rollout/logprob_abs_diff_noreplay" in m and m["train/grad_norm"] > 0
    assert result.accounting["balanced"] == 1
