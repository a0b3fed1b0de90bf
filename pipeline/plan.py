"""`dapo plan`: a memory and throughput model that proposes parallelism for a model and a GPU count.

Contract (the model lives in pipeline/planning/: models.py, memory.py, throughput.py, search.py, output.py; this
module is the CLI and re-exports their public API):
- `load_model(name_or_path)` -> ModelSpec (HF config.json, checkpoint dir, or a known name); architectures the
  planner cannot size (MLA, sliding windows, unknown model_type) raise PlanError naming what is missing.
- `check_feasible(model, parallel, gpus, gpu_mem, seq_len, ...)` -> `Feasibility(ok, peak_gb, breakdown, problems)`.
- `trainer_peak_memory(hf_config, cfg, tokens_per_micro_batch)` -> bytes per term and total of one trainer rank.
- `propose(model, gpus, ...)` -> `Plan` (disaggregated, or colocated: space-shared or time-shared with multi-GPU
  engines); `PlanError` when nothing fits.
- `check_config(cfg, gpu_mem)`: check_feasible() for a loaded Config (`dapo plan --check CONFIG`).
- `plan_main(argv)` is the CLI: prints the tables and writes a config YAML (derived with `base:` from the preset of
  that model size) that `load_config` accepts; exit 2 on a bad request or a layout that does not validate.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from pipeline.planning.memory import (
    LOGIT_BYTES_CHUNK,
    LOGIT_BYTES_FULL,
    PLACEMENTS,
    EngineSetup,
    Feasibility,
    Parallel,
    TrainSetup,
    check_feasible,
    engine_memory,
    layer_activation_bytes,
    train_memory,
    train_memory_bytes,
    trainer_peak_memory,
)
from pipeline.planning.models import (
    GPU,
    GPUS,
    KNOWN_MODELS,
    GiB,
    ModelSpec,
    PlanError,
    load_model,
    model_from_hf_config,
)
from pipeline.planning.output import (
    check_config,
    config_overrides,
    explain,
    explain_difference,
    preset_for,
    validated_config,
    write_config,
)
from pipeline.planning.search import Plan, propose
from pipeline.planning.throughput import (
    DEFAULT_KEEP_RATE,
    decode_tail_efficiency,
    decode_tokens_per_s,
    generation_demand,
    train_efficiency,
    train_flops_per_token,
    weight_sync_seconds,
)

__all__ = [
    "GPU", "GPUS", "KNOWN_MODELS", "LOGIT_BYTES_CHUNK", "LOGIT_BYTES_FULL", "PLACEMENTS", "EngineSetup",
    "Feasibility", "GiB", "ModelSpec", "Parallel", "Plan", "PlanError", "TrainSetup", "check_config",
    "check_feasible", "config_overrides", "decode_tail_efficiency", "decode_tokens_per_s", "engine_memory",
    "explain", "explain_difference", "generation_demand", "layer_activation_bytes", "load_model", "model_from_hf_config", "plan_main",
    "preset_for", "propose", "train_efficiency", "train_flops_per_token", "train_memory", "train_memory_bytes",
    "trainer_peak_memory", "validated_config", "weight_sync_seconds", "write_config",
]  # fmt: skip


def _base_settings(m: ModelSpec) -> tuple[int, int, int, float, int]:
    """(prompt tokens, response tokens, samples per mini-batch, over-admission, staleness) of the preset the config
    will derive from."""
    from pipeline.config import load_config

    cfg = load_config(preset_for(m))
    samples = cfg.trainer.batch_size * cfg.rollout.n_samples_per_prompt // cfg.trainer.num_minibatches
    r = cfg.rollout
    return cfg.data.max_prompt_tokens, r.max_new_tokens, samples, r.over_admission, r.max_staleness


def plan_main(argv: list[str]) -> int:
    """`dapo plan --model M --gpus N [...]`: print the plan, optionally write a config; 2 on a bad request."""
    from pipeline.config import ConfigError

    ap = argparse.ArgumentParser(prog="dapo plan", description="Propose parallelism for a model and a GPU count.")
    ap.add_argument("--model", help="HF config.json, checkpoint dir, or a known name (Qwen2.5-7B)")
    ap.add_argument("--gpus", type=int, help="total GPUs")
    ap.add_argument("--check", default="", help="instead: check an existing config YAML's layout against --gpu-mem")
    ap.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default: that of --gpu)")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="GPU type (FLOP/s, bandwidth)")
    ap.add_argument("--seq-len", type=int, default=0, help="prompt + response tokens (default: the preset's)")
    ap.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (default: the preset's)")
    ap.add_argument("--mode", default="disaggregated", choices=["colocated", "disaggregated"])
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs of a node: the largest tp group")
    ap.add_argument("--keep-rate", type=float, default=DEFAULT_KEEP_RATE,
                    help="expected share of groups dynamic sampling keeps")  # fmt: skip
    ap.add_argument("--allow-offload", action="store_true", help="consider optimizer CPU offload")
    ap.add_argument("--model-path", default="", help="model.path written to the config (default /models/<name>)")
    ap.add_argument("--out", default="", help="write a config YAML here")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of tables")
    args = ap.parse_args(argv)
    if args.check:
        return _check_main(args.check, args.gpu_mem or GPUS[args.gpu].mem_gb, args.model)
    if not args.model or not args.gpus:
        ap.error("--model and --gpus are required (or --check CONFIG)")
    try:
        m = load_model(args.model)
        base_prompt, base_resp, samples, over, stale = _base_settings(m)
        seq_len = args.seq_len or base_prompt + base_resp
        prompt_len = args.prompt_len or min(base_prompt, seq_len // 2)
        plan = propose(m, args.gpus, args.gpu_mem, seq_len, mode=args.mode, gpu=args.gpu, prompt_len=prompt_len,
                       samples_per_minibatch=samples, gpus_per_node=args.gpus_per_node,
                       allow_offload=args.allow_offload, keep_rate=args.keep_rate, over_admission=over,
                       staleness=stale)  # fmt: skip
        print(json.dumps(_plan_dict(plan), indent=2) if args.json else explain(plan))
        if args.out:
            path = write_config(plan, args.out, args.model_path)
            print(f"\nwrote {path}", file=sys.stderr if args.json else sys.stdout)
    except (PlanError, ConfigError, ValueError) as e:
        print(f"dapo plan: {e}", file=sys.stderr)
        return 2
    return 0


def _check_main(path: str, gpu_mem: float, model: str | None) -> int:
    from pipeline.config import ConfigError, load_config

    try:
        f = check_config(load_config(path), gpu_mem, model)
    except (PlanError, ConfigError) as e:
        print(f"dapo plan: {e}", file=sys.stderr)
        return 2
    for key, gb in f.breakdown.items():
        print(f"  {key:28s} {gb:8.1f} GiB")
    print(f"peak per GPU {f.peak_gb:.1f} / {gpu_mem:g} GiB: " + ("fits" if f.ok else "; ".join(f.problems)))
    return 0 if f.ok else 1


def _plan_dict(plan: Plan) -> dict[str, Any]:
    return {
        "model": plan.model.name,
        "placement": plan.placement,
        "train_gpus": plan.train_gpus,
        "parallel": asdict(plan.parallel),
        "train": asdict(plan.train),
        "engine": asdict(plan.engine),
        "num_engines": plan.num_engines,
        "peak_gb": round(plan.feasibility.peak_gb, 2),
        "breakdown_gb": {k: round(v, 2) for k, v in plan.feasibility.breakdown.items()},
        "gen_tokens_per_s": round(plan.gen_tokens_per_s),
        "useful_gen_tokens_per_s": round(plan.useful_gen_tokens_per_s),
        "train_tokens_per_s": round(plan.train_tokens_per_s),
        "pipeline_tokens_per_s": round(plan.pipeline_tokens_per_s),
        "idle_fraction": round(plan.idle_fraction, 3),
        "idle_side": plan.idle_side if plan.placement == "disaggregated" else "",
        "weight_sync_s": round(plan.sync_s, 2),
        "notes": plan.notes,
        "config_error": plan.config_error,
    }
