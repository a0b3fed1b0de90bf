"""RolloutManager with simulated engines (pipeline/testing/rollout_sim.py): the staleness bound under adversarial timing,
exact synchrony at s=0, the admission rule's numbers, partial rollouts (resume alignment, abort re-queues),
engine failures and the accounting identity, the prompt queue and resume state."""

import asyncio
import threading
import time

import pytest

from engines.client import GenerateOutput
from pipeline.contracts.records import as_lists
from pipeline.flow.prompt_queue import PromptQueue
from pipeline.flow.rollout import RolloutManager
from pipeline.flow.transport import GroupReceiver
from pipeline.testing.rollout_sim import (
    CORRECT,
    EOS,
    WRONG,
    SimEngineClient,
    SimRewards,
    SimTokenizer,
    run_sim,
    sim_config,
    sim_prompts,
)


def trained_samples(res):
    return [(v, s) for v, groups in zip(res.versions, res.trained, strict=True) for g in groups for s in g.samples]


def assert_healthy(res, cfg, steps):
    B = cfg.trainer.batch_size
    assert [len(b) for b in res.trained] == [B] * steps
    ids = [g.group_id for b in res.trained for g in b]
    assert len(set(ids)) == len(ids)  # nothing trained twice
    assert res.rollout_accounting["balanced"] == 1
    assert res.buffer_accounting["balanced"] == 1, res.buffer_accounting
    assert res.buffer_metrics["filter/drop_stale"] == 0  # the admission rule is exact: nothing had to be dropped


# (engines: per-token seconds, speeds; trainer seconds per step)
SLOW_ENGINES_FAST_TRAINER = dict(per_token_s=0.0004, speeds=[1.0, 4.0], jitter=0.9, train_s=0.0)
FAST_ENGINES_SLOW_TRAINER = dict(per_token_s=0.0001, speeds=[1.0, 1.5], jitter=0.9, train_s=0.04)


@pytest.mark.parametrize("s", [0, 1, 2])
@pytest.mark.parametrize("timing", ["slow_engines", "slow_trainer"])
def test_staleness_bound_holds_under_adversarial_timing(s, timing):
    t = SLOW_ENGINES_FAST_TRAINER if timing == "slow_engines" else FAST_ENGINES_SLOW_TRAINER
    # every partial-rollout mode meets both timings; abort mode with slow engines never runs ahead (each update
    # re-queues all unfinished work), so it is paired with s=0 there
    mode = {"slow_engines": ["abort", "wait", "resume"], "slow_trainer": ["resume", "abort", "wait"]}[timing][s]
    cfg = sim_config(max_staleness=s, partial_rollout=mode, batch_size=3, max_inflight_per_engine=6, seed=s)
    client = SimEngineClient(
        n_engines=2, capacity=6, per_token_s=t["per_token_s"], speeds=t["speeds"], jitter=t["jitter"], seed=s
    )
    steps = 7
    res = run_sim(cfg, client, sim_prompts(60, seed=s), steps=steps, train_s=t["train_s"])
    assert_healthy(res, cfg, steps)
    staleness = [v - smp.min_version for v, smp in trained_samples(res)]
    assert max(staleness) <= s
    if s == 0:  # exactly synchronous: every token of every trained sample comes from the trained version
        assert all(set(smp.versions) == {v} for v, smp in trained_samples(res))
    elif timing == "slow_engines":
        assert max(staleness) >= 1  # the pipeline did run ahead (the test exercises the bound)


@pytest.mark.parametrize("s", [0, 1])
@pytest.mark.parametrize("timing", ["slow_engines", "slow_trainer"])
def test_streamed_minibatches_keep_the_bound(s, timing):
    # The trainer takes each step's batch in 2 parts, training the first while the second generates: the same
    # exact batches, the bound and the accounting hold, and s = 0 stays exactly synchronous.
    t = SLOW_ENGINES_FAST_TRAINER if timing == "slow_engines" else FAST_ENGINES_SLOW_TRAINER
    cfg = sim_config(max_staleness=s, partial_rollout="resume", batch_size=4, num_minibatches=2, seed=s)
    client = SimEngineClient(n_engines=2, per_token_s=t["per_token_s"], speeds=t["speeds"], jitter=t["jitter"])
    res = run_sim(cfg, client, sim_prompts(60, seed=s), steps=6, train_s=t["train_s"])
    assert_healthy(res, cfg, 6)
    assert max(v - smp.min_version for v, smp in trained_samples(res)) <= s
    if s == 0:
        assert all(set(smp.versions) == {v} for v, smp in trained_samples(res))


