"""EngineClient against the local engine (real subprocesses on free ports): normalisation, routing, retries,
dead engines, timeouts, fan-out control calls and the sync wrapper."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engines.client import EngineClient, EngineDeadError, EngineError, GenerateOutput
from engines.process import EngineProcess, EngineStartError, free_port, launch_engine, local_command
from pipeline.config import EngineConfig
from pipeline.testing.tiny_models import save_tiny_model

MODEL = dict(init_std=0.3, max_position=2048)
GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    model_dir = save_tiny_model(root / "model", seed=1, **MODEL)
    cfg = EngineConfig(backend="local", startup_timeout_s=90, max_running_requests=8)
    proc = launch_engine(cfg, str(model_dir), free_port(), root / "a.log")
    yield SimpleNamespace(url=proc.url, dir=model_dir, root=root, cfg=cfg)
    proc.stop()


def run(coro):
    return asyncio.run(coro)


def test_generate_returns_normalised_output(env):
    async def go():
        c = EngineClient([env.url], backoff_s=0.01)
        try:
            return await c.generate([3, 4, 5], GREEDY, rid="n1")
        finally:
            await c.close()

    out = run(go())
    assert isinstance(out, GenerateOutput)
    assert out.finish_reason == "length" and out.url == env.url and out.rid == "n1"
    assert out.prompt_tokens == 3 and out.weight_version == "default"
    assert len(out.output_ids) == 6 and all(isinstance(x, float) and x <= 0 for x in out.logprobs)
    assert out.meta_info["finish_reason"] == {"type": "length", "length": 6}


def test_least_outstanding_routing_and_sticky_rids():
    c = EngineClient(["http://a:1", "http://b:2/", "http://c:3"])
    assert c.urls == ["http://a:1", "http://b:2", "http://c:3"]
    c._outstanding.update({"http://a:1": 3, "http://b:2": 1, "http://c:3": 1})
    picks = {c.pick_url() for _ in range(4)}
    assert picks == {"http://b:2", "http://c:3"}  # ties rotate among the least loaded
    c._remember("r1", "http://a:1")
    assert c.pick_url("r1") == "http://a:1"  # sticky beats load
    c.mark_dead("http://a:1")
    assert c.alive_urls == ["http://b:2", "http://c:3"] and c.pick_url("r1") != "http://a:1"
    c.mark_dead("http://b:2")
    c.mark_dead("http://c:3")
    with pytest.raises(EngineDeadError, match="no live engine"):
        c.pick_url()
    c.add_url("http://b:2")
    assert c.pick_url() == "http://b:2"


def test_api_key_never_in_repr():
    c = EngineClient(["http://x:1"], api_key="s3cr3t-value")
    assert "s3cr3t-value" not in repr(c)
    proc = EngineProcess(["python", "--api-key", "s3cr3t-value"], "http://x:1", "/dev/null", secret="s3cr3t-value")
    assert "s3cr3t-value" not in repr(proc) and "***" in proc.display_cmd()


def test_http_errors_and_timeouts_raise_engine_error_naming_the_url(env):
    async def go():
        c = EngineClient([env.url], backoff_s=0.01)
        try:
            with pytest.raises(EngineError, match="bogus") as bad:
                await c.generate([3], {"bogus": 1})
            with pytest.raises(EngineError, match="no answer within") as slow:
                await c.generate([3], {"max_new_tokens": 1900, "ignore_eos": True}, rid="slow", timeout_s=0.2)
            await c.abort("slow")
            still = await c.generate([3], GREEDY)
            return bad.value, slow.value, still, c.alive_urls
        finally:
            await c.close()

    bad, slow, still, alive = run(go())
    assert bad.status == 400 and env.url in str(bad) and not isinstance(bad, EngineDeadError)
    assert env.url in str(slow) and not isinstance(slow, EngineDeadError)
    assert still.finish_reason == "length" and alive == [env.url]  # neither error marks the engine dead


def test_dead_engine_raises_and_is_no_longer_routed(env):
    cmd = local_command(env.cfg, str(env.dir), port := free_port())
    victim = EngineProcess(cmd, f"http://127.0.0.1:{port}", env.root / "victim.log", env=_env()).start()
    victim.wait_healthy(90)

    async def go():
        c = EngineClient([victim.url, env.url], backoff_s=0.01, max_retries=2)
        try:
            ok = await c.generate([3, 4], GREEDY, url=victim.url)
            task = asyncio.create_task(c.generate([3], {"max_new_tokens": 1900, "ignore_eos": True}, url=victim.url))
            await asyncio.sleep(0.3)
            os.kill(victim.pid, signal.SIGKILL)  # our own child
            with pytest.raises(EngineDeadError) as dead:
                await task
            healthy = await c.health(victim.url)
            routed = {(await c.generate([5], GREEDY)).url for _ in range(3)}
            with pytest.raises(EngineDeadError, match=victim.url):
                await c.generate([5], GREEDY, url=victim.url)
            return ok, dead.value, healthy, routed, c.alive_urls
        finally:
            await c.close()

    try:
        ok, dead, healthy, routed, alive = run(go())
    finally:
        victim.stop()
    assert ok.url == victim.url
    assert victim.url in str(dead) and dead.url == victim.url
    assert not healthy and routed == {env.url} and alive == [env.url]


def test_control_calls_fan_out_and_abort_by_rid(env):
    async def go():
        c = EngineClient([env.url], backoff_s=0.01)
        try:
            task = asyncio.create_task(c.generate([7], {"max_new_tokens": 1900, "ignore_eos": True}, rid="ab1"))
            while not (await c.get_server_info(env.url))["internal_states"][0]["num_running"]:
                await asyncio.sleep(0.005)
            await c.abort("ab1")
            aborted = await task
            paused = await c.pause_generation("in_place")
            flushed = await c.flush_cache()
            resumed = await c.continue_generation()
            await c.abort(abort_all=True)
            return aborted, paused, flushed, resumed
        finally:
            await c.close()

    aborted, paused, flushed, resumed = run(go())
    assert aborted.finish_reason == "abort" and 0 < len(aborted.output_ids) < 1900
    assert paused[env.url]["status"] == "ok" and resumed[env.url]["status"] == "ok"
    assert "Cache flushed" in flushed[env.url]


def test_run_sync_from_a_plain_thread(env):
    c = EngineClient([env.url])
    result = {}

    def trainer_thread():
        result["out"] = c.run_sync(c.generate([9, 9], GREEDY), timeout=30)
        result["version"] = c.run_sync(c.get_weight_version(env.url), timeout=30)

    t = threading.Thread(target=trainer_thread)
    t.start()
    t.join(60)
    c.close_sync()
    assert result["out"].finish_reason == "length" and result["version"] == "default"


def test_start_timeout_quotes_the_last_30_log_lines(tmp_path):
    script = "import time\nfor i in range(40): print(f'line {i}', flush=True)\ntime.sleep(60)"
    proc = EngineProcess([sys.executable, "-c", script], f"http://127.0.0.1:{free_port()}", tmp_path / "x.log").start()
    try:
        with pytest.raises(EngineStartError) as err:
            proc.wait_healthy(timeout_s=1.5)
    finally:
        proc.stop(grace_s=2)
    msg = str(err.value)
    assert proc.url in msg and "not healthy after" in msg
    assert "line 39" in msg and "line 10\n" in msg and "line 9\n" not in msg  # exactly the last 30 lines
    assert not proc.alive()


def test_exit_before_healthy_and_stop_kills_the_whole_group(tmp_path):
    crash = EngineProcess([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], "http://127.0.0.1:1",
                          tmp_path / "crash.log").start()  # fmt: skip
    with pytest.raises(EngineStartError, match=r"exited with code 3(.|\n)*boom"):
        crash.wait_healthy(timeout_s=30)
    script = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('child', c.pid, flush=True)\ntime.sleep(60)"
    )
    parent = EngineProcess([sys.executable, "-c", script], "http://127.0.0.1:1", tmp_path / "g.log").start()
    deadline = time.monotonic() + 30
    while "child" not in (tmp_path / "g.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int((tmp_path / "g.log").read_text().split()[1])
    parent.stop(grace_s=2)
    assert not parent.alive() and not _running(grandchild)


def _running(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state.startswith("Z"):
            return False  # a zombie waiting for init to reap it
        time.sleep(0.05)
    return True


def _env() -> dict:
    from engines.process import REPO_ROOT

    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO_ROOT)
    e.pop("DAPO_ENGINE_API_KEY", None)
    return e


def test_health_tells_ok_hung_and_dead_and_stop_ends_a_stopped_process(tmp_path):
    script = (
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
    )
    port = free_port()
    proc = EngineProcess([sys.executable, "-c", script, str(port)], f"http://127.0.0.1:{port}", tmp_path / "h.log")
    proc.start().wait_healthy(timeout_s=30)
    try:
        assert proc.health(timeout_s=5) == "ok"
        os.kill(proc.pid, signal.SIGSTOP)  # alive, but it answers nothing: hung
        t0 = time.monotonic()
        assert proc.health(timeout_s=1) == "hung"
        assert time.monotonic() - t0 < 3
        t0 = time.monotonic()
        code = proc.stop(grace_s=20)
        assert code == -signal.SIGTERM and time.monotonic() - t0 < 10  # SIGTERM acted: no wait for the grace
    finally:
        proc.stop(grace_s=0)
    assert proc.health() == "dead"
