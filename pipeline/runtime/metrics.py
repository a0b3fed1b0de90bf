"""Metrics: one logger for TensorBoard scalars and the one-line console status of each step.

Contract: keys are namespaced with units where they have one (`time/weight_sync(s)`, `perf/gen_tokens_per_s`);
`log(step, metrics)` writes every numeric value as a scalar at that step and prints one status line (rank 0 /
the driver only: nothing else holds a MetricsLogger). `log_eval(metrics)` writes an evaluation's scalars at the
step it was taken at (`eval/step`, not the later step it finished at) and prints one line for it.
`RunRecord` is what a run keeps of itself: every step's metrics (logged, and in `history`), the prompts each step
trained, and the live evaluations (before the first step, every eval.every steps, after the last).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

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


class MetricsLogger:
    def __init__(
        self, logdir: str | None, total_steps: int, tensorboard: bool = True, console: bool = True, first_step: int = 0
    ):
        self.total_steps = total_steps
        self.console = console
        self.writer = None
        if tensorboard and logdir:
            from torch.utils.tensorboard import SummaryWriter

            # On resume, purge events past the checkpointed step so the curves continue without a jump.
            self.writer = SummaryWriter(logdir, purge_step=first_step or None)
        self.t0 = time.perf_counter()

    def _scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

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


class RunRecord:
    def __init__(self, cfg: Any, run_dir: str, first_step: int, evaluator: Any):
        lg, self.total, self.before_train = cfg.logging, cfg.trainer.total_steps, cfg.eval.before_train
        self.logger = MetricsLogger(os.path.join(run_dir, "tb"), self.total, lg.tensorboard, lg.console, first_step)
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
