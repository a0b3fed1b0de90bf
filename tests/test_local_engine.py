"""The CPU engine (engines/local) as a subprocess on a free port, driven over SGLang's HTTP protocol.

One engine per module (startup amortised); references come from the same saved model loaded here with
transformers: teacher-forced logprobs and cache-free greedy decoding.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import aiohttp
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from engines.client import EngineClient, EngineError
from engines.local.engine import Engine, Request
from engines.local.sampling import SamplingParams
from engines.process import free_port, launch_engine
from pipeline.config import EngineConfig
from pipeline.contracts.weight_wire import (
    create_sync_group,
    dtype_name,
    encode_named_tensors,
    flatten_bucket,
    weights_checksum,
)
from pipeline.testing.tiny_models import (
    build_tiny_model,
    reference_greedy,
    save_tiny_model,
    teacher_forced_logprobs,
)

KEY = "test-key-123"
MODEL = dict(init_std=0.3, max_position=2048)
PROMPTS = [[5, 6, 7], [40, 41, 42, 43], [10], [20, 30, 40, 50, 60, 70, 80]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """References run here while the engine computes in a subprocess: two OpenMP threads each on 2 shared cores
    slow everything down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_engine")
    model_dir = save_tiny_model(root / "model", seed=0, **MODEL)
    cfg = EngineConfig(backend="local", api_key=KEY, startup_timeout_s=90, max_running_requests=16, threads=1)
    proc = launch_engine(cfg, str(model_dir), free_port(), root / "engine.log")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yield SimpleNamespace(url=proc.url, proc=proc, dir=model_dir, ref=ref)
    proc.stop()


def run(coro):
    return asyncio.run(coro)


async def _with_client(url, fn):
    client = EngineClient([url], api_key=KEY, backoff_s=0.05)
    try:
        return await fn(client)
    finally:
        await client.close()


def greedy(n: int, **extra) -> dict:
    return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True, **extra}


def test_logprobs_match_teacher_forcing(eng):
    async def go(c):
        reqs = [(p, t) for p in PROMPTS[:3] for t in (1.0, 0.7, 0.0)]
        outs = await asyncio.gather(
            *(c.generate(p, {"max_new_tokens": 24, "temperature": t, "ignore_eos": True}) for p, t in reqs)
        )
        return reqs, outs

    reqs, outs = run(_with_client(eng.url, go))
    for (prompt, temp), out in zip(reqs, outs, strict=True):
        assert len(out.output_ids) == len(out.logprobs) == 24
        expected = teacher_forced_logprobs(eng.ref, prompt, out.output_ids, temp)
        assert max(abs(a - b) for a, b in zip(out.logprobs, expected, strict=True)) < 1e-4, (prompt, temp)


def test_greedy_is_deterministic_and_matches_reference(eng):
    async def go(c):
        return await asyncio.gather(*(c.generate(PROMPTS[1], greedy(20)) for _ in range(3)))

    outs = run(_with_client(eng.url, go))
    assert outs[0].output_ids == outs[1].output_ids == outs[2].output_ids
    assert outs[0].output_ids == reference_greedy(eng.ref, PROMPTS[1], 20)
    assert outs[0].finish_reason == "length" and outs[0].prompt_tokens == 4


def test_n_samples_return_a_list_with_sub_rids(eng):
    async def go(c):
        return await c.generate_n(PROMPTS[0], {"max_new_tokens": 8, "n": 4, "ignore_eos": True}, rid="grp")

    outs = run(_with_client(eng.url, go))
    assert [o.rid for o in outs] == ["grp_0", "grp_1", "grp_2", "grp_3"]
    assert all(len(o.output_ids) == 8 and o.finish_reason == "length" for o in outs)
    assert len({tuple(o.output_ids) for o in outs}) > 1  # independent samples


