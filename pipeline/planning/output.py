"""What `dapo plan` prints and writes: the plan's tables, a config YAML derived from the model's preset, and the
check of an existing config.

Contract:
- `explain(plan)` -> the tables (memory per term of the worst and the last pipeline stage, engines, throughput
  with DAPO's generation demand, the weight sync and the idle fraction, notes).
- `validated_config(plan, model_path)` -> the `Config` the plan describes, through `pipeline.config.validate`
  (raises ConfigError / PlanError naming the problem); `write_config(plan, out)` writes it as YAML with `base:`
  the model's preset, and refuses a plan whose config does not validate.
- `check_config(cfg, gpu_mem)`: check_feasible() for a loaded Config (`dapo plan --check CONFIG`).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline.planning.memory import EngineSetup, Feasibility, Parallel, TrainSetup, check_feasible, setup_from_config
from pipeline.planning.models import ModelSpec, PlanError, _canonical, load_model
from pipeline.planning.plan import Plan
from pipeline.planning.throughput import DECODE_BW_EFF, TRAIN_MFU

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESET_FOR_MODEL = {
    "qwen2.5-0.5b": "qwen2.5-0.5b-1gpu.yaml",
    "qwen2.5-1.5b": "qwen2.5-1.5b-1gpu.yaml",
    "qwen2.5-7b": "qwen2.5-7b-8gpu.yaml",
    "qwen2.5-32b": "dapo-qwen2.5-32b-128gpu.yaml",
    "qwen3-30b-a3b": "qwen3-30b-a3b-moe.yaml",
}


def fmt_par(p: Parallel, t: TrainSetup) -> str:
    parts = [f"tp={p.tp} pp={p.pp} cp={p.cp}", f"ep={p.ep}" if p.ep > 1 else "", f"dp={p.dp}"]
    extra = ["full recompute" if t.recompute else "no recompute"]
    if t.optimizer_offload:
        extra.append("optimizer CPU offload")
    return f"{t.backend:8s} " + " ".join(x for x in parts if x) + ", " + ", ".join(extra)


_LABELS = {
    "weights": "weights (megatron: bf16 shard; fsdp: fp32 master shard)",
    "grads": "gradients (fp32)",
    "optimizer": "Adam m+v (+ fp32 master), sharded over dp",
    "fsdp_gather": "fsdp bf16 gathered layers + root + layer grads",
    "activations": "activations",
    "logits": "logits / logprob path",
    "runtime": "CUDA context, NCCL, cuBLAS",
    "fragmentation": "fragmentation",
    "total": "total",
}


def explain(plan: Plan) -> str:
    """The plan as readable tables."""
    m, b = plan.model, plan.feasibility.breakdown
    moe = f", MoE {m.num_experts} experts top-{m.experts_per_token}" if m.is_moe else ", dense"
    lines = [
        f"model    {m.name}: {m.total_params / 1e9:.2f}B params ({m.active_params / 1e9:.2f}B active{moe}), "
        f"{m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/{m.num_kv_heads} kv x {m.head_dim}, "
        f"vocab {m.vocab_size}",
        f"cluster  {plan.gpus} x {plan.gpu.name} ({plan.gpu_mem:g} GiB, {plan.gpu.tflops:g} TFLOP/s bf16, "
        f"{plan.gpu.bw_tbs:g} TB/s), placement {plan.placement}, sequence {plan.seq_len} tokens "
        f"(prompt <= {plan.prompt_len})",
        "",
        f"trainer  {plan.train_gpus} GPU(s): {fmt_par(plan.parallel, plan.train)}",
        f"         micro-batch {plan.train.mb_tokens} tokens per data-parallel rank",
        "  per-GPU memory, GiB                                    worst stage   last stage",
    ]
    for key, label in _LABELS.items():
        if f"train/{key}" in b:
            last = b.get(f"train_last/{key}", b[f"train/{key}"])
            label += " (full recompute)" if key == "activations" and plan.train.recompute else ""
            lines.append(f"    {label:52s} {b[f'train/{key}']:6.1f}       {last:6.1f}")
    kv_tok = m.kv_bytes_per_token(plan.engine.tp)
    release = "; released while training" if plan.placement == "time-shared" else ""
    lines += [
        "",
        f"engines  {plan.num_engines} x tp={plan.engine.tp} (mem_fraction {plan.engine.mem_fraction:g}{release})",
        f"    weights per GPU {b['engine/weights']:6.1f} GiB;  KV pool {b['engine/kv_pool']:6.1f} GiB;  "
        f"KV per token {kv_tok / 1024:.1f} KiB = {m.num_layers} layers x {math.ceil(m.num_kv_heads / plan.engine.tp)}"
        f" kv heads x {m.head_dim} x 2 (K,V) x 2 B",
        f"    running batch ~{plan.engine_batch} sequences per engine at the mean context",
        "",
        "throughput model (response tokens/s)",
        f"    generation {plan.gen_tokens_per_s:12,.0f}   (decode, memory-bound, {DECODE_BW_EFF:.0%} of HBM bandwidth)",
        f"    demand     {plan.demand:12.2f}   generated per trained token (dynamic sampling keep rate, "
        "over-admission)",
        f"    useful gen {plan.useful_gen_tokens_per_s:12,.0f}",
        f"    training   {plan.train_tokens_per_s:12,.0f}   ({TRAIN_MFU:.0%} MFU)",
        f"    weight sync {plan.sync_s:11.1f} s per step ({plan.step_tokens:,.0f} response tokens per step)",
        f"    pipeline   {plan.pipeline_tokens_per_s:12,.0f}"
        + (
            f"   {plan.idle_side} GPUs idle {plan.idle_fraction:.0%} of the time"
            if plan.placement == "disaggregated"
            else ""
        ),
        f"peak per GPU {plan.feasibility.peak_gb:.1f} / {plan.gpu_mem:g} GiB: "
        + ("fits" if plan.feasibility.ok else "; ".join(plan.feasibility.problems)),
    ]
    if plan.alternatives:
        lines += ["", "next-best trainer layouts (modelled speed relative to the chosen one)"]
        lines += [f"    {s:.3f}  {fmt_par(p, t)}" for s, p, t, _ in plan.alternatives]
    notes = list(plan.notes)
    if plan.config_error:
        notes.append(f"not writable as a config yet: {plan.config_error}")
    if notes:
        lines += ["", "notes"] + [f"    - {n}" for n in notes]
    return "\n".join(lines)


def preset_for(m: ModelSpec) -> Path:
    """The preset a generated config derives from: the model's own, or the DAPO base."""
    own = CONFIGS / PRESET_FOR_MODEL.get(_canonical(m.name), "base/dapo.yaml")
    return own if own.is_file() else CONFIGS / "base" / "dapo.yaml"


