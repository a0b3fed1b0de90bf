"""Metrics: one logger for TensorBoard scalars and the one-line console status of each step.

Contract: keys are namespaced with units where they have one (`time/weight_sync(s)`, `perf/gen_tokens_per_s`);
`log(step, metrics)` writes every numeric value as a scalar at that step and prints one status line (rank 0 /
the driver only: nothing else holds a MetricsLogger); the line shows the reward function's failures by reason
(`rfail 12 (ValueError 10, timeout 2)`) once there are any. A logger opened with `first_step` (a resume from that
step's checkpoint) purges only the events logged after that step. `log_eval(metrics)` writes an evaluation's
scalars at the step it was taken at (`eval/step`, not the later step it finished at) and prints one line for it.

Sinks: TensorBoard (`writer`) and any `ScalarSink` passed in `sinks` receive the same scalars, under the same names,
at the same steps (`_scalars`). `WandbSink` is Weights & Biases (`logging.wandb.project`; `make_sinks` builds it):
the run is named after the run directory, the resolved config (secrets masked) is its config; a resumed run
continues the same W&B run (its id derives from the run directory). W&B's own step axis only grows, so an
evaluation, logged when it finishes, is written at the latest step with `eval/step` as its x-axis
(`define_metric("eval/*", step_metric="eval/step")`): the plot has TensorBoard's steps.
`RunRecord` is what a run keeps of itself: every step's metrics (logged, and in `history`), the prompts each step
trained, and the live evaluations (before the first step, every eval.every steps, after the last).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("dapo")

# (key, label, format) of the console status line, in order; missing keys are skipped.
_STATUS = (
    ("reward/mean", "reward", "{:+.3f}"),
    ("reward/acc", "acc", "{:.3f}"),
    ("response/len_mean", "len", "{:.1f}"),
    ("train/entropy", "ent", "{:.3f}"),
    ("train/clipfrac_upper", "clip+", "{:.3f}"),
    ("filter/dropped", "filt", "{:.0f}"),
    ("staleness/mean", "stale", "{:.2f}"),
    ("weight_version", "v", "{:.0f}"),
    ("time/step(s)", "step", "{:.1f}s"),
)


def reward_failures(metrics: Mapping[str, float]) -> str:
    """`12 (ValueError 10, timeout 2)`: the reward function's failures so far, by reason (pipeline/flow/rewards.py)."""
    prefix = "reward/failed_"
    reasons = sorted(((k[len(prefix) :], v) for k, v in metrics.items() if k.startswith(prefix)), key=lambda kv: -kv[1])
    detail = ", ".join(f"{r} {v:.0f}" for r, v in reasons)
    return f"{metrics['reward/failed']:.0f}" + (f" ({detail})" if detail else "")


class ScalarSink(Protocol):
    """A destination of the logger's scalars besides TensorBoard."""

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def finite_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


class WandbSink:
    """Weights & Biases run of one run directory (see the module docstring)."""

    def __init__(
        self, project: str, run_dir: str | os.PathLike, entity: str = "", mode: str = "online",
        config: Mapping[str, Any] | None = None,
    ):  # fmt: skip
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "logging.wandb.project is set but the `wandb` package is not installed: pip install 'dapo-rl[wandb]' "
                "(or unset logging.wandb.project)"
            ) from None
        run_dir = Path(run_dir).resolve()
        digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]
        self.run = wandb.init(
            project=project,
            entity=entity or None,
            name=run_dir.name,
            id=f"{run_dir.name}-{digest}",
            resume="allow",
            mode=os.environ.get("WANDB_MODE") or mode,
            dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            config=dict(config or {}),
            reinit="create_new",
        )
        self.run.define_metric("eval/*", step_metric="eval/step")
        self.step = 0

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        self.step = max(self.step, step)  # an evaluation's eval/step may lie behind: W&B's axis never goes back
        self.run.log(finite_scalars(metrics), step=self.step)

    def close(self) -> None:
        self.run.finish()


def make_sinks(cfg: Any, run_dir: str | os.PathLike) -> list[ScalarSink]:
    """The configured sinks besides TensorBoard: W&B when `logging.wandb.project` is set."""
    w = cfg.logging.wandb
    if not w.project or w.mode == "disabled":
        return []
    import yaml

    from pipeline.config import to_yaml

    return [WandbSink(w.project, run_dir, w.entity, w.mode, yaml.safe_load(to_yaml(cfg)))]


