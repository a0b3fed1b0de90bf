"""MoE rollout routing replay (R3) on CPU with a tiny Qwen3-MoE (4 experts, top-2, 2 layers).

The CPU engine (engines/local, in-process) generates from the "engine" checkpoint, whose routers have a tie between
experts 0 and 1 (the same gate row), and records the experts of every fed token. The megatron trainer loads a
copy whose expert-1 gate row is perturbed by ~1e-6: the perturbation decides the tie, so the trainer's own top-k
flips for many tokens while its router logits move by ~1e-5 only. With replay its logprobs of the sampled tokens
equal the engine's to fp32 precision (the gate weights still come from its own logits); without replay they do not.
Also: the old-logprob pass (forward_logprobs) replays; full recomputation replays the first forward's routing;
EP=2 equals EP=1 with replay; the metrics; the routing survives packing (and CP splitting)."""

from __future__ import annotations

import os

import pytest
import torch

from engines.megatron.launch import init_dist, spawn
from engines.packing import pack_micro_batch, padded_micro_batch
from pipeline.contracts.backend import MicroBatch
from pipeline.testing.megatron import save_tiny_hf
from pipeline.testing.moe import megatron_backend, micro_batch, rollout, single_worker, train_step

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24, 25, 26, 27], [31, 32, 33, 34]]
NEW_TOKENS = 10
PERTURB = 1e-6


