"""Packing right-padded micro-batches into one row without padding (THD), shared by both trainer backends.

Contract:
- `pack_micro_batch(mb, device, pad_to=0, align=1, cp=1, cp_rank=0) -> PackedMicroBatch`: the (B, T) MicroBatch's
  real tokens back to back in one row `(1, t)`, RoPE positions restarting at 0 for every sequence, `target` the next
  token of the same sequence, `cu_seqlens` the sequence bounds (the packed attention kernels of engines/attention.py
  and megatron's `PackedSeqParams` take them). Padding to `pad_to` / a multiple of `align` (megatron's pipeline and
  sequence parallelism) and context-parallel slots (cp > 1) as described on the function.
- `padded_micro_batch(mb, device)`: the (B, T) layout itself in the same structure (the unpacked baseline).
- Routing (MoE rollout routing replay): a MicroBatch's `routed_experts` (B, T, L, k) travel with their tokens: packed
  into `PackedMicroBatch.routed_experts` (t, L, k) int64 in the row's order (the router input's token order; -1 on
  padding positions and slot tails: the trainer routes those itself), CP-split like the tokens; for the padded layout
  in megatron's [s, b] order (position s of row b at s * B + b).
- `unpack(packed, values)`: per-position results of the model's row(s) -> the MicroBatch's (B, T) layout, the value at
  (b, s) being the row's prediction about token s of sequence b (from position s - 1); 0 at s = 0 and on padding
  (pipeline/contracts/backend.py's alignment).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engines.megatron.context_parallel import cp_partition_index, cp_slot_length
from pipeline.contracts.backend import MicroBatch


@dataclass
class PackedMicroBatch:
    """A MicroBatch as the model sees it, plus the indices to unpack per-token results to its (B, T) layout: one
    packed row (THD, `cu_seqlens` set), or the padded (B, T) layout itself (`cu_seqlens` None; `packing=False`).
    With context parallelism the model input is this CP rank's share of the row (`cp_indices[cp_rank]`)."""

    mb: MicroBatch
    input_ids: torch.Tensor  # (1, t) packed (t / cp with context parallelism), or (B, T)
    position_ids: torch.Tensor  # same shape; restarting at 0 for every sequence
    target: torch.Tensor  # same shape: the next token of the same sequence (0 at a sequence's last token)
    gather_idx: torch.Tensor  # (B, T): flat position in the whole row whose prediction is about token (b, s)
    valid: torch.Tensor  # (B, T) bool: s >= 1 and s < len(b)
    cu_seqlens: torch.Tensor | None  # (n + 1,) int32, cumulative real lengths
    max_seqlen: int  # longest slot
    real_tokens: int
    total_len: int  # positions of the whole row (B * T for the padded layout)
    cu_seqlens_padded: torch.Tensor | None = None  # (n + 1,) int32 slot bounds; context parallelism only
    cp_indices: list[torch.Tensor] | None = None  # row positions each CP rank holds; context parallelism only
    routed_experts: torch.Tensor | None = None  # (t, L, k) int64 records per model-input token; -1: none


def packed_length(mb: MicroBatch, cp: int = 1) -> int:
    """Positions a MicroBatch takes packed (each sequence in a slot that is a multiple of 2*cp when cp > 1)."""
    lengths = mb.attention_mask.sum(dim=1).tolist()
    return int(sum(cp_slot_length(n, cp) if cp > 1 else n for n in lengths))


