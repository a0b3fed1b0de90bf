"""`dapo bench`: run the benchmark suite and write a JSON and a Markdown table of figures and ratios.

Each benchmark module exposes `run(quick: bool, **options) -> dict` (options: `--trainer-shape` for the trainer
benchmark); a result's keys ending in `ratio` are the headline
ratios against a baseline measured in the same run. A benchmark that fails is reported as failed, the suite
goes on. The machine (CPU model, cores, GPU if any, torch version) is recorded with the results.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Any

SUITE = (
    ("engine", "benchmarks.bench_engine", "local engine vs HF generate (tokens/s)"),
    ("transport", "benchmarks.bench_transport", "transport+buffer vs raw ZMQ (bytes/s)"),
    ("pipeline", "benchmarks.bench_pipeline", "async pipeline step time vs ideal and vs synchronous"),
    ("weight_sync", "benchmarks.bench_weight_sync", "bucketed pipelined broadcast vs one flat broadcast"),
    ("loss", "benchmarks.bench_loss", "vectorised DAPO loss+backward vs per-sample loop"),
    ("megatron", "benchmarks.bench_megatron", "trainer tokens/s (megatron backend)"),
    ("trainer", "benchmarks.bench_trainer", "both trainer backends: tokens/s, MFU, peak memory, logprob forward"),
    ("routing_replay", "benchmarks.bench_routing_replay", "MoE trainer-vs-engine KL without vs with routing replay"),
)


def describe_machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_suite(names: list[str] | None, quick: bool, options: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": describe_machine(), "quick": quick, "benchmarks": {}}
    for name, module, what in SUITE:
        if names and name not in names:
            continue
        t0 = time.perf_counter()
        try:
            out = importlib.import_module(module).run(quick=quick, **(options or {}).get(name, {}))
            entry = {"what": what, "status": "ok", "result": out}
        except ModuleNotFoundError as e:
            entry = {"what": what, "status": "missing", "error": str(e)}
        except Exception as e:  # one failing benchmark must not hide the others
            entry = {"what": what, "status": "failed", "error": repr(e), "trace": traceback.format_exc(limit=5)}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results["benchmarks"][name] = entry
        print(f"[bench] {name}: {entry['status']} ({entry['seconds']}s)", flush=True)
    return results


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def to_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# Benchmarks ({'quick' if results['quick'] else 'full'})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}, torch {m['torch']}, Python {m['python']}",
        "",
        "| benchmark | what | status | headline ratios | other figures |",
        "|---|---|---|---|---|",
    ]
    for name, entry in results["benchmarks"].items():
        res = entry.get("result") or {}
        flat = {k: v for k, v in res.items() if isinstance(v, int | float | str)}
        ratios = ", ".join(f"{k}={_fmt(v)}" for k, v in flat.items() if "ratio" in k or "speedup" in k)
        other = ", ".join(f"{k}={_fmt(v)}" for k, v in flat.items() if not ("ratio" in k or "speedup" in k))
        status = entry["status"] if entry["status"] == "ok" else f"{entry['status']}: {entry.get('error', '')[:80]}"
        lines.append(f"| {name} | {entry['what']} | {status} | {ratios} | {other[:300]} |")
    return "\n".join(lines) + "\n"


def bench_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dapo bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (minutes on a 2-core CPU)")
    p.add_argument("--only", nargs="*", help=f"subset of: {' '.join(n for n, _, _ in SUITE)}")
    p.add_argument("--out", default="runs/bench", help="directory for bench.json and bench.md")
    p.add_argument(
        "--trainer-shape",
        choices=("tiny", "0.5b", "1.5b", "7b"),
        default=None,
        help="model shape of the trainer benchmark (default: tiny with --quick or on CPU, else 1.5b)",
    )
    args = p.parse_args(argv)
    options = {"trainer": {"shape": args.trainer_shape}} if args.trainer_shape else {}
    results = run_suite(args.only, args.quick, options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1, default=str))
    md = to_markdown(results)
    (out / "bench.md").write_text(md)
    print(md)
    return 0 if all(e["status"] != "failed" for e in results["benchmarks"].values()) else 1


if __name__ == "__main__":
    import sys

    sys.exit(bench_main(sys.argv[1:]))
