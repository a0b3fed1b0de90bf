"""One training step as the loop runs it: the buffer's batch -> the trainer ranks, whole or streamed.

Contract:
- `train_step(cfg, lay, buffer, weights, trainers, step)` takes the step's batch from the buffer, checked against
  the engines' current version, and trains it on every rank; returns the groups and the step's metrics.
  With `lay.stream_parts` = n > 1 the batch comes in n parts of B / n groups, each sent to the ranks as soon as
  the buffer has it, queued behind the mini-batch they are training, so waiting overlaps training. Once the first
  part is sent, a weight sync (an engine replaced while a later part is awaited; it runs after the queued
  mini-batches) sends weights the step has moved: a new version (the coordinator's `trainer_stepped`).
- While waiting for a batch the engine group is health-checked every few seconds (a dead or hung engine stalls
  generation) and the rollout asked whether it can go on (its error stops the run); every PROGRESS_EVERY_S without
  a batch a line says what the rollout did meanwhile (groups generated, kept, filtered by reason, requeued, reward
  failures), so a run whose groups are all filtered is not silent. A step followed by a weight sync trains inside
  `weights.released` (colocated memory release).
- `step_metrics` names what a step reports (reward/*, response/*, staleness/*, time/*, perf/*, train/*).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from pipeline.config import Config, Layout
from pipeline.contracts.records import Group
from pipeline.flow.trainer import make_step_batches, merge_metrics
from pipeline.runtime.groups import TrainerGroup
from pipeline.runtime.weight_sync.coordinator import WeightSyncCoordinator

log = logging.getLogger("dapo")

PROGRESS_EVERY_S = 10.0
"""While no batch comes, a progress line (`progress_line`) this often."""

StepOut = tuple[list[Group], list[dict[str, float]], float, dict[str, float]]


def train_step(
    cfg: Config, lay: Layout, buffer: Any, weights: WeightSyncCoordinator, trainers: TrainerGroup, step: int
) -> tuple[list[Group], dict[str, float]]:
    t0 = time.perf_counter()
    parts = lay.stream_parts
    if parts == 1:
        out = whole_step(cfg, buffer, weights, trainers, synced=step % lay.sync_every == 0)
    else:
        out = streamed_step(cfg, buffer, weights, trainers, parts)
    groups, rank_metrics, t_wait, healed = out
    t_train = time.perf_counter() - t0 - t_wait
    metrics = step_metrics(groups, rank_metrics, weights.version, t_wait, t_train)
    metrics.update(healed)
    metrics["perf/streamed_minibatches"] = float(parts if parts > 1 else 0)
    weights.trainer_stepped()
    return groups, metrics


def whole_step(
    cfg: Config, buffer: Any, weights: WeightSyncCoordinator, trainers: TrainerGroup, synced: bool
) -> StepOut:
    """One step on the whole batch: the groups, each rank's metrics, the time spent waiting for the batch and the
    health-check metrics. `synced`: a weight sync follows (see WeightSyncCoordinator.released)."""
    t0 = time.perf_counter()
    groups, healed = next_batch(cfg, buffer, weights)
    t_wait = time.perf_counter() - t0
    per_rank = shard(make_step_batches(groups, cfg, cfg.trainer.parallel.dp), cfg)
    with weights.released(synced):
        rank_metrics = trainers.train_step(per_rank)
    return groups, rank_metrics, t_wait, healed


def streamed_step(
    cfg: Config, buffer: Any, weights: WeightSyncCoordinator, trainers: TrainerGroup, parts: int
) -> StepOut:
    """One step in `parts` mini-batches; returns what whole_step does, each rank's metrics merged over them."""
    groups: list[Group] = []
    healed: dict[str, float] = {}
    per_part: list[list] = []  # [part][rank] -> metrics ref
    t_wait = 0.0
    for _ in range(parts):
        t0 = time.perf_counter()
        part, h = next_batch(cfg, buffer, weights, size=cfg.trainer.batch_size // parts)
        t_wait += time.perf_counter() - t0
        healed.update(h)
        groups += part
        per_rank = shard(make_step_batches(part, cfg, cfg.trainer.parallel.dp, num_minibatches=1), cfg)
        per_part.append(trainers.train_minibatch(per_rank))
        weights.trainer_stepped()
    done = [ray.get(refs) for refs in per_part]
    return groups, [merge_metrics(list(ranks)) for ranks in zip(*done, strict=True)], t_wait, healed


def next_batch(
    cfg: Config, buffer: Any, weights: WeightSyncCoordinator, size: int | None = None
) -> tuple[list[Group], dict[str, float]]:
    """Wait for the next batch (or `size` groups of it), healing the engines every few seconds meanwhile."""
    start = time.monotonic()
    deadline, shown = start + cfg.engine.request_timeout_s, start
    healed: dict[str, float] = {}
    while True:
        remaining = deadline - time.monotonic()
        try:
            timeout_s = max(min(5.0, remaining, PROGRESS_EVERY_S), 0.01)
            return buffer.get_batch(trainer_version=weights.version, timeout_s=timeout_s, size=size), healed
        except TimeoutError:
            if error := weights.rollout.error():  # e.g. the reward function fails on every call
                raise RuntimeError(error) from None
            if remaining <= 5.0:
                raise
            if time.monotonic() - shown >= PROGRESS_EVERY_S:  # a run whose groups are all filtered is not silent
                shown = time.monotonic()
                log.info("%s", progress_line(shown - start, weights.rollout.progress()))
            healed.update(weights.update())


def progress_line(waited_s: float, p: dict) -> str:
    """`waiting for a batch (20 s): groups generated 412, kept 0, filtered 412 (all_wrong 410, all_correct 2),
    requeued 3, reward failures 0`."""
    filtered = p.get("filtered", {})
    detail = ", ".join(f"{k} {v}" for k, v in sorted(filtered.items(), key=lambda kv: -kv[1]))
    return (
        f"waiting for a batch ({waited_s:.0f} s): groups generated {p.get('generated', 0)}, kept {p.get('kept', 0)}, "
        f"filtered {sum(filtered.values())}" + (f" ({detail})" if detail else "") + f", requeued "
        f"{p.get('requeued', 0)}, reward failures {p.get('reward_failures', 0)}"
    )


def shard(minibatches: list[list[list]], cfg: Config) -> list[list[list]]:
    """[mini-batch][dp rank] -> per trainer rank: its DP shard of every mini-batch (model-parallel peers share it)."""
    p = cfg.trainer.parallel
    ranks_per_dp = p.tp * p.pp * p.cp
    return [[mb[r // ranks_per_dp] for mb in minibatches] for r in range(cfg.trainer.world_size)]


def step_metrics(
    groups: list[Group], rank_metrics: list[dict[str, float]], version: int, t_wait: float, t_train: float
) -> dict[str, float]:
    samples = [s for g in groups for s in g.samples]
    n = max(len(samples), 1)
    lens = [s.response_len for s in samples]
    stale = [version - s.min_version for s in samples]
    first = rank_metrics[0]
    train_tokens = sum(m.get("local_tokens", 0.0) for m in rank_metrics)
    m = {
        "reward/mean": sum(s.reward for s in samples) / n,
        "reward/task_mean": sum(s.task_reward for s in samples) / n,
        "reward/acc": sum(s.acc for s in samples) / n,
        "response/len_mean": sum(lens) / n,
        "response/len_max": float(max(lens, default=0)),
        "response/truncated_frac": sum(s.truncated for s in samples) / n,
        "staleness/mean": sum(stale) / n,
        "staleness/max": float(max(stale, default=0)),
        "time/wait_batch(s)": t_wait,
        "time/train(s)": t_train,
        "perf/train_tokens_per_s": train_tokens / max(t_train, 1e-9),
    }
    for k, v in first.items():
        if k not in ("local_tokens", "step_seconds"):
            m[f"train/{k}"] = v
    return m
