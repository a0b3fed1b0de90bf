"""Evaluation during training, without stalling it.

Contract: every `eval.every` trainer steps, `LiveEval.maybe_start(step, version)` launches avg@k on the held-out
set (data.eval_path) through the same engines, on a background event loop; the trainer goes on. Requests that a
weight update aborts are resumed (see pipeline/runtime/evaluate.py), so a mid-run evaluation mixes the weights of the
version it started at with the one or two that follow. `run(step, version)` evaluates now and waits: the loop uses
it before the first step and after the last, when no weight update can happen, so those two are exact. `poll()` returns
the finished evaluation's metrics (`eval/acc`, `eval/pass`, `eval/response_len`, with the step and weight version
it was taken at) once, and nothing while it runs. At most one evaluation runs at a time: a due one is skipped
(counted) rather than queued behind a slow one. The evaluation's requests compete with rollouts for engine
capacity, which is the point: no GPU sits idle waiting for it.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

from pipeline.config import Config

log = logging.getLogger("dapo")


class LiveEval:
    def __init__(self, cfg: Config, urls: list[str], model_dir: str):
        from pipeline.flow.data import load_prompts
        from pipeline.flow.rewards import RewardRunner
        from pipeline.runtime.evaluate import engine_client, eval_sampling
        from pipeline.tokenizer import load_tokenizer

        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.path or cfg.model.tokenizer, model_dir)
        prompts = load_prompts(cfg.data, self.tokenizer, path=cfg.data.eval_path, seed=cfg.trainer.seed)
        self.prompts = prompts[: cfg.eval.max_prompts] if cfg.eval.max_prompts else prompts
        a = cfg.algorithm
        self.runner = RewardRunner(cfg.eval.reward_fn or a.reward_fn, a.reward_timeout_s, a.reward_workers)
        self.sampling = eval_sampling(cfg, self.tokenizer.eos_token_id)
        self.client = engine_client(cfg, urls)
        self.future: concurrent.futures.Future | None = None
        self.started_at: tuple[int, int] = (0, 0)
        self.skipped = 0

    def maybe_start(self, step: int, version: int, force: bool = False) -> None:
        if not force and (not self.cfg.eval.every or step % self.cfg.eval.every):
            return
        if self.future is not None and not self.future.done():
            self.skipped += 1
            return
        from pipeline.runtime.evaluate import evaluate

        concurrency = self.cfg.engine.max_running_requests * max(len(self.client.alive_urls), 1) // 2
        coro = evaluate(
            self.client, self.prompts, self.tokenizer, self.runner, self.cfg.eval.n_samples, self.sampling, concurrency
        )
        self.future = self.client.submit(coro)
        self.started_at = (step, version)

    def poll(self, wait: bool = False) -> dict[str, float]:
        if self.future is None or not (wait or self.future.done()):
            return {}
        future, self.future = self.future, None
        try:
            res = future.result()
        except Exception as e:  # an evaluation failure is reported, never fatal to training
            log.warning("evaluation at step %d failed: %r", self.started_at[0], e)
            return {"eval/failed": 1.0}
        step, version = self.started_at
        return {
            "eval/acc": float(res["acc"]),
            "eval/pass": float(res["pass"]),
            "eval/response_len": float(res["response_len"]),
            "eval/step": float(step),
            "eval/weight_version": float(version),
            "eval/skipped": float(self.skipped),
        }

    def run(self, step: int, version: int) -> list[dict[str, float]]:
        """Evaluate the current weights now and wait: [the evaluation still running, if any, then this one]."""
        results = [self.poll(wait=True)]
        self.maybe_start(step, version, force=True)
        results.append(self.poll(wait=True))
        return [r for r in results if r]

    def drop_engines(self, urls: list[str]) -> None:
        """Dead or hung engines (the loop replaces them): no new request goes there."""
        for url in urls:
            self.client.mark_dead(url)

    def add_engines(self, urls: list[str]) -> None:
        """Replacements, once they hold the current weights."""
        for url in urls:
            self.client.add_url(url)

    def close(self) -> None:
        if self.future is not None:
            self.future.cancel()
        self.client.close_sync()


def live_eval_or_none(cfg: Config, urls: list[str], model_dir: str) -> Any:
    return LiveEval(cfg, urls, model_dir) if cfg.eval.every and cfg.data.eval_path else None
