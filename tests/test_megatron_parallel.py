"""TP=2, PP=2 (also interleaved, vpp=2), DP=2, CP=2, and TP=2 x PP=2 (4 ranks, also with vpp=2), TP=2 x CP=2 and
PP=2 x CP=2 (4 ranks) train exactly like TP=1 (same DAPO loss, grad norm, per-token logprobs, updated weights); the
gradient is the sum of the loss shares whatever the micro-batch split; activation recomputation changes nothing; the
fused vocabulary-parallel logprob head equals the full-vocabulary one, gradients included; the CP all-gathers' backward.
gloo, a 4-layer tiny Qwen2 with tied embeddings and a padded vocabulary (200 -> 256); CP runs model.SDPACoreAttention
on packs of sequences of different lengths, most of them in slots with padding."""

from __future__ import annotations

import os

import pytest
import torch

from engines.megatron.launch import init_dist, spawn
from pipeline.testing.megatron import (
    assert_same_update,
    merge_micro_batches,
    random_micro_batches,
    save_tiny_hf,
    tiny_config,
)

# (tp, pp, dp, vpp, cp) on 2 ranks
LAYOUTS_2 = [(2, 1, 1, 1, 1), (1, 2, 1, 1, 1), (1, 1, 2, 1, 1), (1, 2, 1, 2, 1), (1, 1, 1, 1, 2)]
LAYOUTS_4 = [(2, 2, 1, 1, 1), (2, 2, 1, 2, 1), (2, 1, 1, 1, 2), (1, 2, 1, 1, 2)]  # on 4 ranks
LAYOUTS = LAYOUTS_2 + LAYOUTS_4
IDS = ["tp2", "pp2", "dp2", "pp2-vpp2", "cp2", "tp2-pp2", "tp2-pp2-vpp2", "tp2-cp2", "pp2-cp2"]
N_MICRO = 3  # odd: DP ranks get 2 and 1 micro-batches, vpp pads the schedule with an empty micro-batch


def _batch() -> list:
    return random_micro_batches(N_MICRO, 3, 200, seed=11)


def _train_once(
    tmp: str, rank: int, tp: int, pp: int, dp: int, vpp: int = 1, cp: int = 1, merge: bool = False, **kw
) -> dict:
    """One optimizer step of the DAPO loss on the shared batch; returns metrics and the HF weights around it."""
    from engines.megatron.backend import build_backend
    from pipeline.algorithm.losses import make_loss_fn

    cfg = tiny_config(tp, pp, dp, vpp=vpp, cp=cp, **kw)
    backend = build_backend(cfg, rank, tp * pp * dp * cp)
    backend.setup(os.path.join(tmp, "hf"))
    before = {k: v.clone() for k, v in backend.named_hf_weights()}  # replicated tensors are live views
    index = list(range(N_MICRO))[backend.dp_rank :: backend.dp_size]
    mbs = [_batch()[i] for i in index]
    if merge:
        mbs = [merge_micro_batches(mbs)]
    logprobs = dict(zip(index, backend.forward_logprobs(mbs), strict=False))  # every stage gets them
    metrics = backend.train_minibatch(mbs, make_loss_fn(cfg.algorithm))
    after = dict(backend.named_hf_weights())
    return {"metrics": metrics, "before": before, "after": after, "source": backend.is_sync_source, "lp": logprobs}


def _reference_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    init_dist(rank, world_size, port)
    out = _train_once(tmp, rank, 1, 1, 1)
    out["merged"] = _train_once(tmp, rank, 1, 1, 1, merge=True)["metrics"]
    out["recompute"] = _train_once(tmp, rank, 1, 1, 1, recompute=True)["metrics"]
    torch.save(out, os.path.join(tmp, "ref.pt"))


