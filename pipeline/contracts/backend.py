"""The trainer-backend interface: what `engines/fsdp` and `engines/megatron` implement, one object per rank.

Contract:
- The algorithm (advantages, loss, aggregation) lives in `pipeline/algorithm`; a backend only turns token ids into
  per-token log-probabilities (and entropies), runs backward on the loss the algorithm returns, and steps the
  optimizer. Both backends therefore train with identical maths.
- Per-token tensors in a `MicroBatch` are aligned with `input_ids` (B, T): the value at position t refers to token
  `input_ids[:, t]` as predicted from positions < t. Position 0 is never a loss position.
- `loss_fn(logprobs, entropy, mb)` returns this micro-batch's *share* of the mini-batch loss (already divided by
  the mini-batch's global denominator, e.g. its total token count across every micro-batch and DP rank). The
  backend must make the gradients the SUM of those shares over micro-batches and DP ranks (so it multiplies by the
  DP size where its data-parallel wrapper averages). Then the result does not depend on how a batch is split.
- `named_hf_weights()` yields full (TP-gathered) tensors under Hugging Face names, on the ranks that are weight-sync
  sources (`is_sync_source`); other ranks yield nothing but must still call it (it may run collectives).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) long, right-padded with 0
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    position_ids: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) float, 1 on response tokens that enter the loss
    old_logprobs: torch.Tensor  # (B, T) float, behaviour logprobs from the engine
    advantages: torch.Tensor  # (B, T) float, the sample's advantage broadcast over its response tokens
    prox_logprobs: torch.Tensor | None = None  # (B, T) recomputed proximal logprobs (decoupled PPO)
    global_tokens: float = 1.0  # loss-mask tokens in the whole mini-batch, all micro-batches and DP ranks
    global_seqs: float = 1.0  # sequences in the whole mini-batch, all micro-batches and DP ranks
    max_new_tokens: int = 1  # L_max, for seq-mean-token-sum-norm
    # (B, T, L, k) small int: the experts the engine routed token (b, t) to, per MoE layer (top-k ids; -1: no
    # record, the trainer routes it itself). MoE rollout routing replay (engines/megatron/routing.py); None: none.
    routed_experts: torch.Tensor | None = None

    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


LossFn = Callable[[torch.Tensor, torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TrainerBackend(Protocol):
    """One trainer rank. Built by `build_backend(cfg, rank, world_size)` in each backend package."""

    rank: int
    dp_rank: int
    dp_size: int
    is_sync_source: bool

    def setup(self, hf_model_dir: str) -> None:
        """Build the model from a Hugging Face directory, the optimizer and the LR schedule."""

    def forward_logprobs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        """No-grad per-token logprobs (B, T) of each micro-batch (proximal policy for decoupled PPO)."""
        ...

    def train_minibatch(self, micro_batches: list[MicroBatch], loss_fn: LossFn) -> dict[str, float]:
        """Forward+backward every micro-batch, clip gradients, one optimizer step. Returns metrics
        (`grad_norm`, `lr`, and the sums of the loss_fn metrics reduced over DP)."""
        ...

    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full tensors under HF names (on sync-source ranks)."""
        ...

    def save(self, path: str) -> None:
        """Model, optimizer, scheduler and RNG state."""

    def load(self, path: str) -> None:
        """Inverse of save."""
