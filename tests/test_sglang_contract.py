"""Contract 1 (DESIGN.md): SGLang's HTTP routes and JSON fields, pinned as constants read from SGLang's source.

Checked against sglang 0.5.5 and 0.5.23 (`pip download --no-deps sglang==X`), files
`sglang/srt/entrypoints/http_server.py` (routes), `sglang/srt/managers/io_struct.py` (request dataclasses:
GenerateReqInput, InitWeightsUpdateGroupReqInput, UpdateWeightsFromDistributedReqInput,
UpdateWeightsFromTensorReqInput, UpdateWeightFromDiskReqInput, ReleaseMemoryOccupationReqInput,
ResumeMemoryOccupationReqInput, PauseGenerationReqInput, AbortReq, GetWeightsByNameReqInput,
DestroyWeightsUpdateGroupReqInput, UpdateWeightVersionReqInput), `sglang/srt/constants.py` (memory tags),
`sglang/srt/sampling/sampling_params.py`,
`sglang/srt/utils/auth.py` (0.5.23) / `utils/common.py` (0.5.5) for the API-key header, and
`sglang/srt/managers/schedule_batch.py` for finish reasons. sglang is never imported here.

The tests assert that (1) our client sends exactly these fields to a fake SGLang server, (2) our local server
accepts them, (3) SGLang-shaped answers are normalised, (4) the launcher builds SGLang's command line.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from safetensors.torch import save_file

from engines.client import ADMIN_ROUTES, EngineClient, EngineError, parse_generate_output
from engines.local.engine import Engine
from engines.local.server import SGLANG_SAMPLING_FIELDS, LocalServer, _unknown_field
from engines.process import free_port
from engines.sglang.launcher import router_command, sglang_command
from engines.sglang.protocol import (
    MSG_FLUSH_FAILED,
    MSG_FLUSH_OK,
    MSG_FLUSH_TIMEOUT,
    MSG_NEEDS_SESSION,
    MSG_NO_SESSION,
    MSG_SESSION_OPEN,
    PROTOCOLS,
    UnsupportedVersion,
    protocol_for,
)
from pipeline.config import ConfigError, EngineConfig
from pipeline.contracts.weight_wire import encode_named_tensors
from pipeline.testing.tiny_models import build_tiny_model
from tests import sglang_source as src

SGLANG_VERSIONS_CHECKED = ("0.5.5", "0.5.23")

# ---- routes (method, path) served by both checked versions
ROUTES = {
    "health": ("GET", "/health"),
    "health_generate": ("GET", "/health_generate"),
    "get_model_info": ("GET", "/get_model_info"),
    "get_server_info": ("GET", "/get_server_info"),
    "generate": ("POST", "/generate"),
    "abort_request": ("POST", "/abort_request"),
    "pause_generation": ("POST", "/pause_generation"),
    "continue_generation": ("POST", "/continue_generation"),
    "flush_cache": ("POST", "/flush_cache"),
    "init_weights_update_group": ("POST", "/init_weights_update_group"),
    "destroy_weights_update_group": ("POST", "/destroy_weights_update_group"),
    "update_weights_from_distributed": ("POST", "/update_weights_from_distributed"),
    "update_weights_from_tensor": ("POST", "/update_weights_from_tensor"),
    "update_weight_version": ("POST", "/update_weight_version"),
    "update_weights_from_disk": ("POST", "/update_weights_from_disk"),
    "release_memory_occupation": ("POST", "/release_memory_occupation"),  # also GET
    "resume_memory_occupation": ("POST", "/resume_memory_occupation"),  # also GET
    "get_weights_by_name": ("POST", "/get_weights_by_name"),
}
ROUTES_0_5_23 = {  # 0.5.23 only
    "model_info": ("GET", "/model_info"),
    "server_info": ("GET", "/server_info"),
    "begin_weight_update": ("POST", "/begin_weight_update"),
    "end_weight_update": ("POST", "/end_weight_update"),
}
BEGIN_WEIGHT_UPDATE_FIELDS = {"selector"}  # BeginWeightUpdateReqInput; EndWeightUpdateReqInput has none

# ---- request fields (io_struct.py); the subsets our client sends
GENERATE_FIELDS = {"input_ids", "sampling_params", "return_logprob", "rid"}  # GenerateReqInput
SAMPLING_PARAMS_FIELDS = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos", "n"}
INIT_WEIGHTS_UPDATE_GROUP_FIELDS = {
    "master_address",
    "master_port",
    "rank_offset",
    "world_size",
    "group_name",
    "backend",
}
UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS = {
    "names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version",
}  # fmt: skip
UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS_0_5_23 = {"load_format"}  # e.g. "flattened_bucket"; absent in 0.5.5
UPDATE_WEIGHTS_FROM_TENSOR_FIELDS = {
    "serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
}  # fmt: skip
UPDATE_WEIGHTS_FROM_DISK_FIELDS = {"model_path", "load_format", "abort_all_requests", "weight_version"}
UPDATE_WEIGHTS_FROM_DISK_FIELDS_0_5_23 = {"flush_cache"}  # default true; 0.5.5 always flushes after a disk update
MEMORY_OCCUPATION_FIELDS = {"tags"}  # Release/ResumeMemoryOccupationReqInput; null or [] means every tag
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # GPU_MEMORY_ALL_TYPES
DESTROY_WEIGHTS_UPDATE_GROUP_FIELDS = {"group_name"}
UPDATE_WEIGHT_VERSION_FIELDS = {"new_version", "abort_all_requests"}
GET_WEIGHTS_BY_NAME_FIELDS = {"name", "truncate_size"}
ABORT_REQ_FIELDS = {"rid", "abort_all"}
PAUSE_GENERATION_FIELDS = {"mode"}  # PauseGenerationReqInput (0.5.23); 0.5.5 ignores the body (always abort)
PAUSE_MODES = ("abort", "retract", "in_place")
DEFAULT_GROUP_NAME = "weight_update_group"

# ---- responses
GENERATE_RESPONSE_KEYS = {"output_ids", "meta_info"}
META_INFO_KEYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version"}
META_INFO_LOGPROB_KEY = "output_token_logprobs"  # [[logprob, token_id, text|None], ...]
FINISH_TYPES = {"stop", "length", "abort"}  # FINISH_MATCHED_TOKEN / FINISH_LENGTH / FINISH_ABORT .to_json()["type"]
WEIGHT_RESULT_KEYS = {"success", "message"}
DISK_RESULT_KEYS = WEIGHT_RESULT_KEYS | {"num_paused_requests"}  # /update_weights_from_disk
MEMORY_OCCUPATION_RESULT = None  # the release/resume handlers return nothing: JSON null, 200 (errors: 400)
MODEL_INFO_WEIGHT_VERSION_KEY = "weight_version"  # /get_model_info carries it in both versions
API_KEY_HEADER, API_KEY_PREFIX = "Authorization", "Bearer "
PUBLIC_PATH_PREFIX = "/health"  # exempt from the API key


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------ (1) the client sends exactly these fields
def _fake_sglang(release: str = "0.5.23") -> tuple[web.Application, list]:
    """Answers like `release` where the client's protocol depends on it: which info routes exist (404 otherwise),
    the reported version, the session routes (0.5.23 only)."""
    proto = PROTOCOLS[release]
    seen: list[tuple[str, str, dict | None, str | None, dict]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        seen.append((request.method, request.path, body, request.headers.get(API_KEY_HEADER), dict(request.query)))
        path = request.path
        if path == "/generate":
            meta = {
                "id": "x_0", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 2,
                "completion_tokens": 2, "cached_tokens": 0, "weight_version": "7",
                META_INFO_LOGPROB_KEY: [[-0.5, 9, "a"], [-1.25, 2, None]],
            }  # fmt: skip
            out = {"text": "a", "output_ids": [9, 2], "meta_info": meta}
            n = body["sampling_params"].get("n", 1)
            return web.json_response([out] * n if n > 1 else out)
        if path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):
            if path not in (proto.server_info_path, proto.model_info_path, "/get_server_info", "/get_model_info"):
                return web.json_response({"detail": "Not Found"}, status=404)
            if "server" in path:
                return web.json_response({"version": release, "tp_size": 1})
            return web.json_response({"model_path": "m", MODEL_INFO_WEIGHT_VERSION_KEY: "7"})
        if path in ("/begin_weight_update", "/end_weight_update") and not proto.session:
            return web.json_response({"detail": "Not Found"}, status=404)
        if path in ("/pause_generation", "/continue_generation"):
            return web.json_response({"message": "ok", "status": "ok"})
        if path in ("/abort_request", "/flush_cache"):
            return web.Response(text="Cache flushed.\n" if path == "/flush_cache" else "")
        if path == "/get_weights_by_name":
            return web.json_response([[0.5, 0.25]])
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            return web.json_response(MEMORY_OCCUPATION_RESULT)
        return web.json_response({"success": True, "message": "ok"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app, seen


async def _drive_client(release: str, admin_key: str = "") -> tuple:
    """Every client call once against a fake `release`; returns (results, recorded requests)."""
    app, seen = _fake_sglang(release)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("")).rstrip("/")
    c = EngineClient([url], api_key="k", admin_api_key=admin_key)
    flat = PROTOCOLS[release].flat_buckets
    try:
        sp = {"max_new_tokens": 2, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "stop_token_ids": [2],
              "ignore_eos": False}  # fmt: skip
        one = await c.generate([1, 2], sp, rid="x")
        many = await c.generate_n([1, 2], {**sp, "n": 2}, rid="x")
        await c.abort("x")
        await c.abort(abort_all=True)
        await c.pause_generation("retract")
        await c.continue_generation()
        await c.flush_cache()
        await c.flush_cache(timeout_s=7)
        await c.init_weights_update_group(url, "127.0.0.1", 1234, 1, 2, "g", "gloo")
        await c.begin_weight_update(url)
        await c.update_weights_from_distributed(url, ["w"], [torch.bfloat16], [[2, 3]], "g", weight_version="v")
        if flat:
            await c.update_weights_from_distributed(url, ["w"], ["float32"], [[2]], "g", load_format="flattened_bucket")
        else:
            with pytest.raises(ValueError, match="takes no load_format"):
                await c.update_weights_from_distributed(
                    url, ["w"], ["float32"], [[2]], "g", load_format="flattened_bucket"
                )
        await c.update_weights_from_tensor(url, ["AAAA"], weight_version="v")
        await c.end_weight_update(url)
        await c.get_weights_by_name(url, "w", 1)
        await c.destroy_weights_update_group(url, "g")
        await c.update_weight_version(url, "v2")
        await c.update_weights_from_disk(url, "/dev/shm/ckpt", "safetensors", weight_version="v3")
        await c.update_weights_from_disk(url, "/dev/shm/ckpt", flush_cache=False)
        released = await c.release_memory_occupation(["kv_cache"])
        await c.resume_memory_occupation()
        version = await c.get_weight_version(url)
    finally:
        await c.close()
        await server.close()
    return (one, many, version, released), seen


def test_client_sends_exactly_sglang_fields():
    (one, many, version, released), seen = run(_drive_client("0.5.23"))
    assert all(auth == API_KEY_PREFIX + "k" for _, _, _, auth, _ in seen)
    by_path: dict[str, list] = {}
    for method, path, body, _, _ in seen:
        by_path.setdefault(path, []).append((method, body))
    for name, (method, path) in ROUTES.items():
        if path in by_path:
            assert all(m == method for m, _ in by_path[path]), name
    gen_bodies = [b for _, b in by_path["/generate"]]
    assert all(set(b) == GENERATE_FIELDS for b in gen_bodies)
    assert all(set(b["sampling_params"]) <= SAMPLING_PARAMS_FIELDS for b in gen_bodies)
    assert [set(b) for _, b in by_path["/abort_request"]] == [ABORT_REQ_FIELDS, ABORT_REQ_FIELDS]
    assert by_path["/abort_request"][1][1] == {"rid": "", "abort_all": True}
    assert by_path["/pause_generation"] == [("POST", {"mode": "retract"})] and "retract" in PAUSE_MODES
    assert set(by_path["/pause_generation"][0][1]) == PAUSE_GENERATION_FIELDS
    assert set(by_path["/init_weights_update_group"][0][1]) == INIT_WEIGHTS_UPDATE_GROUP_FIELDS
    dist_bodies = [b for _, b in by_path["/update_weights_from_distributed"]]
    assert set(dist_bodies[0]) == UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS  # what sglang 0.5.5 accepts
    assert dist_bodies[0]["dtypes"] == ["bfloat16"] and dist_bodies[0]["shapes"] == [[2, 3]]
    assert set(dist_bodies[1]) == UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS | UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS_0_5_23
    assert set(by_path["/update_weights_from_tensor"][0][1]) == UPDATE_WEIGHTS_FROM_TENSOR_FIELDS
    assert set(by_path["/get_weights_by_name"][0][1]) == GET_WEIGHTS_BY_NAME_FIELDS
    assert set(by_path["/destroy_weights_update_group"][0][1]) == DESTROY_WEIGHTS_UPDATE_GROUP_FIELDS
    assert set(by_path["/update_weight_version"][0][1]) == UPDATE_WEIGHT_VERSION_FIELDS
    disk_bodies = [b for _, b in by_path["/update_weights_from_disk"]]
    assert set(disk_bodies[0]) == UPDATE_WEIGHTS_FROM_DISK_FIELDS  # what sglang 0.5.5 accepts
    assert disk_bodies[0]["model_path"] == "/dev/shm/ckpt" and disk_bodies[0]["weight_version"] == "v3"
    assert set(disk_bodies[1]) == UPDATE_WEIGHTS_FROM_DISK_FIELDS | UPDATE_WEIGHTS_FROM_DISK_FIELDS_0_5_23
    assert disk_bodies[1]["flush_cache"] is False
    assert by_path["/release_memory_occupation"] == [("POST", {"tags": ["kv_cache"]})]
    assert by_path["/resume_memory_occupation"] == [("POST", {"tags": None})]
    assert set(by_path["/release_memory_occupation"][0][1]) == MEMORY_OCCUPATION_FIELDS
    assert list(released.values()) == [MEMORY_OCCUPATION_RESULT]
    # the session around the updates, the non-deprecated info routes, the flush timeout
    paths = [p for _, p, _, _, _ in seen]
    assert paths.index("/begin_weight_update") < paths.index("/update_weights_from_distributed")
    assert paths.index("/end_weight_update") > paths.index("/update_weights_from_tensor")
    assert by_path["/begin_weight_update"] == [("POST", {"selector": "all"})]
    assert by_path["/end_weight_update"] == [("POST", {})]
    assert "/get_model_info" not in paths and "/get_server_info" not in paths and "/model_info" in paths
    assert [q for _, p, _, _, q in seen if p == "/flush_cache"] == [{}, {"timeout": "7"}]
    # (3) normalisation of SGLang's answer
    assert (one.output_ids, one.logprobs, one.finish_reason) == ([9, 2], [-0.5, -1.25], "stop")
    assert one.weight_version == "7" and one.prompt_tokens == 2 and len(many) == 2 and version == "7"


def test_client_speaks_0_5_5_without_session_flat_buckets_or_flush_timeout():
    _, seen = run(_drive_client("0.5.5"))
    paths = [p for _, p, _, _, _ in seen]
    assert "/begin_weight_update" not in paths and "/end_weight_update" not in paths
    assert paths.count("/server_info") == 1 and "/get_server_info" in paths  # probed once, then the 0.5.5 route
    assert "/model_info" not in paths and "/get_model_info" in paths
    assert all(q == {} for _, p, _, _, q in seen if p == "/flush_cache")
    dist_bodies = [b for _, p, b, _, _ in seen if p == "/update_weights_from_distributed"]
    assert len(dist_bodies) == 1 and "load_format" not in dist_bodies[0]
    disk_bodies = [b for _, p, b, _, _ in seen if p == "/update_weights_from_disk"]
    assert all("flush_cache" not in b for b in disk_bodies)


def test_unsupported_version_is_refused_naming_the_supported_releases():
    async def go():
        app = web.Application()
        app.router.add_get("/server_info", lambda r: web.json_response({"version": "0.4.0"}))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        c = EngineClient([str(server.make_url("")).rstrip("/")])
        try:
            await c.protocol(c.urls[0])
        finally:
            await c.close()
            await server.close()

    with pytest.raises(UnsupportedVersion, match=r"0\.4\.0.*0\.5\.5, 0\.5\.23"):
        run(go())
    assert protocol_for("0.5.23.post2").release == "0.5.23" and protocol_for("0.5.5").session is False


def test_admin_key_goes_to_sglang_admin_routes_only():
    _, seen = run(_drive_client("0.5.23", admin_key="adm"))
    for _, path, _, auth, _ in seen:
        assert auth == API_KEY_PREFIX + ("adm" if path in ADMIN_ROUTES else "k"), path
    assert "s3cret" not in repr(EngineClient(["http://x:1"], api_key="k", admin_api_key="s3cret"))


def test_parse_rejects_unknown_finish_reason_and_logprob_mismatch():
    ok = {"output_ids": [1], "meta_info": {"finish_reason": {"type": "length", "length": 1}, "weight_version": "3"}}
    assert parse_generate_output(ok, "http://e:1").finish_reason == "length"
    with pytest.raises(EngineError, match="http://e:1.*finish_reason"):
        parse_generate_output({"output_ids": [1], "meta_info": {"finish_reason": {"type": "??"}}}, "http://e:1")
    bad = {"output_ids": [1, 2], "meta_info": {"finish_reason": "stop", META_INFO_LOGPROB_KEY: [[-1.0, 1, None]]}}
    with pytest.raises(EngineError, match="1 logprobs for 2 output tokens"):
        parse_generate_output(bad, "http://e:1")


# ------------------------------------------------------------------ (2) the local server accepts them
@pytest.fixture(scope="module")
def local_app():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one compute thread per process
    model = build_tiny_model(seed=0, max_position=256)
    engine = Engine(model, max_running=4).start()
    server = LocalServer(engine, "tiny", api_key="k")
    yield server
    engine.stop()
    torch.set_num_threads(before)


def test_local_server_accepts_sglang_payloads(local_app, tmp_path):
    auth = {API_KEY_HEADER: API_KEY_PREFIX + "k"}
    name = "model.norm.weight"
    shape = list(local_app.engine.params[name].shape)

    async def go():
        client = TestClient(TestServer(local_app.app(), host="127.0.0.1"))
        await client.start_server()
        got = {}

        async def call(key, body=None, label=None, **kw):
            method, path = {**ROUTES, **ROUTES_0_5_23}[key]
            async with client.request(method, path, json=body, headers=auth, **kw) as r:
                got[label or key] = (
                    r.status,
                    await r.json() if r.content_type == "application/json" else await r.text(),
                )
                return got[label or key]

        try:
            sp = {"max_new_tokens": 2, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "stop_token_ids": [],
                  "ignore_eos": True, "n": 1}  # fmt: skip
            assert set(sp) == SAMPLING_PARAMS_FIELDS
            await call("generate", {"input_ids": [3, 4], "sampling_params": sp, "return_logprob": True, "rid": "q"})
            await call("abort_request", {"rid": "q", "abort_all": False})
            for mode in PAUSE_MODES:
                await call("pause_generation", {"mode": mode})
                await call("continue_generation", {})
            await call("flush_cache")
            port = free_port()
            init = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 0, "world_size": 1,
                    "group_name": "g1", "backend": "gloo"}  # fmt: skip
            assert set(init) == INIT_WEIGHTS_UPDATE_GROUP_FIELDS
            await call("init_weights_update_group", init)
            upd = {"names": [name], "dtypes": ["float32"], "shapes": [shape], "group_name": "g1",
                   "flush_cache": True, "abort_all_requests": False, "weight_version": "d1"}  # fmt: skip
            assert set(upd) == UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS
            await call("begin_weight_update", {"selector": "all"})
            await call("update_weights_from_distributed", upd)
            payload = encode_named_tensors({name: torch.ones(shape)})
            tens = {"serialized_named_tensors": [payload], "load_format": None, "flush_cache": True,
                    "abort_all_requests": False, "weight_version": "t1"}  # fmt: skip
            await call("update_weights_from_tensor", tens)
            await call("end_weight_update", {})
            await call("get_weights_by_name", {"name": name, "truncate_size": 3})
            save_file({name: torch.full(shape, 2.0)}, tmp_path / "model.safetensors")
            disk = {"model_path": str(tmp_path), "load_format": "safetensors", "abort_all_requests": False,
                    "weight_version": "k1", "flush_cache": True}  # fmt: skip
            assert set(disk) == UPDATE_WEIGHTS_FROM_DISK_FIELDS | UPDATE_WEIGHTS_FROM_DISK_FIELDS_0_5_23
            await call("update_weights_from_disk", disk)
            await call("get_weights_by_name", {"name": name, "truncate_size": 3}, label="after_disk")
            await call("release_memory_occupation", {"tags": list(MEMORY_TAGS)})
            assert set(MEMORY_TAGS) == {"kv_cache", "weights", "cuda_graph"}
            await call("resume_memory_occupation", {"tags": None})
            await call("destroy_weights_update_group", {"group_name": "g1"})
            await call("update_weight_version", {"new_version": "u1", "abort_all_requests": True})
            for key in ("get_model_info", "get_server_info", "model_info", "server_info", "health", "health_generate"):
                await call(key)
        finally:
            await client.close()
        return got

    got = run(go())
    assert {k: s for k, (s, _) in got.items()} == {k: 200 for k in got}
    status, gen = got["generate"]
    assert set(gen) >= GENERATE_RESPONSE_KEYS and set(gen["meta_info"]) >= META_INFO_KEYS | {META_INFO_LOGPROB_KEY}
    assert gen["meta_info"]["finish_reason"]["type"] in FINISH_TYPES
    assert [len(t) for t in gen["meta_info"][META_INFO_LOGPROB_KEY]] == [3, 3]
    for key in ("init_weights_update_group", "update_weights_from_distributed", "update_weights_from_tensor"):
        assert set(got[key][1]) >= WEIGHT_RESULT_KEYS and got[key][1]["success"], got[key]
    assert got["get_weights_by_name"][1] == [1.0, 1.0, 1.0]  # the tensor update landed
    assert set(got["update_weights_from_disk"][1]) >= DISK_RESULT_KEYS and got["update_weights_from_disk"][1]["success"]
    assert got["after_disk"][1] == [2.0, 2.0, 2.0]  # then the disk update
    assert got["release_memory_occupation"][1] is MEMORY_OCCUPATION_RESULT is got["resume_memory_occupation"][1]
    assert got["get_model_info"][1][MODEL_INFO_WEIGHT_VERSION_KEY] == "u1"
    assert got["server_info"][1]["version"] == "0.5.23"  # the protocol it speaks, so the client negotiates it


def test_local_server_is_as_strict_as_sglang_0_5_23(local_app):
    """What SGLang 0.5.23 refuses, the CPU engine refuses with the same status and message (messages held against
    SGLang's source in test_messages_match_sglang_source)."""
    auth = {API_KEY_HEADER: API_KEY_PREFIX + "k"}
    name = "model.norm.weight"
    shape = list(local_app.engine.params[name].shape)
    ctx = local_app.engine.max_len

    async def go():
        client = TestClient(TestServer(local_app.app(), host="127.0.0.1"))
        await client.start_server()
        got = []

        async def call(method, path, body=None, **kw):
            async with client.request(method, path, json=body, headers=auth, **kw) as r:
                got.append((r.status, await r.json() if r.content_type == "application/json" else await r.text()))
                return got[-1]

        try:
            upd = {"names": [name], "dtypes": ["float32"], "shapes": [shape], "group_name": "nogroup"}
            await call("POST", "/update_weights_from_distributed", upd)  # 0: no session (never joins a broadcast)
            tens = {"serialized_named_tensors": [encode_named_tensors({name: torch.ones(shape)})]}
            await call("POST", "/update_weights_from_tensor", tens)  # 1
            await call("POST", "/end_weight_update", {})  # 2: end without begin
            await call("POST", "/begin_weight_update", {})  # 3
            await call("POST", "/begin_weight_update", {})  # 4: begin while open
            await call("POST", "/update_weights_from_tensor", tens)  # 5: inside the session
            await call("POST", "/end_weight_update", {})  # 6
            sp = {"max_new_tokens": 2, "temperature": 0.0, "bogus": 1}
            await call("POST", "/generate", {"input_ids": [3, 4], "sampling_params": sp})  # 7
            sp = {"max_new_tokens": ctx - 1, "temperature": 0.0}
            await call("POST", "/generate", {"input_ids": [3, 4], "sampling_params": sp})  # 8: 2 + ctx-1 > ctx
            await call("POST", "/generate", {"input_ids": [3] * ctx, "sampling_params": {"max_new_tokens": 0}})  # 9
            # flush while a request runs: refused at once, and ?timeout waits for idle or times out
            sp = {"max_new_tokens": 150, "temperature": 0.0, "ignore_eos": True}
            busy = asyncio.ensure_future(call("POST", "/generate", {"input_ids": [3, 4], "sampling_params": sp}))
            while local_app.engine.load()["num_running"] == 0:
                await asyncio.sleep(0.005)
            await call("POST", "/flush_cache")  # 10 (or 11: the generate's answer may land in between)
            await call("POST", "/flush_cache", params={"timeout": "0.01"})
            await busy
            await call("POST", "/flush_cache", params={"timeout": "5"})  # idle now
        finally:
            await client.close()
        return got

    got = run(go())
    assert got[0] == (
        400,
        {"success": False, "message": MSG_NEEDS_SESSION.format(route="update_weights_from_distributed")},
    )
    assert got[1] == (400, {"success": False, "message": MSG_NEEDS_SESSION.format(route="update_weights_from_tensor")})
    assert got[2] == (400, {"success": False, "message": MSG_NO_SESSION})
    assert got[3] == (200, {"success": True, "message": "Success"})
    assert got[4] == (400, {"success": False, "message": MSG_SESSION_OPEN})
    assert got[5][0] == 200 and got[5][1]["success"] and got[6][0] == 200
    assert got[7][0] == 400 and got[7][1]["error"].startswith("unknown field `bogus`, expected one of `max_new_tokens`")
    assert got[8] == (400, {"error": {"message": (
        f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested a total "
        f"of {ctx + 1} tokens: 2 tokens from the input messages and {ctx - 1} tokens for the completion. Please "
        "reduce the number of tokens in the input messages or the completion to fit within the limit.")}})  # fmt: skip
    assert got[9] == (400, {"error": {"message": (
        f"The input ({ctx} tokens) is longer than the model's context length ({ctx} tokens).")}})  # fmt: skip
    flushes = [g for g in got[10:] if isinstance(g[1], str)]
    assert flushes[0] == (400, MSG_FLUSH_FAILED) and flushes[1] == (400, MSG_FLUSH_TIMEOUT)
    assert flushes[2] == (200, MSG_FLUSH_OK)


def test_local_server_api_key_rule(local_app):
    async def go():
        client = TestClient(TestServer(local_app.app(), host="127.0.0.1"))
        await client.start_server()
        try:
            codes = []
            for path in (PUBLIC_PATH_PREFIX, "/get_model_info", "/get_server_info"):
                async with client.get(path) as r:
                    codes.append(r.status)
            return codes
        finally:
            await client.close()

    assert run(go()) == [200, 401, 401]


# ------------------------------------------------------------------ (4) launcher command lines
def test_sglang_command_line():
    cfg = EngineConfig(backend="sglang", tp=2, mem_fraction=0.8, max_running_requests=128, host="0.0.0.0",
                       extra_args=["--skip-tokenizer-init"])  # fmt: skip
    cmd = sglang_command(cfg, "/models/qwen", 30001, api_key="k")
    assert cmd[1:] == [
        "-m", "sglang.launch_server", "--model-path", "/models/qwen", "--tp-size", "2",
        "--mem-fraction-static", "0.8", "--max-running-requests", "128", "--host", "0.0.0.0", "--port", "30001",
        "--api-key", "k", "--skip-tokenizer-init",
    ]  # fmt: skip
    assert "--api-key" not in sglang_command(cfg, "/m", 1)
    assert router_command(["http://a:1", "http://b:2"], "127.0.0.1", 9000)[1:] == [
        "-m", "sglang_router.launch_router", "--worker-urls", "http://a:1", "http://b:2",
        "--policy", "cache_aware", "--host", "127.0.0.1", "--port", "9000",
    ]  # fmt: skip


def test_colocated_engine_flags():
    from pipeline.config import load_config
    from pipeline.runtime.weight_sync.colocated import engine_args

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    colocated = ["weight_sync.mode=colocated", "weight_sync.release_memory=[kv_cache]"]
    sglang = ["engine.backend=sglang", "model.path=/m", "model.tokenizer=/m"]
    # --enable-memory-saver: ServerArgs.enable_memory_saver in 0.5.5 and 0.5.23, needed by release_memory
    assert engine_args(load_config(tiny, colocated + sglang)) == ["--enable-memory-saver"]
    assert engine_args(load_config(tiny, colocated[:1] + sglang)) == []
    assert engine_args(load_config(tiny, colocated + ["weight_sync.disk_dir=/dev/shm/x"])) == [
        "--update-weights-root", "/dev/shm/x",
    ]  # fmt: skip
    assert engine_args(load_config(tiny, sglang)) == []
    # in_place pauses keep KV that SGLang will not flush: no prefix cache may outlive a weight update
    in_place = ["weight_sync.pause_mode=in_place"]
    assert engine_args(load_config(tiny, sglang + in_place)) == ["--disable-radix-cache"]
    assert engine_args(load_config(tiny, colocated + sglang + in_place)) == [
        "--disable-radix-cache", "--enable-memory-saver",
    ]  # fmt: skip
    # the CPU engine has no prefix cache; it loads weights only from the run's staging root, in every mode
    assert engine_args(load_config(tiny, in_place)) == ["--update-weights-root", "/dev/shm"]


# ------------------------------------------------------------------ (5) held against SGLang's own source
# The pinned wheels (pip download --no-deps, cached in ~/.cache/dapo-rl/sglang/<version>; skipped without a
# registry) are read with ast: routes, request classes, ServerArgs flags and messages, per supported release.
@pytest.fixture(params=SGLANG_VERSIONS_CHECKED)
def release(request):
    src.source(request.param)  # skips, naming why, where the wheel cannot be obtained
    return request.param


def test_supported_releases_are_the_checked_ones():
    assert tuple(PROTOCOLS) == SGLANG_VERSIONS_CHECKED


def test_protocol_table_matches_the_source(release):
    proto, routes = PROTOCOLS[release], src.routes(release)
    assert ("/begin_weight_update" in routes) == ("/end_weight_update" in routes) == proto.session
    flat = "load_format" in src.fields(release, "UpdateWeightsFromDistributedReqInput")
    assert flat == proto.flat_buckets
    assert ("timeout" in src.function_args(release, src.HTTP, "flush_cache")) == proto.flush_timeout
    assert ("flush_cache" in src.fields(release, "UpdateWeightFromDiskReqInput")) == proto.disk_flush_field
    assert ("--admin-api-key" in src.server_flags(release)) == proto.admin_api_key
    for path in (proto.model_info_path, proto.server_info_path):
        assert "GET" in routes[path]["methods"]
    # the server info reports the version the client negotiates with
    assert "version" in src.function_strings(release, src.HTTP, routes[proto.server_info_path]["handler"])
    for deprecated in ("/get_model_info", "/get_server_info"):  # 0.5.23 warns on every call of the old forms
        text = src.function_source(release, src.HTTP, routes[deprecated]["handler"])
        assert ("deprecated" in text) == (deprecated != getattr(proto, deprecated[5:] + "_path"))


def test_client_bodies_fit_the_request_classes_of_each_release(release):
    """Every request the client makes exists in that release with that method, and every field it sends is a field
    of the route's request class (0.5.x drops unknown fields silently: a field it lacks is a protocol bug)."""
    routes = src.routes(release)
    _, seen = run(_drive_client(release, admin_key="adm" if PROTOCOLS[release].admin_api_key else ""))
    for method, path, body, auth, _ in seen:
        if path == "/server_info" and path not in routes:
            continue  # the version probe, answered 404 by releases before /server_info (then /get_server_info)
        assert path in routes and method in routes[path]["methods"], (release, method, path)
        cls = routes[path]["request"]
        if isinstance(body, dict) and body and cls not in (None, "Request", "float"):
            assert set(body) <= set(src.fields(release, cls)), (
                release,
                path,
                set(body) - set(src.fields(release, cls)),
            )
        if path == "/generate":
            sampling = (
                src.fields(release, "SamplingParams", "api/v1/api_types.py")
                if src.has(release, "api/v1/api_types.py")
                else src.function_args(release, "srt/sampling/sampling_params.py", "__init__")
            )
            assert set(body["sampling_params"]) <= set(sampling)
        if PROTOCOLS[release].admin_api_key:  # the admin key exactly where the route is ADMIN_OPTIONAL
            admin = routes[path]["auth"] in ("ADMIN_OPTIONAL", "ADMIN_FORCE")
            assert auth == API_KEY_PREFIX + ("adm" if admin else "k"), path


def test_local_engine_answers_like_the_0_5_23_source():
    v = "0.5.23"
    src.source(v)
    updater = src.strings(v, "srt/managers/scheduler_components/weight_updater.py")
    for route in ("update_weights_from_distributed", "update_weights_from_tensor"):
        assert MSG_NEEDS_SESSION.format(route=route) in updater
    assert MSG_SESSION_OPEN in updater and MSG_NO_SESSION in updater
    http = src.strings(v, src.HTTP)
    assert MSG_FLUSH_OK in http and MSG_FLUSH_FAILED in http
    assert (
        MSG_FLUSH_TIMEOUT in src.strings(v, "srt/managers/scheduler_components/flush_wrapper.py")
        if src.has(v, "srt/managers/scheduler_components/flush_wrapper.py")
        else True
    )
    assert tuple(src.fields(v, "SamplingParams", "api/v1/api_types.py")) == SGLANG_SAMPLING_FIELDS
    # SGLang's own unknown-field formatter (a pure function) produces the local engine's message
    ns: dict = {"JsonContractError": ValueError, "Tuple": tuple}
    exec(src.function_source(v, "api/v1/api_types.py", "_unknown_field"), ns)
    assert str(ns["_unknown_field"]("bogus", SGLANG_SAMPLING_FIELDS)) == _unknown_field("bogus", SGLANG_SAMPLING_FIELDS)
    tm = src.function_source(v, "srt/managers/tokenizer_manager.py", "_validate_one_request")
    assert "is longer than the model's context length" in tm
    assert "Requested token count exceeds the model's maximum context length" in tm


def test_launcher_flags_exist_in_server_args(release):
    proto = PROTOCOLS[release]
    cfg = EngineConfig(backend="sglang", tp=2, context_length=4096, deterministic_inference=True,
                       skip_tokenizer_init=True, random_seed=7, weight_version="w0")  # fmt: skip
    admin = "adm" if proto.admin_api_key else ""
    cmd = sglang_command(cfg, "/m", 1, api_key="k", admin_api_key=admin, release=release)
    flags = [a for a in cmd if a.startswith("--")]
    assert set(flags) <= src.server_flags(release), set(flags) - src.server_flags(release)
    assert {"--context-length", "--enable-deterministic-inference", "--random-seed", "--weight-version"} <= set(flags)
    if not proto.admin_api_key:
        with pytest.raises(ConfigError, match="engine.admin_api_key.*no --admin-api-key"):
            sglang_command(cfg, "/m", 1, admin_api_key="adm", release=release)
    for extra in ("--disable-radix-cache", "--enable-memory-saver", "--update-weights-root"):
        assert extra in src.server_flags(release) or extra == "--update-weights-root"  # the last is CPU-engine only


# ------------------------------------------------------------------ (6) context length and stop tokens
def test_config_checks_prompt_plus_response_against_the_context_length(tmp_path):
    from pipeline.config import load_config, model_context_length

    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    ctx = load_config(tiny).model.tiny.max_position_embeddings
    too_long = [f"rollout.max_new_tokens={ctx}"]
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens.*data.max_prompt_tokens \+ rollout.max_new_tokens"):
        load_config(tiny, too_long)
    with pytest.raises(ConfigError, match="model.tiny.max_position_embeddings"):
        load_config(tiny, too_long)
    cfg = load_config(tiny, too_long + [f"engine.context_length={2 * ctx}"])  # explicit, and the launcher passes it
    assert model_context_length(cfg) == (2 * ctx, "engine.context_length")
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 100}')
    with pytest.raises(ConfigError, match="exceeds the context length 100 .*config.json"):
        load_config(tiny, [f"model.path={tmp_path}", f"model.tokenizer={tmp_path}", "rollout.max_new_tokens=64"])
    cfg = EngineConfig(backend="sglang", context_length=8192)
    assert sglang_command(cfg, "/m", 1)[-2:] == ["--context-length", "8192"]


