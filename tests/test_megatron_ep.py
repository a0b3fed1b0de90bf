"""Expert parallelism on CPU: a tiny Qwen3-MoE (4 experts, top-2) trained at EP=2 (2 gloo ranks, DP=2, megatron's
alltoall token dispatcher) equals EP=1: same DAPO loss, grad norm, per-token logprobs and updated weights of every
expert, with the load-balancing loss on (4 micro-batches, 2 per rank), and without it when the DP ranks hold different
numbers of micro-batches (3: the EP ranks run equal counts, padded with an empty micro-batch, whose one token would
enter the aux mean). The load-balancing term is the token-weighted mean over the mini-batch: a micro-batch and the
same micro-batch with every row twice give the same step."""

from __future__ import annotations

import os

import pytest
import torch

from engines.megatron.launch import init_dist, spawn
from pipeline.contracts.backend import MicroBatch
from pipeline.testing.megatron import assert_same_update, random_micro_batches, save_tiny_hf, tiny_config

AUX = 0.1  # router_aux_loss_coef: large enough to change the step visibly
RUNS = {"aux": ("hf", 4), "uneven": ("hf_no_aux", 3)}  # name: (HF dir, micro-batches)


def _batch(n: int) -> list[MicroBatch]:
    return random_micro_batches(n, 3, 200, seed=11)


def _twice(mb: MicroBatch) -> MicroBatch:
    """Every row twice; global counts doubled, so the token-mean DAPO loss of the micro-batch is unchanged."""
    fields = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else v) for k, v in vars(mb).items()}
    fields.update(global_tokens=2 * mb.global_tokens, global_seqs=2 * mb.global_seqs)
    return MicroBatch(**fields)


def _train_once(tmp: str, rank: int, ep: int, mbs: list[MicroBatch], hf: str = "hf") -> dict:
    from engines.megatron.backend import build_backend
    from pipeline.algorithm.losses import make_loss_fn

    cfg = tiny_config(1, 1, ep)
    cfg.trainer.parallel.ep = ep
    backend = build_backend(cfg, rank, ep)
    backend.setup(os.path.join(tmp, hf))
    before = {k: v.clone() for k, v in backend.named_hf_weights()}
    index = list(range(len(mbs)))[backend.dp_rank :: backend.dp_size]
    mine = [mbs[i] for i in index]
    logprobs = dict(zip(index, backend.forward_logprobs(mine), strict=True))
    metrics = backend.train_minibatch(mine, make_loss_fn(cfg.algorithm))
    experts = sum(1 for n, _ in backend.chunks[0].module.named_parameters() if "local_experts" in n and "fc1" in n)
    return {"metrics": metrics, "lp": logprobs, "before": before, "after": dict(backend.named_hf_weights()),
            "local_experts_fc1": experts}  # fmt: skip


def _reference_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    init_dist(rank, world_size, port)
    out = {name: _train_once(tmp, rank, 1, _batch(n), hf) for name, (hf, n) in RUNS.items()}
    out["no_aux"] = _train_once(tmp, rank, 1, _batch(4), "hf_no_aux")["metrics"]
    one = _batch(1)
    out["single"] = _train_once(tmp, rank, 1, one)["metrics"]
    out["twice"] = _train_once(tmp, rank, 1, [_twice(one[0])])["metrics"]
    torch.save(out, os.path.join(tmp, "ref.pt"))


def _ep_worker(rank: int, world_size: int, port: int, tmp: str) -> None:
    init_dist(rank, world_size, port)
    out = {name: _train_once(tmp, rank, 2, _batch(n), hf) for name, (hf, n) in RUNS.items()}
    torch.save(out, os.path.join(tmp, f"ep{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("mep"))
    for name, aux in (("hf", AUX), ("hf_no_aux", 0.0)):
        save_tiny_hf(os.path.join(tmp, name), "qwen3_moe", tie=False, seed=3, router_aux_loss_coef=aux)
    spawn(_reference_worker, 1, tmp, timeout_s=90)
    spawn(_ep_worker, 2, tmp, timeout_s=60)  # ~8 s; EP ranks with unequal micro-batch counts would hang
    return torch.load(os.path.join(tmp, "ref.pt")), [torch.load(os.path.join(tmp, f"ep{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("name", list(RUNS))
def test_ep2_same_loss_and_grad_norm_as_ep1(runs, name):
    ref, ranks = runs
    want = ref[name]["metrics"]
    assert want["grad_norm"] > 0.05 and abs(want["loss"]) > 1e-3
    assert ref[name]["local_experts_fc1"] == 2 * 4  # 4 experts in each of 2 layers ...
    for r in ranks:
        assert r[name]["local_experts_fc1"] == 2 * 2  # ... split 2 + 2 over the EP ranks
        got = r[name]["metrics"]
        assert abs(got["loss"] - want["loss"]) < 1e-6
        assert abs(got["grad_norm"] - want["grad_norm"]) < 1e-6 * max(1.0, want["grad_norm"])
        for k in ("pg_loss", "clipfrac_upper", "clipfrac_lower", "approx_kl", "entropy", "ratio_mean"):
            assert abs(got[k] - want[k]) < 1e-5, k


@pytest.mark.parametrize("name", list(RUNS))
def test_ep2_forward_logprobs_match(runs, name):
    ref, ranks = runs
    seen = set()
    for r in ranks:
        for i, lp in r[name]["lp"].items():
            assert (lp - ref[name]["lp"][i]).abs().max() < 1e-5
            seen.add(i)
    assert seen == set(range(RUNS[name][1]))


@pytest.mark.parametrize("name", list(RUNS))
def test_ep2_updates_every_expert_like_ep1(runs, name):
    ref, ranks = runs
    assert not ranks[1][name]["after"]  # rank 0 is the only sync source; it gathers rank 1's experts
    after = ranks[0][name]["after"]
    assert sum(".mlp.experts." in n for n in after) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    assert_same_update(ranks[0][name]["before"], after, ref[name]["before"], ref[name]["after"], lr=1e-2)


def test_load_balancing_loss_is_a_token_weighted_mean(runs):
    ref, _ = runs
    with_aux, without = ref["aux"]["metrics"], ref["no_aux"]
    assert abs(with_aux["loss"] - without["loss"]) < 1e-7  # the reported loss is the DAPO loss ...
    assert abs(with_aux["grad_norm"] - without["grad_norm"]) > 1e-3  # ... the aux term changes the gradient
    single, twice = ref["single"], ref["twice"]
    assert abs(single["loss"] - twice["loss"]) < 1e-6
    # Megatron multiplies each micro-batch's aux loss by its token count; unnormalised, doubling the rows doubled it.
    assert abs(single["grad_norm"] - twice["grad_norm"]) < 1e-5 * single["grad_norm"]