def _vocab_parallel_check(rank: int) -> dict:
    """The fused vocab-parallel logprob/entropy head (megatron's TP group, hidden states made TP-replicated by
    copy_to_tensor_model_parallel_region as the backend does) and its hidden and weight gradients vs the
    full-vocabulary float64 reference, at TP=2 and temperature 0.7."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    from engines.logprobs import fused_logprobs

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(16, 4, generator=g, dtype=torch.float64) * 2
    vocab, temp = 13, 0.7  # 3 padding rows on rank 1
    target = torch.randint(0, vocab, (3, 5), generator=g)
    target[0, 0] = 7  # owned by rank 0 (rows 0-7) ...
    target[0, 1] = 8  # ... and rank 1 (8-15)
    g_lp, g_ent = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )

    ref_h, ref_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp = torch.log_softmax((ref_h @ ref_w[:vocab].T) / temp, dim=-1)
    ref_lp = logp.gather(-1, target[..., None])[..., 0]
    ref_ent = -(logp.exp() * logp).sum(-1)
    (ref_lp * g_lp + ref_ent * g_ent).sum().backward()

    h = hidden.clone().requires_grad_(True)
    w = weight[rank * 8 : (rank + 1) * 8].clone().requires_grad_(True)
    lp, ent = fused_logprobs(
        copy_to_tensor_model_parallel_region(h), w, target, temperature=temp, chunk_tokens=4, with_entropy=True,
        vocab_start=rank * 8, vocab_size=vocab, group=ps.get_tensor_model_parallel_group(),
    )  # fmt: skip
    (lp * g_lp + ent * g_ent).sum().backward()
    return {
        "lp": (lp - ref_lp).abs().max().item(),
        "ent": (ent - ref_ent).abs().max().item(),
        "grad": max(
            (h.grad - ref_h.grad).abs().max().item(),
            (w.grad - ref_w.grad[rank * 8 : (rank + 1) * 8]).abs().max().item(),
        ),
        "grad_scale": ref_h.grad.abs().max().item(),
    }


def _cp_gather_check(rank: int) -> dict:
    """cp_gather over 2 ranks. Forward: the whole row. Backward: this rank's share of the gradient, which every rank
    back-propagates identically (the loss's logprobs), or of the sum of the ranks' different gradients (`sum_grads`:
    attention's keys and values, gathered along dim 0)."""
    import torch.distributed as dist

    from engines.megatron.context_parallel import cp_gather, cp_partition_index

    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    indices, mine = [cp_partition_index(cu, 2, r) for r in range(2)], cp_partition_index(cu, 2, rank)
    row = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))  # the same on both ranks
    weights = [torch.randn(3, 20, generator=torch.Generator().manual_seed(6 + r)) for r in range(2)]
    local = row[:, mine].clone().requires_grad_(True)
    gathered = cp_gather(local, indices, 20, dist.group.WORLD)
    (gathered * weights[0]).sum().backward()
    out = {"row": (gathered - row).abs().max().item(), "grad": (local.grad - weights[0][:, mine]).abs().max().item()}
    local = row.T[mine].clone().requires_grad_(True)  # (10, 3)
    gathered = cp_gather(local, indices, 20, dist.group.WORLD, dim=0, sum_grads=True)
    (gathered * weights[rank].T).sum().backward()  # each rank its own gradient
    out["row_dim0"] = (gathered - row.T).abs().max().item()
    out["grad_sum"] = (local.grad - (weights[0] + weights[1]).T[mine]).abs().max().item()
    return out