def test_stop_tokens_as_sglang_computes_them(local_app):
    from types import SimpleNamespace

    from engines.sglang.protocol import stop_token_ids

    class Tok:
        eos_token_id = 5

        def get_added_vocab(self):
            return {"<|eom_id|>": 6, "<|im_start|>": 7}

    config, gen = SimpleNamespace(eos_token_id=[1, 2]), SimpleNamespace(eos_token_id=3)
    assert stop_token_ids(config, gen, Tok()) == {1, 2, 3, 5, 6}
    assert stop_token_ids(config, None, None) == {1, 2}  # --skip-tokenizer-init: the model's ids only
    engine = local_app.engine
    before = set(engine.eos_ids)
    try:
        LocalServer(engine, "tiny", tokenizer=Tok())  # the CPU engine now stops where SGLang stops
        assert engine.eos_ids == before | {5, 6}
    finally:
        engine.eos_ids = before


def test_local_server_can_speak_0_5_5(local_app):
    """The CPU engine as SGLang 0.5.5: no session routes (updates need none), the /get_* info routes only, no flush
    timeout, and load_format dropped as 0.5.5's request class drops it (a flat bucket would be misread there, which
    is why the client never sends one to 0.5.5)."""
    server = LocalServer(local_app.engine, "tiny", api_key="k", sglang_release="0.5.5")
    auth = {API_KEY_HEADER: API_KEY_PREFIX + "k"}
    name = "model.norm.weight"
    value = local_app.engine.params[name].detach().clone()

    async def go():
        client = TestClient(TestServer(server.app(), host="127.0.0.1"))
        await client.start_server()
        got = {}
        try:
            for path in ("/begin_weight_update", "/end_weight_update"):
                async with client.post(path, json={}, headers=auth) as r:
                    got[path] = r.status
            for path in ("/server_info", "/model_info", "/get_server_info"):
                async with client.get(path, headers=auth) as r:
                    got[path] = (r.status, (await r.json()).get("version") if r.status == 200 else None)
            tens = {"serialized_named_tensors": [encode_named_tensors({name: value})]}
            async with client.post("/update_weights_from_tensor", json=tens, headers=auth) as r:
                got["tensor"] = r.status
        finally:
            await client.close()
        return got

    got = run(go())
    assert got["/begin_weight_update"] == got["/end_weight_update"] == 404
    assert got["/server_info"][0] == got["/model_info"][0] == 404 and got["/get_server_info"] == (200, "0.5.5")
    assert got["tensor"] == 200  # no session needed in 0.5.5


