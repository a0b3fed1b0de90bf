"""The shared trainer step on the torch backend: batch building, one optimizer step, DP=2 (FSDP2, gloo) == DP=1."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Qwen2Config, Qwen2ForCausalLM

from engines.fsdp.backend import build_backend
from engines.megatron.launch import init_dist, rank_main, rendezvous
from pipeline.config import load_config
from pipeline.contracts.records import Group, Sample
from pipeline.flow.trainer import TrainWorker, make_step_batches, merge_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_dir(tmp_path) -> str:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    path = str(tmp_path / "model")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def _cfg(**over):
    o = [f"{k}={v}" for k, v in over.items()]
    return load_config(os.path.join(ROOT, "configs/tiny-cpu.yaml"), o)


def _groups(n_groups=2, g=4, seed=0) -> list[Group]:
    rng = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n_groups):
        samples = []
        for j in range(g):
            p = int(torch.randint(2, 6, (1,), generator=rng))
            r = int(torch.randint(1, 8, (1,), generator=rng))
            samples.append(
                Sample(
                    prompt_id=f"p{i}",
                    group_id=f"g{i}",
                    index=j,
                    prompt_ids=torch.randint(1, 64, (p,), generator=rng).tolist(),
                    response_ids=torch.randint(1, 64, (r,), generator=rng).tolist(),
                    logprobs=(-torch.rand(r, generator=rng) * 3).tolist(),
                    versions=[0] * r,
                    reward=float(j % 2),
                    acc=bool(j % 2),
                    max_new_tokens=32,
                )
            )
        groups.append(Group(prompt_id=f"p{i}", group_id=f"g{i}", samples=samples))
    return groups


def test_step_batches_layout():
    cfg = _cfg(**{"trainer.batch_size": 2, "rollout.n_samples_per_prompt": 4, "trainer.micro_batch_size": 2})
    groups = _groups()
    out = make_step_batches(groups, cfg, dp_size=2)
    assert len(out) == 1 and len(out[0]) == 2  # one mini-batch, two DP ranks
    mbs = [mb for rank in out[0] for mb in rank]
    assert all(mb.input_ids.shape[0] == 2 for mb in mbs)  # micro_batch_size samples each
    total = sum(s.response_len for g in groups for s in g.samples)
    assert sum(float(mb.loss_mask.sum()) for mb in mbs) == total
    assert all(mb.global_tokens == total and mb.global_seqs == 8 for mb in mbs)
    # GRPO advantages: rewards 0,1,0,1 -> mean .5, unbiased std .57735 -> +-0.866
    adv = {round(float(v), 3) for mb in mbs for v in mb.advantages[mb.loss_mask.bool()]}
    assert adv == {0.866, -0.866}
    # behaviour logprobs land on the response positions, aligned with their tokens
    s = groups[0].samples[0]
    for mb in mbs:
        for row in range(mb.input_ids.shape[0]):
            n = s.prompt_len + s.response_len
            if mb.input_ids[row, :n].tolist() == s.prompt_ids + s.response_ids:
                assert torch.allclose(mb.old_logprobs[row, s.prompt_len : n], torch.tensor(s.logprobs))


def test_single_rank_step_lowers_the_loss(tmp_path):
    cfg = _cfg(
        **{
            "trainer.batch_size": 2,
            "rollout.n_samples_per_prompt": 4,
            "trainer.micro_batch_size": 4,
            "trainer.lr": 1e-3,
            "trainer.warmup_steps": 0,
        }
    )
    backend = build_backend(cfg, 0, 1)
    backend.setup(_model_dir(tmp_path))
    worker = TrainWorker(cfg, backend)
    mbs = make_step_batches(_groups(), cfg, 1)[0][0]

    def batch_loss() -> float:
        lps = backend.forward_logprobs(mbs)
        return sum(float(worker.loss_fn(lp, torch.zeros_like(lp), mb)[0]) for lp, mb in zip(lps, mbs, strict=True))

    before = batch_loss()
    m = worker.train_step([mbs])
    assert m["grad_norm"] > 0 and m["lr"] == pytest.approx(1e-3)
    assert m["pg_loss"] == pytest.approx(before, rel=1e-4, abs=1e-6)  # the step's metric is the batch loss
    assert batch_loss() < before


def test_streamed_minibatches_equal_the_whole_step(tmp_path):
    # The loop's streaming (pipeline/runtime/train.py): a step's batch in parts of B / n groups, each trained as its own
    # mini-batch as it arrives, makes the same updates and metrics as the step on the whole batch.
    cfg = _cfg(
        **{
            "trainer.batch_size": 4,
            "trainer.num_minibatches": 2,
            "rollout.n_samples_per_prompt": 4,
            "trainer.micro_batch_size": 4,
            "trainer.lr": 1e-2,
            "trainer.warmup_steps": 0,
        }
    )
    model_dir, groups = _model_dir(tmp_path), _groups(n_groups=4)
    results = []
    for streamed in (False, True):
        backend = build_backend(cfg, 0, 1)
        backend.setup(model_dir)
        worker = TrainWorker(cfg, backend)
        initial = {k: v.clone() for k, v in backend.named_hf_weights()}
        if streamed:
            parts = [make_step_batches(p, cfg, 1, num_minibatches=1)[0][0] for p in (groups[:2], groups[2:])]
            m = merge_metrics([worker.train_minibatch(mbs) for mbs in parts])
        else:
            m = worker.train_step([mini[0] for mini in make_step_batches(groups, cfg, 1)])
            del m["step_seconds"]
        results.append((m, {k: v.clone() for k, v in backend.named_hf_weights()}))
    (m0, w0), (m1, w1) = results
    assert m0 == m1 and m0["local_tokens"] == sum(s.prompt_len + s.response_len for g in groups for s in g.samples)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w1[k], v) for k, v in initial.items())  # it trained


def run_ranks(worker, world: int, model_dir: str):
    """`worker(rank, world, port, model_dir, q)` on `world` spawned gloo ranks (through `rank_main`, which ends each
    without finalizing the interpreter); what rank 0 put on the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    store = rendezvous()  # held until the ranks have joined
    procs = [ctx.Process(target=rank_main, args=(r, worker, world, store.port, model_dir, q)) for r in range(world)]
    for p in procs:
        p.start()
    result = q.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return result


