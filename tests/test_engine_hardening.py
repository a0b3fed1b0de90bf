"""The CPU engine under hostile requests (issue #22): limits on n, on n x batch and on body size; malformed
requests answered 4xx with a one-line reason (never 5xx, never a dead engine); a group join with a dead master
bounded in time, after which SIGTERM still stops the server.

One tiny-model engine subprocess per module (`python -m engines.local` with small limits), loopback only.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engines.process import REPO_ROOT, EngineProcess, free_port
from pipeline.testing.tiny_models import save_tiny_model

MODEL = dict(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
LIMITS = ["--max-n", "16", "--max-batch", "32", "--max-request-mb", "1", "--max-weights-request-mb", "2"]


def start_engine(model_dir: Path, log: Path, *extra: str) -> EngineProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "engines.local", "--model-path", str(model_dir), "--port", str(port), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("DAPO_ENGINE_API_KEY", None)
    proc = EngineProcess(cmd, f"http://127.0.0.1:{port}", log, env=env).start()
    proc.wait_healthy(90)
    return proc


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    model_dir = save_tiny_model(root / "model", **MODEL)
    proc = start_engine(model_dir, root / "engine.log", *LIMITS, "--group-timeout-s", "3")
    yield SimpleNamespace(proc=proc, port=int(proc.url.rsplit(":", 1)[1]), dir=model_dir, root=root)
    proc.stop()


def post(port: int, path: str, body, timeout: float = 30.0, raw: bytes | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else json.dumps(body).encode()
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def assert_alive(eng) -> None:
    assert eng.proc.health(5) == "ok"
    status, text = post(eng.port, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    assert status == 200, text


def assert_refused(status: int, text: str, *words: str, code: int = 400) -> None:
    assert status == code, (status, text)
    assert "\n" not in text.strip() and "Traceback" not in text, text
    for w in words:
        assert w in text, (w, text)


def test_huge_n_is_refused_without_allocating(eng):
    # today: n=1e8 grew the engine to 19.5 GB until the kernel killed it
    t0 = time.monotonic()
    status, text = post(eng.port, "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "n": 10**8}})
    assert_refused(status, text, "sampling_params.n", "--max-n")
    assert time.monotonic() - t0 < 5
    status, text = post(eng.port, "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "n": 17}})
    assert_refused(status, text, "[1, 16]")
    status, _ = post(eng.port, "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1, "n": 16}})
    assert status == 200
    assert_alive(eng)


def test_requests_per_body_are_bounded(eng):
    status, text = post(eng.port, "/generate", {"input_ids": [[3]] * 33, "sampling_params": {"max_new_tokens": 1}})
    assert_refused(status, text, "33 prompts", "--max-batch")
    status, text = post(eng.port, "/generate", {"input_ids": [[3]] * 32, "sampling_params": {"max_new_tokens": 1}})
    assert status == 200 and len(json.loads(text)) == 32


def test_body_size_is_bounded(eng):
    big = json.dumps({"input_ids": [1] * 400_000}).encode()  # ~1.2 MB > --max-request-mb 1
    status, text = post(eng.port, "/generate", None, raw=big)
    assert status == 413, (status, text[:200])
    # chunked (no Content-Length): refused once the limit is crossed, not read to the end
    conn = http.client.HTTPConnection("127.0.0.1", eng.port, timeout=30)
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    conn.request("POST", "/generate", body=chunks, encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 413
    conn.close()
    # a declared length far over the limit is refused before the body is sent
    conn = http.client.HTTPConnection("127.0.0.1", eng.port, timeout=30)
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Length", str(2**31 - 1))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert_alive(eng)


def test_short_batch_lists_are_400_not_500(eng):
    # today: IndexError -> 500 with a traceback
    body = {"input_ids": [[1, 2], [3, 4]], "sampling_params": {"max_new_tokens": 1}}
    status, text = post(eng.port, "/generate", {**body, "rid": ["a"]})
    assert_refused(status, text, "The specified rids length mismatch with the batch_size")  # SGLang's text
    status, text = post(eng.port, "/generate", {**body, "return_logprob": [True]})
    assert_refused(status, text, "return_logprob")
    status, text = post(eng.port, "/generate", {**body, "rid": [1, 2]})
    assert_refused(status, text, "rid")
    assert_alive(eng)


@pytest.mark.parametrize(
    "path,body",
    [
        ("/generate", {"input_ids": [1], "sampling_params": {"top_k": 2**70}}),
        ("/generate", {"input_ids": [1], "sampling_params": {"stop_token_ids": [2**70]}}),
        ("/generate", {"input_ids": [1], "sampling_params": "greedy"}),
        ("/generate", {"input_ids": [[1], 2]}),
        ("/generate", {"text": [1, 2]}),
        ("/abort_request", {"rid": ["a", "b"]}),
        ("/abort_request", {"rid": {"x": 1}}),
        ("/release_memory_occupation", {"tags": "weights"}),
        ("/get_weights_by_name", {"name": ["x"]}),
        ("/weights_checksum", {"names": "model.norm.weight"}),
        ("/init_weights_update_group", {"master_address": 1, "master_port": "x", "rank_offset": 1, "world_size": 2}),
        ("/update_weights_from_disk", {"model_path": {"a": 1}}),
        ("/update_weight_version", {"new_version": [1]}),
    ],
)
def test_malformed_fields_are_400(eng, path, body):
    status, text = post(eng.port, path, body)
    assert_refused(status, text)
    assert_alive(eng)


def test_weights_body_limit_is_its_own(eng):
    # /update_weights_from_tensor takes up to --max-weights-request-mb (2), other routes --max-request-mb (1)
    assert post(eng.port, "/begin_weight_update", {})[0] == 200  # 0.5.23 refuses tensor updates outside a session
    try:
        payload = {"serialized_named_tensors": "A" * (3 * 2**19), "load_format": "safetensors"}  # 1.5 MB
        status, text = post(eng.port, "/update_weights_from_tensor", payload)
        assert status == 400 and "Traceback" not in text, (status, text[:300])  # read (not 413), then refused
        status, _ = post(eng.port, "/update_weights_from_tensor", {"serialized_named_tensors": "A" * (5 * 2**19)})
        assert status == 413
    finally:
        assert post(eng.port, "/end_weight_update", {})[0] == 200


def test_group_join_with_dead_master_is_bounded(eng):
    dead = free_port()  # nothing listens there
    body = {"master_address": "127.0.0.1", "master_port": dead, "rank_offset": 1, "world_size": 2,
            "group_name": "g_dead", "backend": "gloo"}  # fmt: skip
    t0 = time.monotonic()
    status, text = post(eng.port, "/init_weights_update_group", {**body, "timeout_s": 1.0})
    assert status == 400 and '"success":false' in text.replace(" ", ""), text
    assert time.monotonic() - t0 < 20
    t0 = time.monotonic()  # the engine option (--group-timeout-s 3) bounds a request that names no timeout
    status, text = post(eng.port, "/init_weights_update_group", {**body, "group_name": "g_dead2"})
    assert status == 400, text
    assert time.monotonic() - t0 < 25
    status, text = post(eng.port, "/init_weights_update_group", {**body, "timeout_s": 30})
    assert_refused(status, text, "timeout_s")  # longer than the engine allows
    assert_alive(eng)


def test_sigterm_stops_a_server_stuck_in_a_group_join(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", **MODEL)
    proc = start_engine(model_dir, tmp_path / "engine.log", "--group-timeout-s", "600")
    port = int(proc.url.rsplit(":", 1)[1])
    body = {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2,
            "group_name": "g", "backend": "gloo"}  # fmt: skip
    # the join hangs (dead master, 600 s bound); we do not wait for its answer
    hung = subprocess.Popen(
        [sys.executable, "-c", f"import urllib.request as u; u.urlopen(u.Request('{proc.url}/init_weights_update_group', "
         f"data=b'{json.dumps(body)}', headers={{'Content-Type': 'application/json'}}), timeout=700)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(2.0)
        assert proc.health(5) == "ok"  # the join does not block the event loop
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc._proc.wait(timeout=30)  # today: still running after the join's 600 s
        assert time.monotonic() - t0 < 30
    finally:
        hung.kill()
        hung.wait()
        proc.stop(grace_s=1)
    assert port > 0