class MetricsLogger:
    def __init__(
        self, logdir: str | None, total_steps: int, tensorboard: bool = True, console: bool = True, first_step: int = 0,
        sinks: Sequence[ScalarSink] = (),
    ):  # fmt: skip
        self.sinks = list(sinks)
        self.total_steps = total_steps
        self.console = console
        self.writer = None
        if tensorboard and logdir:
            from torch.utils.tensorboard import SummaryWriter

            # On resume from the checkpoint of step `first_step`, purge what the earlier run logged after it (it is
            # redone), keeping that completed step's own scalars: TensorBoard drops events with step >= purge_step.
            self.writer = SummaryWriter(logdir, purge_step=first_step + 1 if first_step else None)
        self.t0 = time.perf_counter()

    def _scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        for sink in self.sinks:
            sink.scalars(step, metrics)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._scalars(step, metrics)
        if self.console:
            print(self.status_line(step, metrics), file=sys.stdout, flush=True)

    def status_line(self, step: int, metrics: Mapping[str, float]) -> str:
        width = len(str(self.total_steps))
        done = step / max(self.total_steps, 1)
        bar = ("#" * int(done * 20)).ljust(20, ".")
        parts = [f"step {step:>{width}}/{self.total_steps} [{bar}]"]
        parts += [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in _STATUS if key in metrics]
        if metrics.get("reward/failed", 0) > 0:
            parts.append(f"rfail {reward_failures(metrics)}")
        parts.append(f"elapsed {time.perf_counter() - self.t0:.0f}s")
        return " | ".join(parts)

    def log_eval(self, metrics: Mapping[str, float]) -> None:
        self._scalars(int(metrics.get("eval/step", 0)), metrics)
        if self.console:
            print(self.eval_line(metrics), file=sys.stdout, flush=True)

    @staticmethod
    def eval_line(m: Mapping[str, float]) -> str:
        if "eval/acc" not in m:
            return f"eval at step {m.get('eval/step', 0):.0f}: failed (see the log)"
        return (
            f"eval at step {m['eval/step']:.0f} (weights v{m['eval/weight_version']:.0f}): "
            f"avg@k {m['eval/acc']:.3f} | pass@k {m['eval/pass']:.3f} | len {m['eval/response_len']:.1f}"
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for sink in self.sinks:
            sink.close()


class RunRecord:
    def __init__(self, cfg: Any, run_dir: str, first_step: int, evaluator: Any):
        lg, self.total, self.before_train = cfg.logging, cfg.trainer.total_steps, cfg.eval.before_train
        self.logger = MetricsLogger(
            os.path.join(run_dir, "tb"), self.total, lg.tensorboard, lg.console, first_step,
            sinks=make_sinks(cfg, run_dir),  # W&B when logging.wandb.project is set
        )  # fmt: skip
        self.evaluator = evaluator
        self.history: list[dict[str, float]] = []
        self.trained: list[list[str]] = []
        self.evals: list[dict[str, float]] = []

    def _evals(self, *results: dict[str, float]) -> None:
        for m in filter(None, results):
            self.logger.log_eval(m)
            self.evals.append(m)

    def baseline(self, step: int, version: int) -> None:
        if self.evaluator is not None and step == 0 and self.before_train:
            self._evals(*self.evaluator.run(0, version))  # the baseline: v0, before any update

    def step(
        self, step: int, version: int, prompt_ids: list[str], metrics: dict[str, float], engines: Any, t0: float
    ) -> None:
        """Complete a step's metrics (generation speed, engines, evaluation), log and keep them."""
        metrics["perf/gen_tokens_per_s"] = metrics.get("rollout/tokens_per_s", 0.0)
        if self.evaluator is not None:
            self._evals(self.evaluator.poll())
            if step < self.total or not self.before_train:
                self.evaluator.maybe_start(step, version)
        metrics["engine/restarts"] = float(engines.restarts)
        metrics["engine/alive"] = float(len(engines.live_urls))
        metrics["time/step(s)"] = time.perf_counter() - t0
        metrics["weight_version"] = version
        self.logger.log(step, metrics)
        self.history.append(metrics)
        self.trained.append(prompt_ids)

    def finish(self, step: int, version: int, stopped: bool) -> None:
        """The evaluation still running, then the final weights' own (exact)."""
        if self.evaluator is not None:
            final = not stopped and self.before_train
            self._evals(*(self.evaluator.run(step, version) if final else [self.evaluator.poll(wait=True)]))

    def close(self) -> None:
        if self.evaluator is not None:
            self.evaluator.close()
        self.logger.close()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