def pack_micro_batch(
    mb: MicroBatch, device: torch.device, pad_to: int = 0, align: int = 1, cp: int = 1, cp_rank: int = 0
) -> PackedMicroBatch:
    """Pack a right-padded (B, T) MicroBatch into one row without padding. With `pad_to` > the packed length, or a
    length that is not a multiple of `align`, pad tokens are appended as one extra segment (attending only to itself;
    never a loss position): every micro-batch of a pipeline-parallel mini-batch gets the same shape, and sequence
    parallelism gets a length divisible by tp. With cp > 1 each sequence takes a slot that is a multiple of 2*cp
    (`cu_seqlens_padded`; the slot's tail is never attended to nor read), and the model input is CP rank
    `cp_rank`'s load-balanced share of the row (engines/megatron/context_parallel.py)."""
    lengths = mb.attention_mask.sum(dim=1).tolist()
    T = mb.input_ids.shape[1]
    slots = [cp_slot_length(n, cp) if cp > 1 and n else n for n in lengths]
    offsets = []
    for b, n in enumerate(lengths):
        if not bool(mb.attention_mask[b, :n].all()):
            raise ValueError(f"MicroBatch row {b}: attention_mask must be right-padded (ones then zeros)")
        offsets.append(sum(slots[:b]))
    real = int(sum(lengths))
    if cp > 1:
        align = math.lcm(align, 2 * cp)
    total = max(sum(slots), pad_to, 1)
    total = -(-total // align) * align
    ids = torch.zeros(total, dtype=torch.long)
    target = torch.zeros(total, dtype=torch.long)  # a sequence's last token predicts nothing in this batch
    pos = torch.zeros(total, dtype=torch.long)
    bounds, real_bounds = [0], [0]
    for b, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
        if n == 0:
            continue
        ids[o : o + n] = mb.input_ids[b, :n]
        target[o : o + n - 1] = mb.input_ids[b, 1:n]
        pos[o : o + slots[b]] = torch.arange(slots[b])
        bounds.append(o + slots[b])
        real_bounds.append(real_bounds[-1] + n)
    if total > bounds[-1]:  # padding segment
        pos[bounds[-1] :] = torch.arange(total - bounds[-1])
        real_bounds.append(real_bounds[-1] + total - bounds[-1])
        bounds.append(total)
    routing = _pack_routing(mb, offsets, lengths, total)
    s = torch.arange(T)
    valid = (s >= 1) & (s < torch.tensor(lengths).unsqueeze(1))  # (B, T)
    gather_idx = torch.where(valid, torch.tensor(offsets).unsqueeze(1) + s - 1, 0)
    cu_padded = torch.tensor(bounds, dtype=torch.int32)
    cp_indices = [cp_partition_index(cu_padded, cp, r) for r in range(cp)] if cp > 1 else None
    if cp_indices is not None:
        ids, pos, target = (x[cp_indices[cp_rank]] for x in (ids, pos, target))
        routing = routing[cp_indices[cp_rank]] if routing is not None else None
    return PackedMicroBatch(
        mb=mb,
        input_ids=ids.view(1, -1).to(device),
        position_ids=pos.view(1, -1).to(device),
        target=target.view(1, -1).to(device),
        gather_idx=gather_idx.to(device),
        valid=valid.to(device),
        cu_seqlens=torch.tensor(real_bounds, dtype=torch.int32, device=device),
        max_seqlen=max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)),
        real_tokens=real,
        total_len=total,
        cu_seqlens_padded=cu_padded.to(device) if cp > 1 else None,
        cp_indices=[i.to(device) for i in cp_indices] if cp_indices is not None else None,
        routed_experts=routing.to(device) if routing is not None else None,
    )


def _pack_routing(mb: MicroBatch, offsets: list[int], lengths: list[int], total: int) -> torch.Tensor | None:
    """(total, L, k) int64: each sequence's records at its slot, -1 elsewhere."""
    r = mb.routed_experts
    if r is None:
        return None
    if r.dim() != 4 or tuple(r.shape[:2]) != tuple(mb.input_ids.shape):
        raise ValueError(f"MicroBatch.routed_experts: shape {tuple(r.shape)} is not (B, T, L, k) with (B, T) = "
                         f"{tuple(mb.input_ids.shape)}")  # fmt: skip
    out = torch.full((total, *r.shape[2:]), -1, dtype=torch.long)
    for o, n, row in zip(offsets, lengths, r, strict=True):
        out[o : o + n] = row[:n]
    return out


def padded_micro_batch(mb: MicroBatch, device: torch.device) -> PackedMicroBatch:
    """The unpacked baseline: the right-padded (B, T) layout as is (causal attention; padding computed and ignored)."""
    B, T = mb.input_ids.shape
    lengths = mb.attention_mask.sum(dim=1)
    target = torch.zeros(B, T, dtype=torch.long)
    target[:, :-1] = mb.input_ids[:, 1:]
    s = torch.arange(T)
    valid = (s >= 1) & (s < lengths.unsqueeze(1))
    gather_idx = torch.where(valid, torch.arange(B).unsqueeze(1) * T + s - 1, 0)
    return PackedMicroBatch(
        mb=mb,
        input_ids=mb.input_ids.to(device),
        position_ids=s.expand(B, T).contiguous().to(device),
        target=target.to(device),
        gather_idx=gather_idx.to(device),
        valid=valid.to(device),
        cu_seqlens=None,
        max_seqlen=T,
        real_tokens=int(lengths.sum()),
        total_len=B * T,
        routed_experts=(
            None
            if mb.routed_experts is None
            else mb.routed_experts.long().transpose(0, 1).reshape(T * B, *mb.routed_experts.shape[2:]).to(device)
        ),
    )


def unpack(packed: PackedMicroBatch, values: torch.Tensor) -> torch.Tensor:
    """(B, T) from per-position values shaped like the model input (the whole row's when cp > 1)."""
    return torch.where(packed.valid, values.reshape(-1)[packed.gather_idx], 0.0)
