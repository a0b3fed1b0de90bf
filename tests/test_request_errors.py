"""An engine's 4xx answer is a request error, fatal to the run with the engine's URL and message, sent once and not
retried; connection errors, timeouts and 5xx stay engine failures (retried, re-queued). Issue 22: a run used to
print the same HTTP 400 thousands of times, retrying forever."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pipeline.contracts.engine_api import EngineDeadError, EngineError
from pipeline.flow.rollout import RolloutManager, is_request_error
from pipeline.flow.transport import GroupReceiver
from pipeline.testing.rollout_sim import SimEngineClient, SimRewards, SimTokenizer, sim_config, sim_prompts


class RefusingClient(SimEngineClient):
    """Answers every /generate with `status` (what SGLang does for a sampling parameter out of its range)."""

    def __init__(self, status: int, **kw):
        super().__init__(**kw)
        self.status, self.calls = status, 0

    async def generate(self, input_ids, sampling_params, rid=None, return_logprob=True, url=None):
        self.calls += 1
        await asyncio.sleep(0.001)
        url = url or self.alive_urls[0]
        raise EngineError(f"{url}/generate: HTTP {self.status}: temperature must be positive", url, self.status)


def _run(client, seconds: float = 1.0) -> RolloutManager:
    async def go():
        rx = GroupReceiver()
        cfg = sim_config(max_staleness=1, batch_size=2)
        m = RolloutManager(cfg, client, SimTokenizer(), sim_prompts(50), rx.sender_endpoint, SimRewards())
        task = asyncio.create_task(m.run())
        await asyncio.sleep(seconds)
        await m.stop()
        await task
        rx.close()
        return m

    return asyncio.run(go())


def test_a_4xx_is_fatal_once_with_the_engine_url_and_message(caplog):
    client = RefusingClient(400, n_engines=2)
    with caplog.at_level(logging.WARNING, logger="dapo"):
        m = _run(client)
    fatal = m.fatal()
    assert "sim://engine" in fatal and "HTTP 400" in fatal and "temperature must be positive" in fatal, fatal
    # the first wave of requests (the admission's budget) is all that is ever sent: nothing is retried
    stats = m.stats()
    assert client.calls == stats["rollout/engine_failures_request"] <= 2 * 8, (client.calls, stats)
    assert stats.get("rollout/retries", 0.0) == 0 and stats.get("rollout/engine_failures_engine", 0.0) == 0
    errors = [r for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records][:5]


@pytest.mark.parametrize("status", [500, 503, 408, 429])
def test_5xx_and_transient_4xx_stay_engine_failures(status):
    client = RefusingClient(status, n_engines=2)
    m = _run(client, seconds=0.5)
    assert m.fatal() == ""
    assert m.stats()["rollout/engine_failures_engine"] > 0  # retried on the other engine, then re-queued


def test_classification():
    assert is_request_error(EngineError("u: HTTP 400: bad", "u", 400))
    assert is_request_error(EngineError("u: HTTP 401 unauthorized", "u", 401))
    assert not is_request_error(EngineError("u: no answer within 5s", "u"))  # a timeout carries no status
    assert not is_request_error(EngineError("u: HTTP 502", "u", 502))
    assert not is_request_error(EngineDeadError("engine u unreachable", "u"))
    assert not is_request_error(ValueError("400"))


@pytest.mark.slow
def test_a_run_whose_requests_the_engine_refuses_stops_with_one_error(tmp_path):
    """End to end with the CPU engine: a context too short for prompt + max_new_tokens makes every /generate a 400."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, "-m", "pipeline.tools.cli", "train", str(root / "configs" / "tiny-cpu.yaml"),
        "model.warm_start_steps=0", "eval.every=0", f"logging.dir={tmp_path}", "logging.run_name=r",
        "engine.extra_args=[--context-length,40]",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    last = [ln for ln in text.splitlines() if ln.startswith("dapo: ")]
    assert len(last) == 1 and "refused a request" in last[0] and "http://127.0.0.1:" in last[0], text[-3000:]
    assert "maximum context length of 40 tokens" in last[0]
    refused = [ln for ln in text.splitlines() if "HTTP 400" in ln]
    assert len(refused) <= 2, text[-3000:]  # the rollout's one ERROR line and the driver's