def config_overrides(plan: Plan, model_path: str, base_max_new: int = 0) -> dict[str, Any]:
    """The config sections the plan sets (everything else comes from the base preset)."""
    p, t, e = plan.parallel, plan.train, plan.engine
    shared = plan.placement != "disaggregated"
    max_new = plan.seq_len - plan.prompt_len
    running = max(plan.engine_batch, 1)
    spans = shared and e.tp > 1  # colocated engines of tp GPUs, each on the GPUs of tp trainer ranks of one node
    engine_share = float(e.tp) if spans or not shared else 0.5
    out: dict[str, Any] = {
        "model": {"path": model_path, "tokenizer": model_path, "dtype": "bfloat16"},
        "data": {"max_prompt_tokens": plan.prompt_len},
        "rollout": {"max_new_tokens": max_new, "max_inflight_per_engine": running},
        "engine": {
            "backend": "sglang",
            "num_engines": plan.num_engines,
            "tp": e.tp,
            "gpus_per_engine": engine_share,
            "mem_fraction": e.mem_fraction,
            "max_running_requests": running,
        },
        "trainer": {
            "backend": t.backend,
            "world_size": plan.train_gpus,
            "gpus_per_rank": 0.5 if shared and not spans else 1.0,
            "parallel": {"tp": p.tp, "pp": p.pp, "vpp": 1, "cp": p.cp, "ep": p.ep, "etp": p.etp, "dp": p.dp},
            "recompute": t.recompute,
            "distributed_optimizer": t.distributed_optimizer,
            "micro_batch_size": 1,
            "max_tokens_per_micro_batch": t.mb_tokens,
        },
        "weight_sync": {"mode": "colocated" if shared else "disaggregated"},
        "cluster": {"address": "local" if plan.gpus <= 8 else "auto", "num_gpus": plan.gpus if plan.gpus <= 8 else 0},
    }
    if spans and plan.gpus_per_node:
        out["cluster"]["gpus_per_node"] = min(plan.gpus_per_node, plan.gpus)
    if plan.placement == "time-shared":
        out["weight_sync"]["release_memory"] = ["kv_cache", "weights", "cuda_graph"]
        out["weight_sync"]["every"] = 1
    if max_new != base_max_new:  # keep DAPO's L_cache / L_max = 4096 / 20480 when the length changes
        out["algorithm"] = {"overlong": {"cache_len": min(4096, max_new // 5)}}
    return out


def _yaml_text(plan: Plan, out_dir: Path, model_path: str) -> str:
    from omegaconf import OmegaConf

    from pipeline.config import load_config

    base = preset_for(plan.model)
    inside = out_dir.resolve().is_relative_to(CONFIGS.parent)
    rel = os.path.relpath(base, out_dir) if inside else str(base)  # relative inside the repo, else absolute
    base_max_new = load_config(base).rollout.max_new_tokens
    path = model_path or f"/models/{plan.model.name}"
    header = ["# Generated by `dapo plan`. The numbers behind it:", "#"]
    header += [f"# {line}".rstrip() for line in explain(plan).splitlines()]
    if plan.train.optimizer_offload:
        header.append("# NOTE: this layout needs optimizer CPU offload, which trainer.* cannot express yet.")
    if plan.placement == "space-shared" and plan.gpus > 1:
        header.append("# NOTE: colocated: each GPU holds one trainer rank and one engine (0.5 + 0.5 GPU).")
    if plan.placement == "time-shared" and plan.engine.tp > 1:
        header.append(
            f"# NOTE: colocated: engine j serves with tp={plan.engine.tp} on the GPUs of trainer ranks "
            f"j*{plan.engine.tp}..j*{plan.engine.tp}+{plan.engine.tp - 1} (one node); its memory is released while "
            "the trainer trains."
        )
    body = OmegaConf.to_yaml(OmegaConf.create(config_overrides(plan, path, base_max_new)))
    return "\n".join(header) + f"\nbase: {rel}\n" + body


def validated_config(plan: Plan, model_path: str = "") -> Any:
    """The Config the plan describes, validated (ConfigError / PlanError otherwise)."""
    from pipeline.config import load_config

    if plan.train.optimizer_offload:
        raise PlanError("optimizer CPU offload: the trainers here cannot offload their optimizer state")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "plan.yaml"
        path.write_text(_yaml_text(plan, Path(d), model_path))
        return load_config(path)


def write_config(plan: Plan, out: str | os.PathLike, model_path: str = "") -> Path:
    """Write the plan as a YAML preset derived from the model's preset; check it with load_config."""
    from pipeline.config import ConfigError, load_config

    out = Path(out).resolve()
    if plan.config_error:
        raise PlanError(f"this layout cannot be written as a config that validates: {plan.config_error}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_yaml_text(plan, out.parent, model_path))
    try:
        load_config(out)
    except ConfigError as e:
        raise PlanError(f"the generated config {out} does not validate: {e}") from None
    return out


def check_config(cfg: Any, gpu_mem: float = 80.0, model: str | ModelSpec | None = None) -> Feasibility:
    """check_feasible() for a loaded Config: the model from model.path (a checkpoint, or its basename as a known
    name, so placeholder paths work), placement from weight_sync, sizes from rollout/data/trainer."""
    e = cfg.engine
    m = load_model(model or (cfg.model.path if Path(cfg.model.path).exists() else Path(cfg.model.path).name))
    par, setup = setup_from_config(cfg)
    seq_len = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    engine = EngineSetup(tp=e.tp, mem_fraction=e.mem_fraction)
    n = cfg.trainer.world_size
    if cfg.weight_sync.mode == "colocated":
        placement = "time-shared" if cfg.weight_sync.release_memory else "space-shared"
        return check_feasible(m, par, n, gpu_mem, seq_len, train=setup, engine=engine, placement=placement)
    gpus = n + e.num_engines * e.tp
    return check_feasible(m, par, gpus, gpu_mem, seq_len, train=setup, engine=engine, train_gpus=n)


def explain_difference(plan: Plan, parallel: Parallel, train: TrainSetup, engine: EngineSetup, placement: str) -> str:
    """Why the plan differs from a published layout for the same model and GPUs ('' when it is the same)."""
    reasons = []
    if train.optimizer_offload and not plan.train.optimizer_offload:
        reasons.append("the published layout offloads the optimizer state to CPU, which this project's trainers "
                       "cannot; without it that layout does not fit")  # fmt: skip
    if train.ulysses:
        reasons.append(f"the published layout splits sequences over cp={parallel.cp} inside FSDP (Ulysses); this "
                       "project's FSDP backend is data parallel only")  # fmt: skip
    if train.backend == "megatron" and parallel.cp > 1 and not plan.train.te:
        reasons.append(f"context parallelism (cp={parallel.cp}) needs transformer-engine, which is not installed")
    if train.offload_in_gen and placement == "time-shared":
        reasons.append("the published trainer leaves the GPU while the engines generate; here it stays resident, "
                       "so the engines get what its states leave")  # fmt: skip
    if placement != plan.placement:
        reasons.append(f"placement {plan.placement} instead of {placement}")
    if (engine.tp, parallel) != (plan.engine.tp, plan.parallel) or train.backend != plan.train.backend:
        reasons.append(
            f"trainer {fmt_par(plan.parallel, plan.train).strip()} and engines of tp={plan.engine.tp} instead of "
            f"{fmt_par(parallel, train).strip()} and tp={engine.tp}: the best modelled throughput "
            f"({plan.pipeline_tokens_per_s:,.0f} response tokens/s) among the layouts that fit here"
        )
    if plan.config_error:
        reasons.append(f"not writable as a config yet: {plan.config_error}")
    return "; ".join(reasons)
