"""`dapo report LOGDIR`: render the TensorBoard scalars of one or more runs to PNG charts.

Contract:
- `load_runs(logdir)` finds every directory under `logdir` (itself included) holding `events.out.tfevents.*` files
  and reads its scalars with TensorBoard's EventAccumulator: {run name: {tag: (steps, values)}}.
- `render(runs, out_dir, smooth)` writes one PNG per panel group that has data (`GROUPS`: rewards, response,
  policy, filtering, throughput), an `overview.png` with the curves the DAPO paper shows (accuracy, reward,
  response length, entropy, clip fractions, filtered groups, staleness, throughput), and `other.png` with every
  tag no group claims. Several runs are overlaid, labelled by their directory. Returns the paths written.
- `report_main(argv)` is the CLI; a missing log directory or one without scalars exits with status 2.
Matplotlib is used through its object API on the Agg canvas, so the global backend is left alone.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from dataclasses import dataclass
from pathlib import Path

Series = tuple[list[int], list[float]]
Runs = dict[str, dict[str, Series]]


@dataclass(frozen=True)
class Panel:
    title: str
    tags: tuple[str, ...]
    """Exact tags or fnmatch patterns (`response/len_*`), plotted in this order."""
    ylabel: str = ""


GROUPS: dict[str, tuple[Panel, ...]] = {
    "rewards": (
        Panel("accuracy", ("reward/acc", "eval/acc", "eval/*"), "fraction correct"),
        Panel("reward", ("reward/mean", "reward/*"), "reward"),
    ),
    "response": (
        Panel("response length", ("response/len_mean", "response/len_*"), "tokens"),
        Panel("response", ("response/*",)),
        Panel("entropy", ("train/entropy",), "nats / token"),
    ),
    "policy": (
        Panel("clip fraction", ("train/clipfrac_upper", "train/clipfrac_lower", "train/clipfrac*"), "fraction"),
        Panel("policy-gradient loss", ("train/pg_loss",)),
        Panel("gradient norm", ("train/grad_norm",)),
        Panel("training", ("train/*",)),
    ),
    "filtering": (
        Panel(
            "filtered groups",
            ("filter/drop_all_correct", "filter/drop_all_wrong", "filter/drop_stale", "filter/*"),
            "groups / step",
        ),  # fmt: skip
        Panel("staleness", ("staleness/mean", "staleness/max", "staleness/*"), "policy versions"),
    ),
    "throughput": (
        Panel("throughput", ("perf/gen_tokens_per_s", "perf/train_tokens_per_s", "perf/*"), "tokens / s"),
        Panel("time", ("time/step(s)", "time/weight_sync(s)", "time/*"), "seconds"),
    ),
}

OVERVIEW: tuple[Panel, ...] = (
    Panel("accuracy", ("reward/acc", "eval/acc"), "fraction correct"),
    Panel("reward", ("reward/mean",), "reward"),
    Panel("response length", ("response/len_mean",), "tokens"),
    Panel("entropy", ("train/entropy",), "nats / token"),
    Panel("clip fraction", ("train/clipfrac_upper", "train/clipfrac_lower"), "fraction"),
    Panel("filtered groups", ("filter/drop_all_correct", "filter/drop_all_wrong", "filter/drop_stale"), "groups"),
    Panel("staleness", ("staleness/mean", "staleness/max"), "policy versions"),
    Panel("throughput", ("perf/gen_tokens_per_s", "perf/train_tokens_per_s"), "tokens / s"),
)


class ReportError(ValueError):
    """Nothing to report; the message names the directory."""


# --------------------------------------------------------------------------------------------------- reading
def _event_dirs(logdir: Path) -> list[Path]:
    return sorted({p.parent for p in logdir.rglob("events.out.tfevents.*") if p.is_file()})


def read_scalars(run_dir: Path) -> dict[str, Series]:
    """All scalar series of one run directory (every event file in it, in order; purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    out: dict[str, Series] = {}
    for tag in acc.Tags().get(SCALARS, []):
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [float(e.value) for e in events])
    return out


