"""Rollout routing replay (R3) for megatron's MoE routers: the trainer sends each token to the experts the inference
engine chose for it, with gate weights still computed from the trainer's own router logits.

Contract:
- Routing layout (the engine's, SGLang's `routed_experts`): per token, per decoder layer (the HF layer index, all
  layers of a Qwen3-MoE model being MoE layers), the top-k global expert ids. A MicroBatch carries them as
  `routed_experts` (B, T, L, k), aligned with `input_ids` (the experts token (b, t) went to when it was fed);
  -1 marks a position without a record (the last token of a sequence, which the engine never fed; padding): there
  the trainer's own top-k is used. `engines/packing.py` packs and CP-splits them like the tokens.
- `RoutingReplay(chunks, config)` hooks every `TopKRouter` of the model chunks through megatron's own top-k hook
  (`TopKRouter.router_replay`, whose `get_replay_topk(scores, topk, num_groups, group_topk, compute_topk)` megatron
  calls in place of its top-k). `with replay.installed(fifo)` hooks the routers for one forward(-backward) run;
  `set_current(routing)` before each micro-batch's forward gives the records of the router input's tokens in order
  ((n, L, k): this CP rank's share of the packed row; with sequence parallelism each router slices its share) and
  `end_forward()` after it. Outside `installed` the routers are megatron's own (hook removed).
- Gate weights: the top-k scores are gathered from the trainer's own scores at the replayed experts and megatron
  turns them into weights as for its own choice: with `moe_router_pre_softmax=False` (Qwen3-MoE's norm_topk_prob)
  a softmax over the k gathered logits (= the trainer's softmax renormalised over the replayed experts); otherwise
  the full softmax's probabilities at those experts. So the gate weights keep their gradient w.r.t. the router.
- Load-balancing loss: megatron computes it from its own `compute_routing_scores_for_aux_loss` (the trainer's own
  top-k and scores), which this hook does not touch: the loss regularises the router's logits, the thing the engine
  routes with next; its gradient flows through the scores only (the token counts are constants), and the replayed
  routes are not a function of the current parameters. So the aux loss under replay is the same term as without.
- Full recomputation (`trainer.recompute`): megatron re-runs each layer's forward in the backward pass, possibly
  after later micro-batches' forwards (1F1B). Each router then keeps a FIFO of the top-k it used in the first
  (no-grad) forward and replays it in the recomputation, whose order per router is the forward order.
- Statistics: during a forward with records (`set_current(routing, stats=True)`) each router counts the (token, layer) pairs with a record and those
  where the trainer's own top-k set differs from the record; `per_token_mismatch` ORs the layers of a token.
  Read with `take_stats()` -> (pairs, flipped pairs, tokens, flipped tokens), summed over the forwards since the
  last call (first forwards only, never recomputations).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch

TopK = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def routers(chunks: list[torch.nn.Module]) -> list[Any]:
    """Every megatron TopKRouter of the model chunks (DDP-wrapped or not)."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for c in chunks for m in c.modules() if isinstance(m, TopKRouter)]


class _LayerReplay:
    """The hook megatron's top-k routing calls for one router (one MoE layer)."""

    def __init__(self, owner: RoutingReplay, layer: int) -> None:
        self.owner = owner
        self.layer = layer
        self.fifo: deque[torch.Tensor] = deque()

    def get_replay_topk(
        self, scores: torch.Tensor, topk: int, num_groups: int | None, group_topk: int | None, compute_topk: TopK
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.owner
        if o.fifo and torch.is_grad_enabled():  # recomputation of a checkpointed first forward
            if not self.fifo:
                raise RuntimeError(f"routing replay: layer {self.layer} recomputed without a recorded first forward")
            idx = self.fifo.popleft()
            return scores.gather(1, idx), idx
        own_vals, own_idx = compute_topk(scores, topk, num_groups, group_topk)
        rec = o.local_records(self.layer, scores.shape[0], scores.device)
        replayed = rec is not None and o.apply
        idx = own_idx
        if rec is not None:
            has = rec[:, 0] >= 0
            if o.apply:
                idx = torch.where(has.unsqueeze(1), rec, own_idx)
            if o.stats_on:
                differs = (rec.sort(dim=1).values != own_idx.sort(dim=1).values).any(dim=1) & has
                o.count(has, differs)
        if o.fifo and not torch.is_grad_enabled():
            self.fifo.append(idx)
        return (scores.gather(1, idx), idx) if replayed else (own_vals, own_idx)


class RoutingReplay:
    def __init__(self, chunks: list[torch.nn.Module], config: Any) -> None:
        self.routers = routers(chunks)
        self.hooks = {id(r): _LayerReplay(self, int(r.layer_number) - 1) for r in self.routers}
        self.sp = int(config.tensor_model_parallel_size) if config.sequence_parallel else 1
        self.fifo = False
        self.apply = True  # False: the trainer's own routing, records only counted (the mismatch statistics)
        self.stats_on = False
        self._routing: torch.Tensor | None = None
        self._token_flip: torch.Tensor | None = None
        self._token_has: torch.Tensor | None = None
        self._stats = torch.zeros(4, dtype=torch.float64)

    def local_records(self, layer: int, n: int, device: torch.device) -> torch.Tensor | None:
        """(n, k) int64 records of this router's n input tokens at `layer` (-1 rows: none), or None."""
        if self._routing is None:
            return None
        r = self._routing
        if self.sp > 1:  # sequence parallelism: this TP rank routes its contiguous share of the row
            from megatron.core import parallel_state as ps

            start = ps.get_tensor_model_parallel_rank() * n
            r = r[start : start + n]
        if r.shape[0] != n:
            raise ValueError(f"routing replay: {r.shape[0]} recorded tokens for a router input of {n} tokens")
        if layer >= r.shape[1]:
            raise ValueError(f"routing replay: no record for layer {layer} (records have {r.shape[1]} layers)")
        return r[:, layer].to(device=device, dtype=torch.long)

    def count(self, has: torch.Tensor, differs: torch.Tensor) -> None:
        self._stats[0] += float(has.sum())
        self._stats[1] += float(differs.sum())
        if self._token_flip is None or self._token_flip.shape != differs.shape:
            self._token_flip = differs.clone()
            self._token_has = has.clone()
        else:
            self._token_flip |= differs
            self._token_has |= has

    def _close_forward(self) -> None:
        if self._token_flip is not None:
            self._stats[2] += float(self._token_has.sum())
            self._stats[3] += float(self._token_flip.sum())
        self._token_flip = self._token_has = None

    @contextlib.contextmanager
    def installed(self, fifo: bool = False) -> Iterator[RoutingReplay]:
        """Hook every router for one forward(-backward) run. `fifo`: the run checkpoints its layers (full
        recomputation in training): keep each first forward's top-k for the recomputation."""
        self.fifo = fifo
        for r in self.routers:
            r.router_replay = self.hooks[id(r)]
        try:
            yield self
        finally:
            for r in self.routers:
                r.router_replay = None
            for h in self.hooks.values():
                h.fifo.clear()
            self.set_current(None)
            self.fifo = False

    def set_current(self, routing: torch.Tensor | None, stats: bool = True) -> None:
        """The records of the next forward's router inputs (n, L, k) (None: the trainer's own routing)."""
        self._routing, self.stats_on = routing, stats and routing is not None

    def end_forward(self) -> None:
        """After a micro-batch's forward: close its per-token statistics, forget its records."""
        self._close_forward()
        self.set_current(None)

    def take_stats(self) -> tuple[float, float, float, float]:
        s = self._stats.tolist()
        self._stats.zero_()
        return s[0], s[1], s[2], s[3]