def test_admission_rule_numbers_without_a_trainer():
    # No batch is consumed: at v=0, s=1, E=2, B=3 exactly (0+1+1)*2*3 = 12 groups may ever be kept or unresolved.
    cfg = sim_config(max_staleness=1, every=2, batch_size=3, dynamic_sampling=False)
    acc = run_manager_alone(cfg, SimEngineClient(per_token_s=0.0001), seconds=0.6)
    assert acc["drawn"] == 12 and acc["pushed"] == 12 and acc["kept"] == 12


def test_filtered_groups_free_capacity():
    # With dynamic sampling, filtered groups do not count: the manager keeps drawing until 2*1*4 = 8 are kept.
    cfg = sim_config(max_staleness=1, batch_size=4)
    acc = run_manager_alone(
        cfg, SimEngineClient(per_token_s=0.0001, p_always_right=0.3, p_always_wrong=0.3), seconds=0.8
    )
    assert acc["kept"] == 8 and acc["pushed"] > 8 and acc["in_flight"] == 0


class GatedEngines:
    """Two engines of 4 slots whose requests end only when the test releases their group, with the first token of
    each sample CORRECT or WRONG as it says: the test decides what the filter keeps and when."""

    def __init__(self) -> None:
        self.urls = ["gate://0", "gate://1"]
        self.gates: dict[str, asyncio.Future] = {}
        self.running = 0

    @property
    def alive_urls(self) -> list[str]:
        return self.urls

    async def generate(self, input_ids, sampling_params, rid=None, return_logprob=True, url=None):
        gate = self.gates.setdefault(rid.split("-")[0], asyncio.get_running_loop().create_future())
        self.running += 1
        try:
            accs = await gate
        finally:
            self.running -= 1
        ids = [CORRECT if accs[int(rid.split("-")[1])] else WRONG, EOS]
        return GenerateOutput(ids, [-0.1, -0.1], "stop", "0", url or self.urls[0], len(input_ids))

    async def abort(self, rid=None, abort_all=False) -> None:
        for gid, gate in self.gates.items():
            if not gate.done() and (abort_all or rid.split("-")[0] == gid):
                gate.cancel()

    def release(self, gid: str, *accs: bool) -> None:
        self.gates[gid].set_result(accs)


