"""`dapo ablate`: DAPO's components switched on one at a time, over seeds, as a table shaped like the paper's Table 1.

Contract:
- `VARIANTS` is cumulative, in the paper's order: a GRPO baseline (symmetric clip eps_high = eps_low, no overlong
  shaping, sequence-mean loss, no dynamic sampling), then + Clip-Higher, + soft overlong punishment, + token-level
  loss, + dynamic sampling (= DAPO). Each row's overrides apply on top of the previous row's.
- `ablate(cfg_path, overrides, seeds, steps)` runs every variant for every seed through the full pipeline
  (`pipeline.runtime.train.train`, `trainer.seed` = the seed), each with the exact evaluations before the first step and
  after the last (`eval.every = steps`), and returns one record per run:
  {variant, seed, acc_before, acc_after, pass_after, seconds, run_dir}. The warm start is shared (cached).
- `table(records)` renders Markdown: per variant the final avg@k mean and spread (sample std) over seeds, the
  gain over the warm start, and the runs behind it. Whatever ordering comes out is what is printed.
- `ablate_main(argv)`: `dapo ablate CONFIG [--seeds 0,1,2] [--steps N] [key=value ...]`; writes ablation.json and
  ablation.md into logging.dir/ablation-<time>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    (
        "GRPO baseline",
        {
            "algorithm.eps_high": 0.2,
            "algorithm.overlong.soft_punish": False,
            "algorithm.loss_agg": "seq-mean-token-mean",
            "algorithm.dynamic_sampling": False,
        },
    ),
    ("+ Clip-Higher", {"algorithm.eps_high": 0.28}),
    ("+ Soft overlong punishment", {"algorithm.overlong.soft_punish": True}),
    ("+ Token-level loss", {"algorithm.loss_agg": "token-mean"}),
    ("+ Dynamic sampling (DAPO)", {"algorithm.dynamic_sampling": True}),
]


def variant_overrides(index: int) -> list[str]:
    """Dotlist overrides of variant `index` (cumulative over the rows before it)."""
    merged: dict[str, Any] = {}
    for _, step in VARIANTS[: index + 1]:
        merged.update(step)
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items()]


def ablate(cfg_path: str, overrides: list[str], seeds: list[int], steps: int, out_dir: Path) -> list[dict[str, Any]]:
    from pipeline.config import load_config
    from pipeline.runtime.train import train

    records = []
    for i, (name, _) in enumerate(VARIANTS):
        for seed in seeds:
            run_name = f"v{i}-seed{seed}"
            cfg = load_config(
                cfg_path,
                [
                    *overrides,
                    *variant_overrides(i),
                    f"trainer.seed={seed}",
                    f"trainer.total_steps={steps}",
                    f"eval.every={steps}",
                    "eval.before_train=true",
                    f"logging.dir={out_dir}",
                    f"logging.run_name={run_name}",
                ],
            )
            t0 = time.perf_counter()
            result = train(cfg)
            first, last = result.evals[0], result.evals[-1]
            rec = {
                "variant": name,
                "seed": seed,
                "acc_before": first.get("eval/acc", float("nan")),
                "acc_after": last.get("eval/acc", float("nan")),
                "pass_after": last.get("eval/pass", float("nan")),
                "seconds": time.perf_counter() - t0,
                "run_dir": result.run_dir,
            }
            print(
                f"ablate: {name} seed {seed}: avg@k {rec['acc_before']:.3f} -> {rec['acc_after']:.3f} "
                f"({rec['seconds']:.0f}s)",
                flush=True,
            )
            records.append(rec)
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | final avg@k (mean ± std) | gain over warm start | seeds |",
        "|---|---|---|---|",
    ]
    for name, _ in VARIANTS:
        rows = [r for r in records if r["variant"] == name]
        if not rows:
            continue
        after = [r["acc_after"] for r in rows]
        gain = [r["acc_after"] - r["acc_before"] for r in rows]
        spread = statistics.stdev(after) if len(after) > 1 else 0.0
        lines.append(
            f"| {name} | {statistics.mean(after):.3f} ± {spread:.3f} | {statistics.mean(gain):+.3f} | {len(rows)} |"
        )
    return "\n".join(lines)


def ablate_main(argv: list[str]) -> int:
    from pipeline.config import ConfigError, load_config
    from pipeline.runtime.metrics import setup_logging

    p = argparse.ArgumentParser(prog="dapo ablate", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", help="YAML preset, e.g. configs/tiny-cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated trainer seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=100, help="trainer steps per run (default 100)")
    args = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"dapo ablate: --seeds must be comma-separated integers; got {args.seeds!r}")
        return 2
    if not seeds or args.steps < 1:
        print("dapo ablate: needs at least one seed and --steps >= 1")
        return 2
    try:
        base = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"dapo: config error: {e}")
        return 2
    if not base.data.eval_path:
        print("dapo ablate: data.eval_path is empty; the ablation compares held-out accuracy")
        return 2
    setup_logging(base.logging.level)
    out_dir = Path(base.logging.dir) / time.strftime("ablation-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    records = ablate(args.config, args.overrides, seeds, args.steps, out_dir)
    md = table(records)
    (out_dir / "ablation.json").write_text(json.dumps(records, indent=2) + "\n")
    (out_dir / "ablation.md").write_text(md + "\n")
    print(md)
    print(f"written: {out_dir / 'ablation.md'}")
    return 0