def test_stop_token_and_max_new_tokens(eng):
    async def go(c):
        full = await c.generate(PROMPTS[0], greedy(16))
        stop_tok = full.output_ids[5]
        stopped = await c.generate(PROMPTS[0], greedy(16, ignore_eos=False, stop_token_ids=[stop_tok]))
        ignored = await c.generate(PROMPTS[0], greedy(16, stop_token_ids=[stop_tok]))  # ignore_eos disables it
        return full, stop_tok, stopped, ignored

    full, stop_tok, stopped, ignored = run(_with_client(eng.url, go))
    cut = full.output_ids.index(stop_tok) + 1
    assert stopped.output_ids == full.output_ids[:cut]  # the matched token is kept
    assert stopped.finish_reason == "stop" and stopped.meta_info["finish_reason"]["matched"] == stop_tok
    assert stopped.meta_info["completion_tokens"] == cut
    assert full.finish_reason == "length" and full.meta_info["finish_reason"]["length"] == 16
    assert ignored.output_ids == full.output_ids and ignored.finish_reason == "length"


def test_requests_joining_a_running_batch_match_solo_greedy(eng):
    lengths = [40, 12, 25, 7]

    async def go(c):
        solo = [await c.generate(p, greedy(n)) for p, n in zip(PROMPTS, lengths, strict=True)]
        first = asyncio.create_task(c.generate(PROMPTS[0], greedy(400)))
        others = []
        for p, n in zip(PROMPTS, lengths, strict=True):
            await _wait_running(c, eng.url, at_least=1)
            others.append(asyncio.create_task(c.generate(p, greedy(n))))
            await asyncio.sleep(0.01)
        joined = await asyncio.gather(*others)
        long_out = await first
        return solo, joined, long_out

    solo, joined, long_out = run(_with_client(eng.url, go))
    assert [o.output_ids for o in joined] == [o.output_ids for o in solo]
    assert long_out.output_ids[:40] == solo[0].output_ids and len(long_out.output_ids) == 400