# ------------------------------------------------------------------ (7) MoE routed experts (rollout routing replay)
ROUTED_FIELDS = {"return_routed_experts", "routed_experts_start_len"}  # GenerateReqInput, 0.5.23
ROUTED_META_KEY = "routed_experts"  # meta_info: base64 of int32 (tokens, num_hidden_layers, top_k)
ROUTED_SERVER_FLAG = "--enable-return-routed-experts"


def test_routed_experts_fields_flag_and_encoding_are_sglangs():
    v = "0.5.23"
    src.source(v)
    assert ROUTED_FIELDS <= set(src.fields(v, "GenerateReqInput"))
    assert ROUTED_SERVER_FLAG in src.server_flags(v)
    # tokenizer_manager puts the detokenizer's base64 string (or encodes a tensor's raw bytes) under meta_info
    text = (src.source(v) / "srt/managers/tokenizer_manager.py").read_text()
    assert f'meta_info["{ROUTED_META_KEY}"] = val' in text and "b64encode(val.numpy().tobytes())" in text
    # the capture buffers are int32 (tokens, layers, top_k); the rows are the fed tokens [start, seqlen - 1)
    base = (src.source(v) / "srt/state_capturer/base.py").read_text()
    assert "(num_tokens, num_layers, topk_size),\n            dtype=torch.int32" in base
    assert "[start_len : seqlen - 1]" in base
    routed = (src.source(v) / "srt/state_capturer/routed_experts.py").read_text()
    assert "num_layers = model_config.hf_text_config.num_hidden_layers" in routed
    assert "np.frombuffer(" in routed and "dtype=np.int32" in routed
    brp = (src.source(v) / "srt/managers/scheduler_components/batch_result_processor.py").read_text()
    assert "seqlen = len(req.origin_input_ids) + len(req.output_ids_through_stop)" in brp