def load_runs(logdir: str | Path) -> Runs:
    """{run name: scalars} for every directory under `logdir` that holds event files."""
    root = Path(logdir)
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory")
    runs: Runs = {}
    for d in _event_dirs(root):
        scalars = read_scalars(d)
        if scalars:
            runs[str(d.relative_to(root)) if d != root else root.name] = scalars
    if not runs:
        raise ReportError(f"{root}: no TensorBoard scalars found (no events.out.tfevents.* with scalars)")
    return runs


# --------------------------------------------------------------------------------------------------- plotting
def _match(patterns: tuple[str, ...], tags: list[str], taken: set[str] | None = None) -> list[str]:
    """Tags matching the patterns, in pattern order, each once (and not already `taken`)."""
    out: list[str] = []
    for pat in patterns:
        for tag in sorted(tags) if any(c in pat for c in "*?[") else [pat]:
            if tag in tags and fnmatch.fnmatchcase(tag, pat) and tag not in out and tag not in (taken or ()):
                out.append(tag)
    return out


def _ema(values: list[float], smooth: float) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None or not math.isfinite(last) else smooth * last + (1 - smooth) * v
        out.append(last)
    return out


def _draw(ax, panel: Panel, tags: list[str], runs: Runs, smooth: float) -> None:
    multi = len(runs) > 1
    for run, scalars in runs.items():
        for tag in tags:
            if tag not in scalars:
                continue
            steps, values = scalars[tag]
            label = f"{run}: {tag}" if multi else tag
            if smooth > 0:
                (line,) = ax.plot(steps, values, alpha=0.25, linewidth=1)
                ax.plot(steps, _ema(values, smooth), color=line.get_color(), linewidth=1.6, label=label)
            else:
                ax.plot(steps, values, linewidth=1.4, marker="." if len(steps) < 30 else None, label=label)
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel("step")
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _save_grid(items: list[tuple[Panel, list[str]]], runs: Runs, path: Path, title: str, smooth: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(3, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (panel, tags) in zip(axes, items, strict=False):
        _draw(ax, panel, tags, runs, smooth)
    for ax in axes[len(items) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=13)
    fig.savefig(path, dpi=dpi)
    return path


def render(runs: Runs, out_dir: str | Path, smooth: float = 0.0, dpi: int = 110) -> list[Path]:
    """Write overview.png, one PNG per group with data, and other.png; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tags = sorted({t for scalars in runs.values() for t in scalars})
    written: list[Path] = []
    overview = [(p, _match(p.tags, tags)) for p in OVERVIEW]
    overview = [(p, t) for p, t in overview if t]
    if overview:
        written.append(_save_grid(overview, runs, out / "overview.png", "DAPO training overview", smooth, dpi))
    taken: set[str] = set()
    for name, panels in GROUPS.items():
        items = []
        for panel in panels:
            matched = _match(panel.tags, tags, taken)
            taken.update(matched)
            if matched:
                items.append((panel, matched))
        if items:
            written.append(_save_grid(items, runs, out / f"{name}.png", name, smooth, dpi))
    rest = [t for t in tags if t not in taken]
    if rest:
        items = [(Panel(t, (t,)), [t]) for t in rest[:36]]  # one panel per tag; a cap keeps the figure readable
        written.append(_save_grid(items, runs, out / "other.png", "other scalars", smooth, dpi))
    return written


def report_main(argv: list[str]) -> int:
    """`dapo report LOGDIR [--out DIR] [--smooth S] [--dpi N]`; prints the PNG paths; 2 when nothing to plot."""
    ap = argparse.ArgumentParser(prog="dapo report", description="Render TensorBoard scalars of a run to PNGs.")
    ap.add_argument("logdir", help="a run directory (or a directory of runs, overlaid)")
    ap.add_argument("--out", default="", help="output directory (default: LOGDIR/report)")
    ap.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing in [0, 1) drawn over the raw curve")
    ap.add_argument("--dpi", type=int, default=110)
    args = ap.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        print(f"dapo report: --smooth must be in [0, 1); got {args.smooth}", file=sys.stderr)
        return 2
    try:
        runs = load_runs(args.logdir)
    except ReportError as e:
        print(f"dapo report: {e}", file=sys.stderr)
        return 2
    for path in render(runs, args.out or Path(args.logdir) / "report", args.smooth, args.dpi):
        print(path)
    return 0