def _tie_routers(model: torch.nn.Module, perturb: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w[1] = w[0] + perturb * torch.randn(w.shape[1], generator=g)


def _rollout(model: torch.nn.Module) -> list[dict]:
    return rollout(model, PROMPTS, NEW_TOKENS, max_running=2, timeout_s=60)


def _ep_worker(rank: int, world_size: int, port: int, tmp: str, ep: int, pp: int = 1) -> None:
    init_dist(rank, world_size, port)
    samples = torch.load(os.path.join(tmp, "samples.pt"))
    mbs = [micro_batch(samples[:2]), micro_batch(samples[2:])]
    backend, cfg = megatron_backend(tmp, rank, world_size, ep=ep, pp=pp)
    mine = mbs[backend.dp_rank :: backend.dp_size]
    out = {"lp": backend.forward_logprobs(mine), **train_step(backend, cfg, mine)}
    torch.save(out, os.path.join(tmp, f"ep{ep}_pp{pp}_{rank}.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("r3"))
    engine_model = save_tiny_hf(os.path.join(tmp, "engine"), "qwen3_moe", tie=False, seed=1, router_aux_loss_coef=0.01)
    _tie_routers(engine_model, 0.0, 0)
    engine_model.save_pretrained(os.path.join(tmp, "engine"))
    trainer_model = save_tiny_hf(os.path.join(tmp, "trainer"), "qwen3_moe", tie=False, seed=1,
                                 router_aux_loss_coef=0.01)  # fmt: skip
    _tie_routers(trainer_model, PERTURB, 0)
    trainer_model.save_pretrained(os.path.join(tmp, "trainer"))
    samples = _rollout(engine_model)
    torch.save(samples, os.path.join(tmp, "samples.pt"))
    spawn(single_worker, 1, tmp, timeout_s=120)
    spawn(_ep_worker, 1, tmp, 1, timeout_s=60)
    spawn(_ep_worker, 2, tmp, 2, timeout_s=60)
    spawn(_ep_worker, 2, tmp, 1, 2, timeout_s=60)
    results = {"single": torch.load(os.path.join(tmp, "single.pt"))}
    for name in ("ep1_pp1_0", "ep2_pp1_0", "ep2_pp1_1", "ep1_pp2_0", "ep1_pp2_1"):
        results[name] = torch.load(os.path.join(tmp, f"{name}.pt"))
    return samples, results


def test_engine_records_every_fed_token(runs):
    samples, _ = runs
    for s in samples:
        r = s["routing"]
        assert r.dtype == torch.int32 and tuple(r.shape) == (len(s["prompt"]) + NEW_TOKENS - 1, 2, 2)
        assert ((r >= 0) & (r < 4)).all() and (r[..., 0] != r[..., 1]).all()  # top-2 distinct experts


def test_replay_matches_engine_logprobs_and_without_it_they_do_not(runs):
    samples, results = runs
    mb = micro_batch(samples)
    m = mb.loss_mask.bool()
    replay = (results["single"]["lp_replay"] - mb.old_logprobs)[m].abs()
    own = (results["single"]["lp_own"] - mb.old_logprobs)[m].abs()
    assert replay.max() < 2e-5, replay.max()
    assert own.max() > 1e-2, own.max()  # top-k flips changed experts on some tokens
    metrics = results["single"]["step"]["metrics"]
    assert metrics["moe/routing_mismatch"] > 0.05  # the perturbation flipped many (token, layer) routes
    assert 0 < metrics["moe/routing_mismatch"] <= metrics["moe/routing_mismatch_tokens"] <= 1
    assert metrics["rollout/logprob_abs_diff"] == pytest.approx(float(replay.mean()), abs=1e-6)
    assert metrics["rollout/logprob_abs_diff_replay"] == metrics["rollout/logprob_abs_diff"]
    assert metrics["rollout/logprob_abs_diff_noreplay"] == pytest.approx(float(own.mean()), rel=1e-4)
    assert metrics["rollout/kl_k3_noreplay"] > 100 * metrics["rollout/kl_k3_replay"] >= 0
    off = results["single"]["step_off"]["metrics"]  # replay off: the training forward is the trainer's own routing
    assert off["rollout/logprob_abs_diff"] == pytest.approx(float(own.mean()), rel=1e-4)
    # Without replay a flip also changes the next layers' inputs: the share differs from replay's (where each layer
    # is compared on the engine's upstream routing) but is of the same kind.
    assert off["moe/routing_mismatch"] > 0.05


def test_replay_under_full_recomputation(runs):
    """The checkpointed layers' recomputation replays the first forward's routing: same step as without it."""
    _, results = runs
    a, b = results["single"]["step"], results["single"]["step_recompute"]
    assert len(a["after"]) > 10 and set(a["after"]) == set(b["after"])
    assert a["metrics"]["grad_norm"] == pytest.approx(b["metrics"]["grad_norm"], rel=1e-5)
    for name, w in a["after"].items():
        assert torch.allclose(w, b["after"][name], atol=1e-6), name
    off = results["single"]["step_off"]
    assert abs(off["metrics"]["grad_norm"] - a["metrics"]["grad_norm"]) > 1e-4  # replay changed the gradient


def test_ep2_equals_ep1_with_replay(runs):
    _, results = runs
    ref = results["ep1_pp1_0"]
    for rank in (0, 1):
        got = results[f"ep2_pp1_{rank}"]
        assert torch.allclose(got["lp"][0], ref["lp"][rank], atol=1e-5)
    for key in ("grad_norm", "moe/routing_mismatch", "rollout/logprob_abs_diff", "rollout/logprob_abs_diff_noreplay"):
        assert results["ep2_pp1_0"]["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-4, abs=1e-7), key
    for name, w in ref["after"].items():
        assert torch.allclose(w, results["ep2_pp1_0"]["after"][name], atol=1e-5), name


def test_pp2_equals_pp1_with_replay(runs):
    """Two pipeline stages (one MoE layer each): the same logprobs and step; the mismatch counts of both stages'
    layers are summed (the per-token share is the largest stage's, a lower bound)."""
    _, results = runs
    ref = results["ep1_pp1_0"]
    for rank in (0, 1):
        got = results[f"ep1_pp2_{rank}"]
        for lp, want in zip(got["lp"], ref["lp"], strict=True):
            assert torch.allclose(lp, want, atol=1e-5)
        m = got["metrics"]
        for key in ("grad_norm", "moe/routing_mismatch", "rollout/logprob_abs_diff", "rollout/kl_k3_noreplay"):
            assert m[key] == pytest.approx(ref["metrics"][key], rel=1e-4, abs=1e-7), key
        assert 0 < m["moe/routing_mismatch_tokens"] <= ref["metrics"]["moe/routing_mismatch_tokens"]


def test_routing_survives_packing():
    g = torch.Generator().manual_seed(0)
    B, T, L, k = 3, 9, 2, 2
    lengths = [9, 4, 6]
    ids = torch.randint(1, 50, (B, T), generator=g)
    att = (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).long()
    routes = torch.randint(0, 4, (B, T, L, k), generator=g, dtype=torch.int16) * att[..., None, None] - (1 - att)[
        ..., None, None
    ].to(torch.int16)
    z = torch.zeros(B, T)
    mb = MicroBatch(ids * att, att, torch.arange(T).expand(B, T), z, z, z, routed_experts=routes)
    packed = pack_micro_batch(mb, torch.device("cpu"), pad_to=30)
    assert packed.routed_experts.shape == (30, L, k)
    rows = torch.cat([routes[b, :n] for b, n in enumerate(lengths)])
    assert torch.equal(packed.routed_experts[: sum(lengths)], rows.long())
    assert (packed.routed_experts[sum(lengths) :] == -1).all()  # the pipeline pad segment routes itself
    # Context parallelism: each rank's share is the routing of the tokens it holds.
    for r in range(2):
        part = pack_micro_batch(mb, torch.device("cpu"), cp=2, cp_rank=r)
        full = pack_micro_batch(mb, torch.device("cpu"), cp=2, cp_rank=r)
        idx = part.cp_indices[r]
        assert part.routed_experts.shape[0] == part.input_ids.shape[1] == idx.numel()
        whole = torch.full((full.total_len, L, k), -1, dtype=torch.long)
        bounds = full.cu_seqlens_padded.tolist()
        for b, n in enumerate(lengths):
            whole[bounds[b] : bounds[b] + n] = routes[b, :n].long()
        assert torch.equal(part.routed_experts, whole[idx])
    # The padded layout: megatron's [s, b] order.
    padded = padded_micro_batch(mb, torch.device("cpu"))
    assert torch.equal(padded.routed_experts.view(T, B, L, k), routes.long().transpose(0, 1))


def test_config_field_and_preset():
    from pathlib import Path

    from pipeline.config import ROUTED_EXPERTS_FLAG, Config, ConfigError, load_config, validate

    assert Config().algorithm.routing_replay == "off"
    preset = str(Path(__file__).resolve().parents[1] / "configs" / "qwen3-30b-a3b-moe.yaml")
    moe = load_config(preset)
    assert moe.algorithm.routing_replay == "rollout"
    assert moe.engine.extra_args.count(ROUTED_EXPERTS_FLAG) == 1  # derived: the engines must return routes
    assert validate(moe).engine.extra_args.count(ROUTED_EXPERTS_FLAG) == 1
    off = load_config(preset, ["algorithm.routing_replay=off"])
    assert ROUTED_EXPERTS_FLAG not in off.engine.extra_args
    moe.algorithm.routing_replay = "on"
    with pytest.raises(ConfigError, match="algorithm.routing_replay"):
        validate(moe)


def test_cpu_engine_takes_per_expert_checkpoint_names():
    """Weight sync sends HF checkpoint names (experts.{e}.gate_proj.weight, ...); transformers keeps the experts fused:
    the CPU engine writes them into the fused tensors in place."""
    from engines.local.engine import Engine
    from pipeline.testing.tiny_models import build_tiny_model

    model = build_tiny_model(seed=0, model_type="qwen3_moe")
    engine = Engine(model)
    fused = model.model.layers[1].mlp.experts
    inter = fused.gate_up_proj.shape[1] // 2
    g, u, d = (
        torch.randn_like(t) for t in (fused.gate_up_proj[2, :inter], fused.gate_up_proj[2, inter:], fused.down_proj[2])
    )
    names = [f"model.layers.1.mlp.experts.2.{k}_proj.weight" for k in ("gate", "up", "down")]
    assert engine.check_tensors([(n, t.shape) for n, t in zip(names, (g, u, d), strict=True)]) == []
    engine.load_tensors(list(zip(names, (g, u, d), strict=True)))
    assert torch.equal(fused.gate_up_proj[2], torch.cat([g, u])) and torch.equal(fused.down_proj[2], d)


# ------------------------------------------------------------------ plumbing: rollout -> sample -> transport -> collate
def _group_with_routes():
    import numpy as np

    from pipeline.contracts.records import Group, Sample

    rng = np.random.default_rng(0)
    samples = []
    for i, (p, r) in enumerate([(3, 4), (5, 2), (2, 6)]):
        routes = rng.integers(0, 4, (p + r - 1, 2, 2)).astype(np.int16)
        samples.append(
            Sample(prompt_id="p", group_id="g", index=i, prompt_ids=list(range(1, p + 1)),
                   response_ids=list(range(10, 10 + r)), logprobs=[-1.0] * r, versions=[0] * r,
                   **({"routed_experts": routes.tobytes(), "routed_layers": 2, "routed_topk": 2} if i != 1 else {}))
        )  # fmt: skip
    return Group(prompt_id="p", group_id="g", samples=samples)


def test_routing_survives_transport_and_collate():
    from pipeline.flow.trainer import _collate, _Row
    from pipeline.flow.transport import decode_group, encode_group

    group = _group_with_routes()
    frames = encode_group(group)
    for arrays in (True, False):
        got = decode_group(frames[1], arrays=arrays)
        for a, b in zip(group.samples, got.samples, strict=True):
            assert (a.routing() is None) == (b.routing() is None)
            if a.routing() is not None:
                assert (a.routing() == b.routing()).all() and b.routing().dtype.name == "int16"
    got = decode_group(frames[1], arrays=True)
    mb = _collate([_Row(s, 1.0, True) for s in got.samples], 10.0, 3.0, 8)
    assert mb.routed_experts.dtype == torch.int16 and mb.routed_experts.shape == (3, 8, 2, 2)
    for i, s in enumerate(got.samples):
        n = s.prompt_len + s.response_len
        if s.routing() is None:
            assert (mb.routed_experts[i] == -1).all()  # the trainer routes an unrecorded sample itself
        else:
            assert torch.equal(mb.routed_experts[i, : n - 1], torch.from_numpy(s.routing().copy()))
            assert (mb.routed_experts[i, n - 1 :] == -1).all()  # the last token was never fed; padding
    dense = _collate([_Row(group.samples[1], 1.0, True)], 1.0, 1.0, 8)
    assert dense.routed_experts is None


def test_real_engine_resume_keeps_each_tokens_routing(tmp_path):
    """Rollout manager + EngineClient + the CPU engine serving a tiny Qwen3-MoE with routed experts: a rollout
    aborted mid-generation and resumed (prompt + prefix, routed_experts_start_len = the prefix's last token) ends
    with one record per fed token, each the experts a full forward of the sample routes that token to."""
    import asyncio
    import time

    from aiohttp import web
    from transformers import AutoModelForCausalLM

    from engines.client import EngineClient
    from engines.local.engine import Engine
    from engines.local.routing import RouteRecorder
    from engines.local.server import LocalServer
    from pipeline.contracts.records import Prompt
    from pipeline.flow.buffer import RolloutBuffer
    from pipeline.flow.rewards import RewardRunner
    from pipeline.flow.rollout import RolloutManager
    from pipeline.flow.transport import GroupReceiver
    from pipeline.testing.rollout_sim import sim_config
    from pipeline.testing.tiny_models import char_tokenizer, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "moe", seed=0, model_type="qwen3_moe", max_position=1024, init_std=0.02)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = Engine(model, max_running=8).start()
    tok = char_tokenizer()
    cfg = sim_config(max_staleness=1, partial_rollout="resume", batch_size=2, dynamic_sampling=False)
    cfg.rollout.n_samples_per_prompt, cfg.rollout.max_new_tokens, cfg.rollout.max_inflight_per_engine = 2, 48, 4
    cfg.algorithm.routing_replay, cfg.model.path = "rollout", str(model_dir)
    prompts = [Prompt(prompt_id=f"q{i}", prompt_ids=tok.encode(f"What is {i}+{i}? "), answer="0") for i in range(4)]

    async def go():
        runner = web.AppRunner(LocalServer(engine, "moe", enable_return_routed_experts=True).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        client = EngineClient([url], timeout_s=60)
        buffer = RolloutBuffer(GroupReceiver(), 2, 1, 8)
        rewards = RewardRunner("pipeline.flow.rewards:dapo_math_reward", 5.0, 1)
        m = RolloutManager(cfg, client, tok, prompts, buffer.address, rewards)
        task = asyncio.create_task(m.run())
        try:
            deadline = time.monotonic() + 60
            while not any(len(r.output_ids) >= 4 for lane in engine.lanes for r in lane.running):  # prefixes exist
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await m.before_weight_update()
            await client.update_weight_version(url, "1")
            await m.after_weight_update(1)
            batch = await asyncio.to_thread(buffer.get_batch, 1, 120.0)
            stats = m.stats()
        finally:
            await m.stop()
            await task
            await client.close()
            rewards.close()
            buffer.close()
            await runner.cleanup()
        return batch, stats

    try:
        batch, stats = asyncio.run(go())
    finally:
        engine.stop()
    assert stats["rollout/resumed"] > 0
    samples = [s for g in batch for s in g.samples]
    assert any(set(s.versions.tolist()) == {0, 1} for s in samples)  # resumed across the version change
    rec = RouteRecorder(model)
    for s in samples:
        ids = list(s.prompt_ids) + list(s.response_ids)
        routes = s.routing()
        assert routes is not None and routes.shape == (len(ids) - 1, 2, 2)
        with torch.no_grad():
            model(input_ids=torch.tensor([ids[:-1]]))
        assert (torch.from_numpy(routes.astype("int32")) == rec.take(1, len(ids) - 1)[0]).all()
    rec.remove()