@pytest.fixture(scope="module")
def moe_app():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = build_tiny_model(seed=0, max_position=256, model_type="qwen3_moe")
    engine = Engine(model, max_running=4).start()
    yield LocalServer(engine, "tiny-moe", enable_return_routed_experts=True), LocalServer(engine, "tiny-moe")
    engine.stop()
    torch.set_num_threads(before)


def test_local_engine_returns_routed_experts_like_sglang(moe_app):
    from engines.client import GenerateOutput, routed_experts
    from engines.local.routing import RouteRecorder

    server, no_flag = moe_app
    prompt = [5, 6, 7, 8, 9]
    sp = {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}

    async def go(app, body):
        client = TestClient(TestServer(app.app(), host="127.0.0.1"))
        await client.start_server()
        try:
            async with client.post("/generate", json=body) as r:
                return r.status, await r.json()
        finally:
            await client.close()

    body = {"input_ids": prompt, "sampling_params": sp, "return_logprob": True, "return_routed_experts": True}
    status, obj = run(go(server, body))
    assert status == 200 and isinstance(obj["meta_info"][ROUTED_META_KEY], str)
    out = parse_generate_output(obj, "http://e")
    assert isinstance(out, GenerateOutput)
    routes = routed_experts(out, num_layers=2, top_k=2)
    assert routes.dtype.name == "int16" and routes.shape == (len(prompt) + 4 - 1, 2, 2)
    # the experts a full HF forward of the fed tokens routes them to
    rec = RouteRecorder(server.engine.model)
    try:
        with torch.no_grad():
            server.engine.model(input_ids=torch.tensor([prompt + out.output_ids[:-1]]))
        want = rec.take(1, len(prompt) + 3)[0]
    finally:
        rec.remove()
    assert (torch.from_numpy(routes.astype("int32")) == want).all()
    status, obj2 = run(go(server, {**body, "routed_experts_start_len": 3}))
    assert status == 200 and obj2["output_ids"] == obj["output_ids"]
    tail = routed_experts(parse_generate_output(obj2, "http://e"), 2, 2, start_len=3)
    assert (tail == routes[3:]).all()
    status, bad = run(go(server, {**body, "routed_experts_start_len": 6}))
    assert status == 400 and "is higher than the number of input tokens" in str(bad)
    status, plain = run(go(no_flag, body))  # SGLang without --enable-return-routed-experts: no field
    assert status == 200 and ROUTED_META_KEY not in plain["meta_info"]
    assert routed_experts(parse_generate_output(plain, "http://e"), 2, 2) is None
    with pytest.raises(EngineError, match="has 20 ids, expected 8 tokens"):
        routed_experts(parse_generate_output(obj2, "http://e"), 2, 2)


def test_client_sends_routed_expert_fields_of_the_request_class():
    app, seen = _fake_sglang("0.5.23")

    async def go():
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        client = EngineClient([str(server.make_url("")).rstrip("/")])
        try:
            await client.generate([1, 2], {"max_new_tokens": 1}, return_routed_experts=True, routed_experts_start_len=1)
            await client.generate([1, 2], {"max_new_tokens": 1})
        finally:
            await client.close()
            await server.close()

    run(go())
    bodies = [body for _, path, body, _, _ in seen if path == "/generate"]
    assert ROUTED_FIELDS <= set(bodies[0]) and bodies[0]["routed_experts_start_len"] == 1
    assert not ROUTED_FIELDS & set(bodies[1])  # off: the fields are not sent at all
    assert set(bodies[0]) <= set(src.fields("0.5.23", "GenerateReqInput"))
