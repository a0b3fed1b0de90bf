"""The loss shares make gradients independent of how a mini-batch is split: 1 vs 4 micro-batches, and DP = 1 vs
DP = 2 (two gloo processes whose gradients are all-reduced with SUM), for a tiny language model."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engines.megatron.launch import init_dist, rank_main, rendezvous
from pipeline.algorithm.losses import AGGREGATIONS, logprobs_from_logits, policy_loss
from pipeline.config import AlgorithmConfig
from pipeline.contracts.backend import MicroBatch

VOCAB, HIDDEN, PROMPT = 32, 16, 3
RESPONSE_LENS = [7, 1, 0, 5, 9, 2, 4, 6]  # one empty response: present, but no loss tokens


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.mix = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + torch.tanh(self.mix(torch.cumsum(h, dim=1)))  # causal: position t sees tokens <= t
        return self.head(h)


def build_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().double()


def make_rows() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for n in RESPONSE_LENS:
        ids = torch.randint(1, VOCAB, (PROMPT + n,), generator=g)
        rows.append(
            {
                "ids": ids,
                "n": n,
                "old_shift": torch.randn(n, generator=g, dtype=torch.float64) * 0.3,  # ratios on both sides of clips
                "adv": float(torch.randn((), generator=g)),
            }
        )
    return rows


def logprobs(model: TinyLM, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) aligned with ids: position t is log p(ids[t] | ids[<t]); position 0 is 0."""
    lp = logprobs_from_logits(model(ids)[:, :-1].double(), ids[:, 1:]).double()
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)


def collate(model: TinyLM, rows: list[dict], global_tokens: float, global_seqs: float) -> MicroBatch:
    T = max(PROMPT + r["n"] for r in rows)
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    mask, adv = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for i, r in enumerate(rows):
        ids[i, : PROMPT + r["n"]] = r["ids"]
        mask[i, PROMPT : PROMPT + r["n"]] = 1.0
        adv[i, PROMPT : PROMPT + r["n"]] = r["adv"]
    with torch.no_grad():
        old = logprobs(model, ids)
    for i, r in enumerate(rows):
        old[i, PROMPT : PROMPT + r["n"]] += r["old_shift"]
    return MicroBatch(
        input_ids=ids,
        attention_mask=(ids > 0).long(),
        position_ids=torch.arange(T).expand(B, T),
        loss_mask=mask,
        old_logprobs=old,
        advantages=adv,
        global_tokens=global_tokens,
        global_seqs=global_seqs,
        max_new_tokens=16,
    )


def accumulate_grads(model: TinyLM, chunks: list[list[dict]], cfg: AlgorithmConfig, gt: float, gs: float):
    """Backward each micro-batch's share (gradients accumulate), return (summed loss, flat gradient)."""
    model.zero_grad()
    total = 0.0
    for rows in chunks:
        mb = collate(model, rows, gt, gs)
        loss, _ = policy_loss(logprobs(model, mb.input_ids), None, mb, cfg)
        loss.backward()
        total += loss.item()
    return total, torch.cat([p.grad.flatten() for p in model.parameters()])


def global_counts(rows: list[dict]) -> tuple[float, float]:
    return float(sum(r["n"] for r in rows)), float(len(rows))


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_micro_batch_split_invariance(agg):
    cfg = AlgorithmConfig(loss_agg=agg, dual_clip_c=3.0)
    rows = make_rows()
    gt, gs = global_counts(rows)
    model = build_model()
    loss1, g1 = accumulate_grads(model, [rows], cfg, gt, gs)
    loss4, g4 = accumulate_grads(model, [rows[i : i + 2] for i in range(0, 8, 2)], cfg, gt, gs)
    assert g1.abs().sum() > 0
    assert loss4 == pytest.approx(loss1, abs=1e-12)
    torch.testing.assert_close(g4, g1, atol=1e-10, rtol=0)


def test_mean_of_micro_batch_means_would_differ():
    # Guard against a vacuous test: a per-micro-batch token mean (local denominators) changes the gradient.
    cfg = AlgorithmConfig()
    rows = make_rows()
    model = build_model()
    _, g1 = accumulate_grads(model, [rows], cfg, *global_counts(rows))
    model.zero_grad()
    for i in range(0, 8, 2):
        chunk = rows[i : i + 2]
        mb = collate(model, chunk, global_counts(chunk)[0] * 4, 8.0)
        policy_loss(logprobs(model, mb.input_ids), None, mb, cfg)[0].backward()
    g_local = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (g_local - g1).abs().max() > 1e-4


def _dp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    init_dist(rank, world, port)  # 1 thread, the rendezvous the parent holds
    try:
        rows = make_rows()
        gt, gs = global_counts(rows)  # the whole mini-batch's counts, on every rank
        shard = rows[rank::world]
        model = build_model()
        loss, grad = accumulate_grads(model, [shard[:2], shard[2:]], AlgorithmConfig(), gt, gs)
        loss_t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        dist.all_reduce(loss_t, op=dist.ReduceOp.SUM)
        if rank == 0:
            torch.save({"grad": grad, "loss": loss_t.item()}, out_path)
    finally:
        dist.destroy_process_group()


def test_data_parallel_invariance(tmp_path):
    rows = make_rows()
    loss_single, g_single = accumulate_grads(build_model(), [rows], AlgorithmConfig(), *global_counts(rows))
    out = str(tmp_path / "dp.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = rendezvous()  # held until the ranks have joined
    mp.spawn(rank_main, args=(_dp_worker, 2, store.port, out), nprocs=2, join=True)
    got = torch.load(out)
    assert got["loss"] == pytest.approx(loss_single, abs=1e-12)
    torch.testing.assert_close(got["grad"], g_single, atol=1e-9, rtol=0)