def _dp_worker(rank, world, port, model_dir, q):
    import torch.distributed as dist

    init_dist(rank, world, port)  # 1 thread, the rendezvous the parent holds
    cfg = _cfg(
        **{
            "trainer.batch_size": 2,
            "rollout.n_samples_per_prompt": 4,
            "trainer.micro_batch_size": 2,
            "trainer.world_size": world,
            "trainer.lr": 1e-2,
            "trainer.warmup_steps": 0,
        }
    )
    backend = build_backend(cfg, rank, world)
    backend.setup(model_dir)
    worker = TrainWorker(cfg, backend)
    batches = make_step_batches(_groups(), cfg, world)
    m = worker.train_step([batches[0][rank]])
    weights = {k: v.float().numpy().copy() for k, v in backend.named_hf_weights()}  # numpy: no fd sharing
    if rank == 0:
        q.put((m["grad_norm"], m["pg_loss"], weights))
    dist.destroy_process_group()


def test_dp2_matches_dp1(tmp_path):
    model_dir = _model_dir(tmp_path)
    results = [run_ranks(_dp_worker, world, model_dir) for world in (1, 2)]
    (g1, l1, w1), (g2, l2, w2) = results
    assert g1 == pytest.approx(g2, rel=1e-5)
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-7)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(
            torch.from_numpy(w1[k]), torch.from_numpy(w2[k]), rtol=1e-5, atol=2e-5
        )  # Adam amplifies 1e-9 grad noise where v ~ 0
