"""Context parallelism, data side (pure tensors, no TE, no processes): the CP split is megatron's (one sequence) and
TE's (packed sequences), balances causal work, and the gather undoes it exactly; a CP-packed micro-batch, split over
its CP ranks and gathered back, feeds the loss the same per-token values as the plain pack; megatron's RoPE gives a CP
rank's chunks their global positions. The all-gathers' autograd and the model at cp = 2 (CPU attention), against
cp = 1, run on gloo ranks in tests/test_megatron_parallel.py; TE's at cp = 2 in tests/test_megatron_gpu.py."""

from __future__ import annotations

import pytest
import torch

from engines.megatron.backend import pack_micro_batch, packed_length
from engines.megatron.context_parallel import cp_partition_index, cp_slot_length, cp_unshard
from pipeline.testing.megatron import random_micro_batches

CPU = torch.device("cpu")


def _te_index(cu_seqlens_padded: list[int], cp: int, rank: int) -> list[int]:
    """transformer-engine's thd_partition_indices_kernel, transcribed token by token."""
    local = [c // cp for c in cu_seqlens_padded]
    out = []
    for token in range(cu_seqlens_padded[-1] // cp):
        seq = max(i for i in range(len(local) - 1) if local[i] <= token)
        seq_len = local[seq + 1] - local[seq]
        index = token - local[seq]
        offset = rank if index < seq_len // 2 else 2 * cp - 2 - rank
        out.append(index + local[seq] * cp + seq_len // 2 * offset)
    return out


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_single_sequence_split_is_megatrons(monkeypatch, cp):
    from megatron.core import parallel_state, utils

    L = 2 * cp * 5
    x = torch.arange(100, 100 + L).view(1, L)
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: cp)
    for rank in range(cp):
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda r=rank: r)
        want = utils.get_batch_on_this_cp_rank({"tokens": x.clone()})["tokens"]
        got = x[:, cp_partition_index(torch.tensor([0, L], dtype=torch.int32), cp, rank)]
        assert torch.equal(got, want)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_packed_split_is_te_s_balanced_and_exactly_undone(cp):
    g = torch.Generator().manual_seed(cp)
    slots = [cp_slot_length(int(n), cp) for n in torch.randint(1, 40, (6,), generator=g)]
    cu = torch.tensor([0, *torch.tensor(slots).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    indices = [cp_partition_index(cu, cp, r) for r in range(cp)]
    for r, idx in enumerate(indices):
        assert idx.tolist() == _te_index(cu.tolist(), cp, r)
        assert len(idx) == total // cp
    assert sorted(torch.cat(indices).tolist()) == list(range(total))  # a partition of the row
    # Load balance: within every slot each rank holds the same causal work (sum of attended prefix lengths).
    start = cu[:-1].repeat_interleave(torch.tensor(slots))
    work = [(idx - start[idx] + 1).sum().item() for idx in indices]
    assert len(set(work)) == 1
    values = torch.randn(3, total, generator=g)
    assert torch.equal(cp_unshard([values[:, i] for i in indices], indices, total), values)
    with pytest.raises(ValueError, match="multiple of 2\\*cp"):
        cp_partition_index(torch.tensor([0, 2 * cp + 1], dtype=torch.int32), cp, 0)


@pytest.mark.parametrize(("cp", "pad_to", "align"), [(2, 0, 1), (2, 300, 1), (3, 0, 2)])
def test_cp_pack_gathers_back_to_the_loss_layout(cp, pad_to, align):
    mb = random_micro_batches(1, 5, 200, seed=4, min_len=1, max_len=23)[0]
    mb.attention_mask[2] = 0  # an empty row
    mb.input_ids[2] = 0
    plain = pack_micro_batch(mb, CPU)
    parts = [pack_micro_batch(mb, CPU, pad_to, align, cp=cp, cp_rank=r) for r in range(cp)]
    whole = parts[0]
    assert whole.total_len >= max(packed_length(mb, cp), pad_to)
    assert whole.total_len < max(packed_length(mb, cp), pad_to) + 2 * cp * align  # only alignment beyond that
    assert whole.total_len % (2 * cp) == 0 and whole.total_len % align == 0
    assert all(len(pk.input_ids[0]) == whole.total_len // cp for pk in parts)
    real, slots = whole.cu_seqlens.diff().tolist(), whole.cu_seqlens_padded.diff().tolist()
    assert sum(slots) == whole.total_len and all(n % (2 * cp) == 0 for n in slots)
    lengths = [int(n) for n in mb.attention_mask.sum(1) if n]
    assert real[: len(lengths)] == lengths  # real lengths in cu_seqlens, slots in cu_seqlens_padded
    assert whole.max_seqlen == max(slots)
    for name in ("input_ids", "target", "position_ids"):
        row = cp_unshard([getattr(pk, name) for pk in parts], whole.cp_indices, whole.total_len)
        # What the loss reads: the value at the position each (b, s) maps to equals the plain pack's.
        got = row.reshape(-1)[whole.gather_idx][whole.valid]
        want = getattr(plain, name).reshape(-1)[plain.gather_idx][plain.valid]
        assert torch.equal(got, want), name
    assert torch.equal(whole.valid, plain.valid) and whole.real_tokens == plain.real_tokens
    # Per-token results computed on each rank's share, gathered back, are the plain pack's (an exact identity).
    f = lambda pk: (pk.input_ids * 1000 + pk.target).float()  # noqa: E731 (any per-token function)
    row = cp_unshard([f(pk) for pk in parts], whole.cp_indices, whole.total_len)
    got = torch.where(whole.valid, row.reshape(-1)[whole.gather_idx], 0.0)
    want = torch.where(plain.valid, f(plain).reshape(-1)[plain.gather_idx], 0.0)
    assert torch.equal(got, want) and got.abs().sum() > 0


class _Group:
    """What megatron's THD RoPE reads of a process group."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("cp", [2, 3])
def test_rope_gives_each_cp_chunk_its_global_position(monkeypatch, cp):
    """Megatron's unfused THD RoPE on a CP rank's share of the row, with the slot bounds (`cu_seqlens_q_padded`,
    which SelfAttention passes when set) and the rank, rotates each token by its position within its slot."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # where RotaryEmbedding moves its table
    g = torch.Generator().manual_seed(cp)
    slots = [cp_slot_length(int(n), cp) for n in torch.randint(1, 40, (5,), generator=g)]
    cu = torch.tensor([0, *torch.tensor(slots).cumsum(0).tolist()], dtype=torch.int32)
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)
    freqs = rope(max(slots), packed_seq=True)  # (max slot, 1, 1, 16), as GPTModel computes it for THD
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    row = torch.randn(int(cu[-1]), 3, 16, generator=g)  # (t, heads, dim)
    pos = torch.cat([torch.arange(n) for n in slots])
    # Every token rotated by its own position (sbhd, one position per row).
    want = apply_rotary_pos_emb(row[:, None], freqs[pos], config, cp_group=_Group(1, 0))[:, 0]
    assert (want - row).abs().max() > 1.0
    for rank in range(cp):
        idx = cp_partition_index(cu, cp, rank)
        got = apply_rotary_pos_emb(row[idx], freqs, config, cu_seqlens=cu, cp_group=_Group(cp, rank))
        assert torch.equal(got, want[idx])