async def until(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("over_admission", [0.0, 1.0])
def test_over_admission_fills_the_slots_the_bound_would_leave_idle(over_admission):
    # s=0, B=2: two groups of version 0 can be kept; G=2 and 2 x 4 slots: four groups fill the engines.
    cfg = sim_config(max_staleness=0, batch_size=2, n_samples_per_prompt=2, max_inflight_per_engine=4)
    cfg.rollout.over_admission = over_admission

    async def go():
        rx, client = GroupReceiver(), GatedEngines()
        m = RolloutManager(cfg, client, SimTokenizer(), sim_prompts(20), rx.sender_endpoint, SimRewards())
        task = asyncio.create_task(m.run())
        try:
            await until(lambda: client.running == 4)  # no filter decision yet (keep rate 1): what the bound allows
            await asyncio.sleep(0.05)
            assert client.running == 4 and set(client.gates) == {"g1", "g2"}
            client.release("g1", False, False)  # both filtered: keep rate estimate 1/3
            client.release("g2", False, False)
            expected = 8 if over_admission else 4
            await until(lambda: m.accounting()["pushed"] == 2 and client.running == expected)
            await asyncio.sleep(0.05)  # and no more
            assert client.running == expected
            if over_admission:  # 2 groups with a reservation + 2 over-admitted (cap ceil(1.0 * 2)): engines full
                assert m.stats()["rollout/over_admitted"] == 2
                for gid in ("g3", "g4", "g5"):  # three kept: the first two to finish use the reservations
                    client.release(gid, True, False)
                await until(lambda: m.accounting()["in_flight"] == 0)  # g6 can no longer be kept: cancelled
                assert m.accounting()["kept"] == 2  # exactly what the bound allows at s=0
                assert m.stats()["rollout/requeued_over_admitted"] == 2  # the third one and g6, back at the front
                assert [attempt for _, attempt, _ in m.state_dict()["queue"]["front"]] == [0, 0]  # not an attempt
            else:
                assert m.accounting()["in_flight"] == 2
            assert m.accounting()["balanced"] == 1
        finally:
            await m.stop()
            await task
            rx.close()

    asyncio.run(go())


@pytest.mark.parametrize("timing", ["slow_engines", "slow_trainer"])
def test_over_admission_keeps_the_staleness_bound_and_the_accounting(timing):
    # Half the groups filtered, slots for 4 groups, batches of 2: over-admission runs at its cap all the time.
    t = SLOW_ENGINES_FAST_TRAINER if timing == "slow_engines" else FAST_ENGINES_SLOW_TRAINER
    cfg = sim_config(max_staleness=1, partial_rollout="resume", batch_size=2, max_inflight_per_engine=8)
    cfg.rollout.over_admission = 2.0
    client = SimEngineClient(
        n_engines=2,
        capacity=8,
        per_token_s=t["per_token_s"],
        speeds=t["speeds"],
        jitter=t["jitter"],
        p_always_right=0.25,
        p_always_wrong=0.25,
    )
    res = run_sim(cfg, client, sim_prompts(80), steps=8, train_s=t["train_s"])
    assert_healthy(res, cfg, 8)  # exact batches, nothing twice, both sides balanced, no stale drop
    assert max(v - smp.min_version for v, smp in trained_samples(res)) <= 1
    st = res.rollout_stats
    assert st["rollout/over_admitted"] > 0
    assert st["rollout/speculative_groups"] <= 4  # ceil(2.0 * 2)


def test_resume_keeps_token_version_alignment_and_the_prefix():
    cfg = sim_config(max_staleness=1, partial_rollout="resume", batch_size=2, max_new_tokens=48)
    client = SimEngineClient(n_engines=2, capacity=8, per_token_s=0.003, min_len=20, max_len=80, jitter=0.3)
    res = run_sim(cfg, client, sim_prompts(40), steps=8, train_s=0.01)
    assert_healthy(res, cfg, 8)
    mixed = 0
    for _, smp in trained_samples(res):
        assert len(smp.versions) == len(smp.response_ids) == len(smp.logprobs)
        assert all(a <= b for a, b in zip(smp.versions, smp.versions[1:], strict=False))
        expected = client.expected_response(f"{smp.group_id}-{smp.index}", smp.prompt_ids, 48)
        assert smp.response_ids == expected  # prefix kept, continuation appended where it left off
        assert smp.logprobs == [client.logprob(tok) for tok in expected]
        assert smp.finish_reason == ("length" if client.target_len(f"{smp.group_id}-{smp.index}") > 48 else "stop")
        mixed += len(set(smp.versions)) > 1
    assert mixed > 0  # some trained samples were really resumed across a weight update
    assert res.rollout_stats["rollout/resumed"] > 0


def test_abort_mode_requeues_unfinished_groups():
    cfg = sim_config(max_staleness=1, partial_rollout="abort", batch_size=2, max_new_tokens=48)
    client = SimEngineClient(n_engines=2, capacity=8, per_token_s=0.002, min_len=20, max_len=48)
    res = run_sim(cfg, client, sim_prompts(40), steps=6, train_s=0.01)
    assert_healthy(res, cfg, 6)
    st = res.rollout_stats
    requeued = st["rollout/requeued_weight_update"]
    assert requeued > 0 and st["rollout/requeued"] == requeued + st.get("rollout/requeued_over_admitted", 0)
    for _, smp in trained_samples(res):
        assert len(set(smp.versions)) == 1  # aborted work is never stitched
    assert any(g.attempt > 0 for b in res.trained for g in b)  # re-queued prompts came back and were trained


def test_accounting_holds_through_engine_failures_and_a_dead_engine():
    cfg = sim_config(max_staleness=1, partial_rollout="resume", batch_size=3)
    client = SimEngineClient(n_engines=3, capacity=6, per_token_s=0.0005, fail_prob=0.1, jitter=0.5)

    def kill_one(step, c):
        if step == 2:
            c.kill("sim://engine1")

    res = run_sim(cfg, client, sim_prompts(80), steps=8, train_s=0.01, on_step=kill_one)
    assert_healthy(res, cfg, 8)
    st = res.rollout_stats
    assert st["rollout/engine_failures_engine"] > 0  # simulated transient failures, retried
    assert st["rollout/alive_engines"] == 2
    # the client may fail one more request after the stats snapshot (they are not read under one lock)
    assert st["rollout/engine_failures_engine"] <= client.failed <= st["rollout/engine_failures_engine"] + 3
    b = res.buffer_accounting
    assert b["drawn"] == b["trained"] + b["filtered"] + b["requeued"] + b["in_flight"] + b["buffered"]


def test_all_engines_dead_then_back():
    cfg = sim_config(max_staleness=1, batch_size=2)
    client = SimEngineClient(n_engines=2, capacity=4, per_token_s=0.0005)

    def outage(step, c):
        if step == 2:
            for u in list(c.urls):
                c.kill(u)
            threading.Timer(0.3, c.dead.clear).start()  # the orchestrator restarts them

    res = run_sim(cfg, client, sim_prompts(40), steps=5, train_s=0.0, on_step=outage)
    assert_healthy(res, cfg, 5)
    assert res.rollout_stats["rollout/engine_failures_engine_dead"] > 0


def test_prompts_past_max_gen_rounds_are_given_up_and_counted():
    cfg = sim_config(max_staleness=0, batch_size=2, max_gen_rounds=1)
    acc = run_manager_alone(cfg, SimEngineClient(per_token_s=0.0001, fail_prob=1.0), seconds=0.6, retries=0)
    assert acc["pushed"] == 0 and acc["gave_up"] > 0 and acc["requeued"] > 0
    assert acc["drawn"] == acc["requeued"] + acc["gave_up"] + acc["in_flight"]
    # each prompt is re-queued once (max_gen_rounds=1 regeneration), then given up; at most the budget of
    # (0+0+1)*1*2 = 2 second attempts can be under way when the manager stops
    assert 0 <= acc["requeued"] - acc["gave_up"] <= 2


def test_prompt_queue_epochs_shuffle_requeue_and_state():
    prompts = sim_prompts(5)
    q = PromptQueue(prompts, seed=3)
    first = [q.draw() for _ in range(5)]
    assert sorted(p.prompt_id for p in first) == [f"p{i}" for i in range(5)] and {p.epoch for p in first} == {0}
    assert [p.prompt_id for p in first] != [f"p{i}" for i in range(5)]  # shuffled (seed 3)
    second = [q.draw() for _ in range(2)]
    assert {p.epoch for p in second} == {1}
    q.push_front([first[0], first[1]])  # re-queued together: drawn next, in this order
    state = q.state_dict()
    again = PromptQueue(prompts, seed=99)
    again.load_state_dict(state)
    a = [(p.prompt_id, p.epoch) for p in (q.draw() for _ in range(8))]
    b = [(p.prompt_id, p.epoch) for p in (again.draw() for _ in range(8))]
    assert a == b and a[:2] == [(first[0].prompt_id, 0), (first[1].prompt_id, 0)]
    assert PromptQueue(prompts, seed=3).draw().prompt_id == first[0].prompt_id  # same seed, same order
    with pytest.raises(ValueError, match="5 prompts, this dataset has 4"):
        PromptQueue(prompts[:4]).load_state_dict(state)


def test_state_dict_requeues_in_flight_prompts_on_load():
    cfg = sim_config(max_staleness=1, batch_size=2, max_new_tokens=64)
    client = SimEngineClient(per_token_s=0.01, min_len=60, max_len=64)  # slow: groups stay in flight

    async def go():
        rx = GroupReceiver()
        m = RolloutManager(cfg, client, SimTokenizer(), sim_prompts(30), rx.sender_endpoint, SimRewards())
        task = asyncio.create_task(m.run())
        await asyncio.sleep(0.2)
        state = m.state_dict()
        await m.stop()
        await task
        m2 = RolloutManager(cfg, client, SimTokenizer(), sim_prompts(30), rx.sender_endpoint, SimRewards())
        m2.load_state_dict(state)
        rx.close()
        return state, m2

    state, m2 = asyncio.run(go())
    n = state["in_flight"]
    assert n > 0
    acc = m2.accounting()
    assert acc["requeued"] == n and acc["in_flight"] == 0 and acc["balanced"] == 1
    redrawn = [m2.queue.draw().prompt_id for _ in range(n)]
    assert redrawn == [pid for pid, _, _ in state["queue"]["front"][:n]]


def run_manager_alone(cfg, client, seconds: float, retries: int = 3) -> dict:
    async def go():
        rx = GroupReceiver()
        m = RolloutManager(
            cfg, client, SimTokenizer(), sim_prompts(200), rx.sender_endpoint, SimRewards(), max_request_retries=retries
        )
        task = asyncio.create_task(m.run())
        await asyncio.sleep(seconds)
        await m.stop()
        await task
        rx.close()
        return m.accounting()

    t0 = time.monotonic()
    acc = asyncio.run(go())
    assert time.monotonic() - t0 < seconds + 10
    assert acc["balanced"] == 1
    return acc


# ---------------------------------------------------------------------------------------------- a real engine
@pytest.fixture(scope="module")
def local_engine():
    """The CPU engine (engines/local) served over HTTP from a thread of this process (no subprocess start-up),
    with a tiny random model; a second copy of the same model is the reference for logprobs."""
    import torch
    from aiohttp import web

    from engines.local.engine import Engine
    from engines.local.server import LocalServer
    from pipeline.testing.tiny_models import build_tiny_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model_kw = dict(init_std=0.02, max_position=1024)
    engine = Engine(build_tiny_model(0, **model_kw), max_running=16).start()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def serve():
        runner = web.AppRunner(LocalServer(engine, "tiny").app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    runner, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(30)
    yield f"http://127.0.0.1:{port}", build_tiny_model(0, **model_kw)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    engine.stop()
    torch.set_num_threads(before)


def test_real_engine_resume_across_a_version_change(local_engine):
    """Real EngineClient + local engine + RewardRunner: a rollout aborted mid-generation and resumed after the
    engine's weight version changed keeps per-token versions aligned, and every logprob (prefix and continuation)
    is the model's own logprob of that token given prompt + everything before it."""
    from engines.client import EngineClient
    from pipeline.contracts.records import Prompt
    from pipeline.flow.buffer import RolloutBuffer
    from pipeline.flow.rewards import RewardRunner
    from pipeline.testing.tiny_models import char_tokenizer, teacher_forced_logprobs

    url, ref = local_engine
    tok = char_tokenizer()
    cfg = sim_config(max_staleness=1, partial_rollout="resume", batch_size=2, dynamic_sampling=False, soft_punish=True)
    cfg.rollout.n_samples_per_prompt, cfg.rollout.max_new_tokens, cfg.rollout.max_inflight_per_engine = 2, 400, 4
    cfg.algorithm.overlong.cache_len = 32
    prompts = [
        Prompt(prompt_id=f"q{i}", prompt_ids=tok.encode(f"What is {i}+{i}? "), answer=str(2 * i)) for i in range(4)
    ]

    async def go():
        client = EngineClient([url], timeout_s=60)
        buffer = RolloutBuffer(GroupReceiver(), 2, 1, 8)
        rewards = RewardRunner("pipeline.flow.rewards:dapo_math_reward", 5.0, 1)
        m = RolloutManager(cfg, client, tok, prompts, buffer.address, rewards)
        task = asyncio.create_task(m.run())
        try:
            while m.stats()["rollout/inflight"] == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # a few tokens into responses of up to 400 (the random model rarely ends)
            await m.before_weight_update()
            await client.update_weight_version(url, "1")
            await m.after_weight_update(1)
            batch = [as_lists(g) for g in await asyncio.to_thread(buffer.get_batch, 1, 120.0)]  # arrays -> lists
            stats = m.stats()
        finally:
            await m.stop()
            await task
            await client.close()
            rewards.close()
            buffer.close()
        return batch, stats

    batch, stats = asyncio.run(go())
    assert stats["rollout/resumed"] > 0
    samples = [smp for g in batch for smp in g.samples]
    assert any(set(smp.versions) == {0, 1} for smp in samples)
    for smp in samples:
        assert len(smp.versions) == len(smp.response_ids) == len(smp.logprobs) > 0
        assert smp.versions == sorted(smp.versions)
        expected = teacher_forced_logprobs(ref, smp.prompt_ids, smp.response_ids)
        assert smp.logprobs == pytest.approx(expected, abs=2e-3)
        # DAPO overlong shaping, L_max 400, L_cache 32: 0 up to 368 tokens, a linear ramp to -1, -1 if truncated
        n = smp.response_len
        penalty = -1.0 if smp.finish_reason == "length" else min(0.0, (368 - n) / 32)
        assert smp.reward == pytest.approx(smp.task_reward + penalty)
        assert smp.task_reward == -1.0 and not smp.acc  # a random model does not write "Answer: 2"