def _parallel_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    init_dist(rank, world_size, port)
    out = {}
    for layout in LAYOUTS_2 if world_size == 2 else LAYOUTS_4:  # the same processes re-initialise megatron
        out[layout] = _train_once(tmp, rank, *layout)
        if layout == (2, 1, 1, 1, 1):
            out["vocab_parallel"] = _vocab_parallel_check(rank)
    if world_size == 2:
        out["cp"] = _cp_gather_check(rank)
    torch.save(out, os.path.join(tmp, f"par{world_size}_{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(reference outputs, {layout: [output of each rank]}, [output of each rank of the 2-rank run])."""
    tmp = str(tmp_path_factory.mktemp("mpar"))
    save_tiny_hf(os.path.join(tmp, "hf"), "qwen2", vocab_size=200, tie=True, seed=2, layers=4)
    spawn(_reference_worker, 1, tmp, timeout_s=120)
    spawn(_parallel_worker, 2, tmp, timeout_s=240)
    spawn(_parallel_worker, 4, tmp, timeout_s=240)
    ref = torch.load(os.path.join(tmp, "ref.pt"))
    by_size = {n: [torch.load(os.path.join(tmp, f"par{n}_{r}.pt")) for r in range(n)] for n in (2, 4)}
    by_layout = {layout: [r[layout] for r in by_size[2 if layout in LAYOUTS_2 else 4]] for layout in LAYOUTS}
    return ref, by_layout, by_size[2]


def _merged(ranks: list[dict], key: str) -> dict[str, torch.Tensor]:
    """Union of the HF tensors emitted by the sync-source ranks (one per pipeline stage)."""
    merged: dict[str, torch.Tensor] = {}
    for r in ranks:
        part = r[key]
        assert bool(part) == r["source"], "only sync-source ranks emit tensors"
        assert not set(part) & set(merged)
        merged.update(part)
    return merged


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_same_loss_and_grad_norm_as_tp1(runs, layout):
    ref, by_layout, _ = runs
    want = ref["metrics"]
    assert want["grad_norm"] > 0.05 and abs(want["loss"]) > 1e-3  # a non-trivial step
    tp, pp, dp, _, cp = layout
    assert len(by_layout[layout]) == tp * pp * dp * cp
    for r in by_layout[layout]:
        got = r["metrics"]
        assert abs(got["loss"] - want["loss"]) < 1e-6
        assert abs(got["grad_norm"] - want["grad_norm"]) < 1e-6 * max(1.0, want["grad_norm"])
        for k in ("pg_loss", "clipfrac_upper", "clipfrac_lower", "approx_kl", "entropy", "ratio_mean"):
            assert abs(got[k] - want[k]) < 1e-5, k
        assert got["lr"] == want["lr"] == 1e-2


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_forward_logprobs_match_on_every_rank(runs, layout):
    ref, by_layout, _ = runs
    seen = set()
    for r in by_layout[layout]:
        for i, lp in r["lp"].items():
            assert (lp - ref["lp"][i]).abs().max() < 1e-5
            seen.add(i)
    assert seen == set(range(N_MICRO))


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_one_step_changes_weights_identically(runs, layout):
    ref, by_layout, _ = runs
    before, after = _merged(by_layout[layout], "before"), _merged(by_layout[layout], "after")
    assert_same_update(before, after, ref["before"], ref["after"], lr=1e-2)


def test_gradient_is_the_sum_over_micro_batches_and_recompute_is_exact(runs):
    ref, _, _ = runs
    want = ref["metrics"]
    for other in (ref["merged"], ref["recompute"]):
        assert abs(other["loss"] - want["loss"]) < 1e-6
        assert abs(other["grad_norm"] - want["grad_norm"]) < 1e-6 * max(1.0, want["grad_norm"])
    assert ref["merged"]["padded_layout_efficiency"] < want["padded_layout_efficiency"] < 1.0
    assert want["packing_efficiency"] == 1.0  # pp=1: packs carry no padding at all


def test_vocab_parallel_logprob_matches_full_softmax(runs):
    _, _, two_ranks = runs
    for r in two_ranks:
        vp = r["vocab_parallel"]
        assert vp["grad_scale"] > 0.1
        assert vp["lp"] < 1e-5 and vp["ent"] < 1e-5 and vp["grad"] < 1e-5


def test_expert_layout_for_dense_and_moe_models():
    from engines.megatron.backend import expert_layout
    from pipeline.config import ParallelConfig

    dense = expert_layout(ParallelConfig(tp=2, pp=2, etp=1), moe=False)
    assert (dense.tp, dense.pp, dense.ep, dense.etp) == (2, 2, 1, 2)  # megatron: expert dp == dp when pp > 1
    assert expert_layout(ParallelConfig(tp=2, ep=2, etp=1), moe=True).etp == 1  # pp = 1: parallel folding kept
    with pytest.raises(ValueError, match=r"trainer\.parallel\.etp: .*ep\*etp == tp\*cp"):
        expert_layout(ParallelConfig(tp=2, pp=2, etp=1), moe=True)


def test_cp_gather_autograd(runs):
    _, _, two_ranks = runs
    for r in two_ranks:  # exact: pure data movement, and a sum of two terms
        assert r["cp"] == {"row": 0.0, "grad": 0.0, "row_dim0": 0.0, "grad_sum": 0.0}