async def _wait_running(client, url, at_least=1, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await client.get_server_info(url)
        if info["internal_states"][0]["num_running"] >= at_least:
            return info
        await asyncio.sleep(0.005)
    raise AssertionError("no request started running")


def test_abort_by_rid_returns_partial_output(eng):
    async def go(c):
        task = asyncio.create_task(c.generate(PROMPTS[2], greedy(1800), rid="victim"))
        await _wait_running(c, eng.url)
        await c.abort("victim")
        return await task

    out = run(_with_client(eng.url, go))
    assert out.finish_reason == "abort" and out.rid == "victim"
    assert 0 < len(out.output_ids) < 1800 and len(out.logprobs) == len(out.output_ids)
    k = min(len(out.output_ids), 40)  # the reference is cache-free (quadratic): compare a prefix
    assert out.output_ids[:k] == reference_greedy(eng.ref, PROMPTS[2], k)


def test_pause_abort_then_requests_wait_until_continue(eng):
    async def go(c):
        running = [asyncio.create_task(c.generate(p, greedy(1500))) for p in PROMPTS[:2]]
        await _wait_running(c, eng.url, at_least=2)
        await c.pause_generation("abort")
        aborted = await asyncio.gather(*running)
        late = asyncio.create_task(c.generate(PROMPTS[3], greedy(6)))
        await asyncio.sleep(0.3)
        waited = not late.done()
        await c.continue_generation()
        return aborted, waited, await late

    aborted, waited, late = run(_with_client(eng.url, go))
    assert all(o.finish_reason == "abort" and 0 < len(o.output_ids) < 1500 for o in aborted)
    assert waited, "a request sent during the pause must wait for continue_generation"
    assert late.finish_reason == "length" and late.output_ids == reference_greedy(eng.ref, PROMPTS[3], 6)


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_pause_keeps_requests_and_continue_finishes_them(eng, mode):
    n = 120

    async def go(c):
        task = asyncio.create_task(c.generate(PROMPTS[3], greedy(n)))
        await _wait_running(c, eng.url)
        await c.pause_generation(mode)
        before = (await c.get_server_info(eng.url))["internal_states"][0]
        await asyncio.sleep(0.3)
        after = (await c.get_server_info(eng.url))["internal_states"][0]
        frozen = not task.done() and before["steps"] == after["steps"]
        await c.continue_generation()
        return before, frozen, await task

    before, frozen, out = run(_with_client(eng.url, go))
    assert frozen
    # in_place keeps the request running with its KV; retract sends it back to the queue.
    assert (before["num_running"], before["num_waiting"]) == ((1, 0) if mode == "in_place" else (0, 1))
    assert out.finish_reason == "length"
    assert out.output_ids == reference_greedy(eng.ref, PROMPTS[3], n)


def test_release_and_resume_memory_round_trip(eng):
    """SGLang's /release_memory_occupation and /resume_memory_occupation: refused while a request runs; once
    released, requests wait (even after continue_generation) until every tag is resumed, then run normally."""

    async def go(c):
        running = asyncio.create_task(c.generate(PROMPTS[2], greedy(1500)))
        await _wait_running(c, eng.url)
        with pytest.raises(EngineError) as busy:
            await c.release_memory_occupation(["kv_cache"])
        with pytest.raises(EngineError) as unknown:
            await c.resume_memory_occupation(["gpu"])
        await c.pause_generation("abort")
        await running
        answers = await c.release_memory_occupation(["kv_cache", "weights"])
        await c.continue_generation()
        late = asyncio.create_task(c.generate(PROMPTS[3], greedy(6)))
        await asyncio.sleep(0.3)
        waited = not late.done()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            async with s.get(eng.url + "/health_generate") as r:
                health = r.status  # alive, with nothing to prove while released (SGLang skips the probe too)
        state = (await c.get_server_info(eng.url))["internal_states"][0]
        await c.resume_memory_occupation(["kv_cache"])
        await asyncio.sleep(0.3)
        still_waited = not late.done()
        await c.resume_memory_occupation(None)  # no tags: all of them
        out = await asyncio.wait_for(late, 30)
        after = (await c.get_server_info(eng.url))["internal_states"][0]
        return busy.value, unknown.value, answers, waited, health, state, still_waited, out, after

    busy, unknown, answers, waited, health, state, still_waited, out, after = run(_with_client(eng.url, go))
    assert "HTTP 400" in str(busy) and "idle" in str(busy) and eng.url in str(busy)
    assert "HTTP 400" in str(unknown) and "'gpu'" in str(unknown)
    assert answers == {eng.url: None}  # SGLang answers JSON null
    assert waited and still_waited and health == 200
    assert state["released"] == ["kv_cache", "weights"] and state["num_waiting"] == 1 and state["paused"] is None
    assert after["released"] == [] and out.finish_reason == "length"
    assert out.output_ids == reference_greedy(eng.ref, PROMPTS[3], 6)


def test_released_kv_cache_is_freed_and_restored_in_process():
    engine = Engine(build_tiny_model(seed=3, **MODEL), max_running=4).start()
    try:
        sizes = [sum(t.numel() for t in lane.runner.kv) for lane in engine.lanes]
        engine.release_memory(["kv_cache"]).result(10)
        released = [sum(t.numel() for t in lane.runner.kv) for lane in engine.lanes]
        engine.resume_memory(["kv_cache"]).result(10)
        restored = [sum(t.numel() for t in lane.runner.kv) for lane in engine.lanes]
    finally:
        engine.stop()
    assert all(n > 0 for n in sizes) and released == [0] * len(sizes) and restored == sizes


def test_api_key_is_required_except_for_health(eng):
    async def go():
        async with aiohttp.ClientSession() as s:
            codes = {}
            for path, method in [("/health", "GET"), ("/get_model_info", "GET"), ("/generate", "POST")]:
                async with s.request(method, eng.url + path, json={"input_ids": [1], "sampling_params": {}}) as r:
                    codes[path] = r.status
            auth = {"Authorization": "Bearer wrong"}
            async with s.get(eng.url + "/get_model_info", headers=auth) as r:
                codes["wrong"] = r.status
            auth = {"Authorization": f"Bearer {KEY}"}
            async with s.get(eng.url + "/get_model_info", headers=auth) as r:
                codes["right"] = r.status
            return codes

    assert run(go()) == {"/health": 200, "/get_model_info": 401, "/generate": 401, "wrong": 401, "right": 200}


def test_health_generate_and_bad_input(eng):
    async def go(c):
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            async with s.get(eng.url + "/health_generate") as r:
                health = r.status
            async with s.post(eng.url + "/generate", json={"input_ids": [1], "sampling_params": {"bogus": 1}}) as r:
                bad = (r.status, (await r.json())["error"])  # SGLang's schema gate: {"error": "<text>"}
        return health, bad

    health, bad = run(_with_client(eng.url, go))
    assert health == 200
    assert bad[0] == 400 and bad[1].startswith("unknown field `bogus`, expected one of `max_new_tokens`")


def _trainer_broadcast(pg, tensors, flat=False):
    if flat:
        dist.broadcast(flatten_bucket(tensors), group_src=0, group=pg)
    else:
        for t in tensors:
            dist.broadcast(t, group_src=0, group=pg)


def test_weight_update_over_gloo_changes_outputs_and_version(eng):
    new_model = build_tiny_model(seed=7, **MODEL)
    new_state = new_model.state_dict()
    names = list(new_state)
    tensors = [new_state[n].contiguous() for n in names]
    group = f"wu_{free_port()}"
    port = free_port()
    pool = ThreadPoolExecutor(2)

    async def go(c):
        old_version = await c.get_weight_version(eng.url)
        old_out = await c.generate(PROMPTS[1], greedy(12))
        await c.pause_generation("abort")
        loop = asyncio.get_running_loop()
        # We are the trainer: rank 0 hosts the store; the engine joins as rank 1.
        pg_fut = loop.run_in_executor(pool, create_sync_group, "127.0.0.1", port, 0, 2, group, "gloo", 60)
        await c.init_weights_update_group(eng.url, "127.0.0.1", port, 1, 2, group, "gloo")
        pg = await pg_fut
        await c.begin_weight_update(eng.url)  # SGLang 0.5.23's session, which the CPU engine enforces too
        # Two buckets: per-tensor broadcasts, then one flattened bucket carrying the version.
        half = len(names) // 2
        for sl, flat, version in ((slice(0, half), False, None), (slice(half, None), True, "v1")):
            update = c.update_weights_from_distributed(
                eng.url,
                names[sl],
                [dtype_name(t.dtype) for t in tensors[sl]],
                [list(t.shape) for t in tensors[sl]],
                group_name=group,
                weight_version=version,
                load_format="flattened_bucket" if flat else None,
            )
            _, res = await asyncio.gather(loop.run_in_executor(pool, _trainer_broadcast, pg, tensors[sl], flat), update)
            assert res["success"], res
        # A bad name is refused (after draining the broadcast) and changes nothing.
        bad = c.update_weights_from_distributed(
            eng.url, ["model.nope.weight"], ["float32"], [[3]], group_name=group, weight_version="bad"
        )
        bad_res = await asyncio.gather(
            loop.run_in_executor(pool, _trainer_broadcast, pg, [torch.ones(3)]), bad, return_exceptions=True
        )
        await c.end_weight_update(eng.url)
        await c.continue_generation()
        new_version = await c.get_weight_version(eng.url)
        new_out = await c.generate(PROMPTS[1], greedy(12))
        checksum = await c.weights_checksum(eng.url, names)
        row = await c.get_weights_by_name(eng.url, "model.embed_tokens.weight", truncate_size=2)
        await c.destroy_weights_update_group(eng.url, group)
        dist.destroy_process_group(pg)
        return old_version, old_out, new_version, new_out, checksum, row, bad_res[1]

    try:
        old_version, old_out, new_version, new_out, checksum, row, bad_err = run(_with_client(eng.url, go))
    finally:
        pool.shutdown()
    assert old_version == "default" and new_version == "v1"
    assert new_out.weight_version == "v1"
    assert new_out.output_ids == reference_greedy(new_model, PROMPTS[1], 12) != old_out.output_ids
    assert checksum == weights_checksum(zip(names, tensors, strict=True))
    assert torch.allclose(torch.tensor(row), new_state["model.embed_tokens.weight"][:2])
    assert "model.nope.weight" in str(bad_err)
    _restore_weights(eng)


def _restore_weights(eng):
    """Put the original weights back through /update_weights_from_tensor (base64 safetensors)."""
    state = {k: v for k, v in eng.ref.state_dict().items() if k != "lm_head.weight"}  # tied: either name works

    async def go(c):
        await c.begin_weight_update(eng.url)
        res = await c.update_weights_from_tensor(
            eng.url, [encode_named_tensors(state)], load_format="safetensors", weight_version="v0"
        )
        await c.end_weight_update(eng.url)
        return res, await c.generate(PROMPTS[1], greedy(12)), await c.weights_checksum(eng.url, list(state))

    res, out, checksum = run(_with_client(eng.url, go))
    assert res["success"] and out.weight_version == "v0"
    assert out.output_ids == reference_greedy(eng.ref, PROMPTS[1], 12)
    assert checksum == weights_checksum(state.items())


def _submit_and_wait(engine: Engine, reqs: list[Request], timeout: float) -> None:
    done = threading.Semaphore(0)
    for r in reqs:
        r.on_done = lambda _r: done.release()
        engine.submit(r)
    for _ in reqs:
        assert done.acquire(timeout=timeout)


def test_hf_fallback_runner_matches_reference_in_process():
    model = build_tiny_model(seed=3, model_type="llama", **MODEL)
    engine = Engine(model, max_running=4, runner="hf").start()
    try:
        reqs = [
            Request(rid=f"r{i}", prompt=p, params=SamplingParams(max_new_tokens=n, temperature=t, ignore_eos=True))
            for i, (p, n, t) in enumerate([(PROMPTS[0], 10, 1.0), (PROMPTS[1], 4, 0.0), (PROMPTS[3], 7, 0.0)])
        ]
        _submit_and_wait(engine, reqs, timeout=30)
    finally:
        engine.stop()
    assert type(engine.runner).__name__ == "HFRunner"
    for r in reqs:
        assert r.finish == {"type": "length", "length": r.params.max_new_tokens}
        expected = teacher_forced_logprobs(model, r.prompt, r.output_ids, r.params.temperature)
        assert max(abs(a - b) for a, b in zip(r.logprobs, expected, strict=True)) < 1e-4
    assert reqs[1].output_ids == reference_greedy(model, PROMPTS[1], 4)
    assert reqs[2].output_ids == reference_greedy(model, PROMPTS[3], 7)


def test_two_lanes_match_reference_in_process():
    model = build_tiny_model(seed=4, **MODEL)
    engine = Engine(model, max_running=8, lanes=2).start()
    try:
        specs = [(p, n, t) for p in PROMPTS for n, t in ((9, 0.0), (6, 1.0))]
        reqs = [
            Request(rid=f"l{i}", prompt=p, params=SamplingParams(max_new_tokens=n, temperature=t, ignore_eos=True))
            for i, (p, n, t) in enumerate(specs)
        ]
        _submit_and_wait(engine, reqs, timeout=30)
    finally:
        engine.stop()
    assert len(engine.lanes) == 2 and all(lane.admitted > 0 for lane in engine.lanes)
    assert sum(lane.admitted for lane in engine.lanes) == len(reqs)
    for r in reqs:
        expected = teacher_forced_logprobs(model, r.prompt, r.output_ids, r.params.temperature)
        assert max(abs(a - b) for a, b in zip(r.logprobs, expected, strict=True)) < 1e-4
        if r.params.greedy:
            assert r.output_ids == reference_greedy(model, r.prompt, r.params.max_new_tokens)


def test_rows_leave_after_a_long_prompt_grew_the_cache():
    # A prompt longer than the initial KV length (256) reallocates the cache inside the runner's inference mode;
    # rows finishing afterwards (swap-remove) must still be able to write into it. This used to fail with
    # "Inplace update to inference tensor outside InferenceMode" and kill the engine on real eval sets.
    model = build_tiny_model(seed=3, **MODEL)
    engine = Engine(model, max_running=4).start()
    try:
        long_prompt = [5 + i % 50 for i in range(300)]
        reqs = [
            Request(rid=f"r{i}", prompt=p, params=SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
            for i, (p, n) in enumerate([(PROMPTS[0], 3), (long_prompt, 6), (PROMPTS[1], 9)])
        ]
        _submit_and_wait(engine, reqs, timeout=60)
    finally:
        engine.stop()
    for r in reqs:
        assert r.finish == {"type": "length", "length": r.params.max_new_tokens}, r.finish
        assert r.output_ids == reference_greedy(model, r.prompt, r.params.max_new_tokens)
