"""Every YAML preset in configs/ loads and validates; the DAPO 32B preset carries the paper's recipe; the model-size
presets derive from a base and their layouts fit the plan's memory model."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.plan import check_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.rglob("*.yaml"))
MODEL_PRESETS = {  # preset -> GPU memory (GiB) it was planned for
    "qwen2.5-0.5b-1gpu.yaml": 80,
    "qwen2.5-1.5b-1gpu.yaml": 80,
    "qwen2.5-7b-8gpu.yaml": 80,
    "qwen3-30b-a3b-moe.yaml": 80,
    "dapo-qwen2.5-32b-128gpu.yaml": 96,  # the paper's H20s
    "debug/qwen2.5-0.5b-smoke.yaml": 80,
}


def test_the_expected_presets_exist():
    names = {str(p.relative_to(CONFIGS)) for p in ALL}
    assert {"tiny-cpu.yaml", "base/dapo.yaml", *MODEL_PRESETS} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_preset_loads(path):
    cfg = load_config(path)
    p = cfg.trainer.parallel
    assert p.tp * p.pp * p.cp * p.dp == cfg.trainer.world_size


def test_dapo_32b_recipe():
    cfg = load_config(CONFIGS / "dapo-qwen2.5-32b-128gpu.yaml")
    r, a, t = cfg.rollout, cfg.algorithm, cfg.trainer
    assert (t.batch_size, r.n_samples_per_prompt) == (512, 16)  # 512 prompts x 16 responses
    assert t.num_minibatches == 16 and t.batch_size // t.num_minibatches == 32  # 32-prompt mini-batches
    assert r.max_new_tokens == 20480 and cfg.data.max_prompt_tokens == 2048
    assert (a.overlong.soft_punish, a.overlong.cache_len, a.overlong.factor) == (True, 4096, 1.0)
    assert (t.lr, t.warmup_steps) == (1e-6, 20 * t.num_minibatches)  # 20 rollout steps of warm-up
    assert (t.weight_decay, t.grad_clip) == (0.1, 1.0)
    assert (a.eps_low, a.eps_high, a.loss_agg, a.dynamic_sampling) == (0.2, 0.28, "token-mean", True)
    assert a.kl_coef == 0.0 and a.entropy_coef == 0.0
    assert (r.temperature, r.top_p, r.top_k) == (1.0, 1.0, -1)
    assert cfg.eval.n_samples == 1  # AIME avg@32: the eval file holds each of the 30 problems 32 times
    gpus = t.world_size * t.gpus_per_rank + cfg.engine.num_engines * cfg.engine.gpus_per_engine
    assert gpus == 128


def test_base_holds_the_dapo_defaults():
    cfg = load_config(CONFIGS / "base" / "dapo.yaml")
    a = cfg.algorithm
    assert (a.eps_low, a.eps_high, a.loss_agg, a.dynamic_sampling, a.overlong.cache_len) == (
        0.2, 0.28, "token-mean", True, 4096)  # fmt: skip
    assert (cfg.trainer.lr, cfg.trainer.weight_decay, cfg.trainer.grad_clip) == (1e-6, 0.1, 1.0)
    assert cfg.rollout.n_samples_per_prompt == 16


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_model_presets_derive_from_a_base_and_fit(name):
    path = CONFIGS / name
    assert "\nbase: " in path.read_text()
    cfg = load_config(path)
    assert cfg.model.path and cfg.model.dtype == "bfloat16"
    t, e = cfg.trainer, cfg.engine
    assert t.max_tokens_per_micro_batch >= cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    if not name.startswith("debug/"):
        assert t.warmup_steps == 20 * t.num_minibatches  # the paper's 20 rollout steps, in optimizer steps
    gpus = t.world_size * t.gpus_per_rank + e.num_engines * e.gpus_per_engine
    if cfg.cluster.num_gpus:
        assert gpus == cfg.cluster.num_gpus
    f = check_config(cfg, gpu_mem=MODEL_PRESETS[name])
    assert f.ok, f.problems
