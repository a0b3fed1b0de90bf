"""Trainer step, shared by every backend: groups -> advantages -> mini-batches -> micro-batches per DP rank.

Contract:
- `make_step_batches(groups, cfg, dp_size)` turns the B kept groups of one trainer step into
  `[mini-batch][dp rank] -> list[MicroBatch]`. Advantages are computed per group (DESIGN contract 4); every
  micro-batch carries the global token and sequence counts of its mini-batch, so the loss shares summed over
  micro-batches and DP ranks equal the mini-batch loss however the batch is split (token-mean is exact).
- Every DP rank gets the same number of micro-batches (collectives stay in step); samples are dealt to ranks
  longest-first so token counts are balanced.
- `TrainWorker` is the per-rank object a Ray actor (or a test) drives: it owns one `TrainerBackend`, computes the
  proximal log-probs in decoupled mode, runs the mini-batches and returns the metrics of the step.
- Streaming (`pipeline.config.stream_parts`): with trainer.num_minibatches = n > 1 the loop takes a step's batch from the buffer
  in n parts of B / n groups and has the ranks train each mini-batch (`TrainWorker.train_minibatch`) as soon as
  its part is in, while the later groups are still generating. The groups, their order, the mini-batches and the
  updates are the ones `make_step_batches` makes of the whole batch (mini-batch m = groups m*B/n .. (m+1)*B/n - 1),
  and `merge_metrics` gives the step's metrics as `train_step` does. Not streamed: algorithm.off_policy =
  decoupled (the proximal log-probs of every mini-batch precede the step's first update), and colocated engines
  that release their memory while the trainer trains (they could not generate the later parts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.algorithm.advantages import compute_advantages
from pipeline.algorithm.losses import make_loss_fn
from pipeline.algorithm.shaping import overlong_loss_mask
from pipeline.config import Config
from pipeline.contracts.backend import MicroBatch, TrainerBackend
from pipeline.contracts.records import Group, Sample


@dataclass
class _Row:
    sample: Sample
    advantage: float
    in_loss: bool

    @property
    def length(self) -> int:
        return self.sample.prompt_len + self.sample.response_len


def _collate(rows: list[_Row], global_tokens: float, global_seqs: float, max_new_tokens: int) -> MicroBatch:
    """Right-padded tensors; per-token values aligned with input_ids (value at t is about token t)."""
    T = max(r.length for r in rows)
    B = len(rows)
    # numpy slices take the samples' fields as they come (arrays from the buffer, lists elsewhere): per row, not
    # per token; float64 logprobs round to float32 as torch.tensor(..., dtype=float32) does.
    input_ids = np.zeros((B, T), dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    loss_mask = np.zeros((B, T), dtype=np.float32)
    old_logprobs = np.zeros((B, T), dtype=np.float32)
    advantages = np.zeros((B, T), dtype=np.float32)
    for i, r in enumerate(rows):
        s = r.sample
        p, n = s.prompt_len, s.response_len
        input_ids[i, :p] = s.prompt_ids
        input_ids[i, p : p + n] = s.response_ids
        attention_mask[i, : p + n] = 1
        if n:
            old_logprobs[i, p : p + n] = s.logprobs
            advantages[i, p : p + n] = r.advantage
            if r.in_loss:
                loss_mask[i, p : p + n] = 1.0
    position_ids = torch.arange(T).unsqueeze(0).expand(B, T).contiguous()
    routes = _collate_routes(rows, T)
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        position_ids=position_ids,
        loss_mask=torch.from_numpy(loss_mask),
        old_logprobs=torch.from_numpy(old_logprobs),
        advantages=torch.from_numpy(advantages),
        global_tokens=max(global_tokens, 1.0),
        global_seqs=max(global_seqs, 1.0),
        max_new_tokens=max_new_tokens,
        routed_experts=routes,
    )


def _collate_routes(rows: list[_Row], T: int) -> torch.Tensor | None:
    """(B, T, L, k) int16 routed-expert records aligned with input_ids (-1: none: the last token, padding, samples
    without records); None when no sample has any."""
    shapes = {(r.sample.routed_layers, r.sample.routed_topk) for r in rows if r.sample.routing() is not None}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise ValueError(f"samples of one micro-batch carry routed experts of different shapes {sorted(shapes)}")
    (L, k) = shapes.pop()
    out = np.full((len(rows), T, L, k), -1, dtype=np.int16)
    for i, r in enumerate(rows):
        routes = r.sample.routing()
        if routes is not None:
            out[i, : routes.shape[0]] = routes
    return torch.from_numpy(out)


def _rows(groups: list[Group], cfg: Config) -> list[list[_Row]]:
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups], dtype=torch.float32)  # (N, G)
    adv = compute_advantages(rewards, cfg.algorithm.advantage)
    return [
        [_Row(s, float(adv[i, j]), overlong_loss_mask(s, cfg.algorithm.overlong)) for j, s in enumerate(g.samples)]
        for i, g in enumerate(groups)
    ]


def make_step_batches(
    groups: list[Group], cfg: Config, dp_size: int, num_minibatches: int | None = None
) -> list[list[list[MicroBatch]]]:
    """[mini-batch][dp rank] -> micro-batches. Groups stay whole inside a mini-batch. `num_minibatches`: default
    trainer.num_minibatches (1 for one streamed part)."""
    per_group = _rows(groups, cfg)
    n_mini = num_minibatches or cfg.trainer.num_minibatches
    groups_per_mini = len(groups) // n_mini
    out: list[list[list[MicroBatch]]] = []
    for m in range(n_mini):
        rows = [r for g in per_group[m * groups_per_mini : (m + 1) * groups_per_mini] for r in g]
        global_tokens = float(sum(r.sample.response_len for r in rows if r.in_loss))
        global_seqs = float(len(rows))
        # Longest-first round robin: balanced tokens per rank, equal sample counts per rank.
        rows.sort(key=lambda r: r.length, reverse=True)
        shards = [rows[k::dp_size] for k in range(dp_size)]
        out.append([_micro_batches(shard, cfg, global_tokens, global_seqs) for shard in shards])
    return out


def _micro_batches(rows: list[_Row], cfg: Config, global_tokens: float, global_seqs: float) -> list[MicroBatch]:
    t = cfg.trainer
    if t.max_tokens_per_micro_batch > 0:
        chunks, cur, cur_tokens = [], [], 0
        for r in rows:  # rows arrive longest-first: a greedy fill keeps padding low
            if cur and cur_tokens + r.length > t.max_tokens_per_micro_batch:
                chunks.append(cur)
                cur, cur_tokens = [], 0
            cur.append(r)
            cur_tokens += r.length
        if cur:
            chunks.append(cur)
    else:
        chunks = [rows[i : i + t.micro_batch_size] for i in range(0, len(rows), t.micro_batch_size)]
    return [_collate(c, global_tokens, global_seqs, cfg.rollout.max_new_tokens) for c in chunks]


class TrainWorker:
    """One trainer rank: a backend plus the shared algorithm."""

    def __init__(self, cfg: Config, backend: TrainerBackend):
        self.cfg = cfg
        self.backend = backend
        self.loss_fn = make_loss_fn(cfg.algorithm)

    def train_step(self, minibatches: list[list[MicroBatch]]) -> dict[str, float]:
        """`minibatches[m]` is this rank's micro-batches of mini-batch m. Returns metrics averaged over mini-batches."""
        t0 = time.perf_counter()
        if self.cfg.algorithm.off_policy == "decoupled":
            # The proximal policy is the policy before this step's first update: compute it for every
            # mini-batch up front.
            for mbs in minibatches:
                for mb, lp in zip(mbs, self.backend.forward_logprobs(mbs), strict=True):
                    mb.prox_logprobs = lp
        metrics = merge_metrics([self.train_minibatch(mbs) for mbs in minibatches])
        metrics["step_seconds"] = time.perf_counter() - t0
        return metrics

    def train_minibatch(self, mbs: list[MicroBatch]) -> dict[str, float]:
        """One mini-batch (one optimizer update): the backend's metrics and `local_tokens`."""
        metrics = {k: float(v) for k, v in self.backend.train_minibatch(mbs, self.loss_fn).items()}
        metrics["local_tokens"] = float(sum(mb.num_tokens() for mb in mbs))
        return metrics


def merge_metrics(per_minibatch: list[dict[str, float]]) -> dict[str, float]:
    """A step's metrics from its mini-batches': the mean of each, except `local_tokens`, summed."""
    out: dict[str, float] = {}
    for m in per_minibatch:
        for k, v in m.items():
            out[k] = out.get(k, 0.0) + v
    return {k: v if k == "local_tokens" else v / len(per_minibatch) for k, v in out.items()}
