"""aiohttp server exposing the CPU engine under SGLang's HTTP routes and JSON fields.

Contract (routes and fields checked against sglang 0.5.5 and 0.5.23 `entrypoints/http_server.py` and
`managers/io_struct.py`; tests/test_sglang_contract.py pins them):
- POST /generate {input_ids | text, sampling_params, return_logprob, rid, ...} -> {"text"?, "output_ids",
  "meta_info": {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version",
  "output_token_logprobs": [[logprob, token_id, null], ...]}}; n > 1 (or a batch of input_ids) -> a list.
  MoE routing (SGLang's): with `return_routed_experts` (and `routed_experts_start_len`, in [0, prompt tokens]) on a
  server started with --enable-return-routed-experts, meta_info["routed_experts"] = base64 of int32
  (tokens, num_hidden_layers, top_k) for the fed tokens [start, prompt + completion - 1) (engines/local/routing.py).
- GET /health, /health_generate, /get_model_info (+ /model_info), /get_server_info (+ /server_info),
  /get_weight_version; GET|POST /flush_cache[?timeout=S]; POST /abort_request {rid, abort_all}; POST
  /pause_generation {mode}; POST /continue_generation; POST /init_weights_update_group,
  /destroy_weights_update_group, /begin_weight_update {selector}, /end_weight_update {},
  /update_weights_from_distributed, /update_weights_from_tensor, /update_weight_version; GET|POST
  /get_weights_by_name {name, truncate_size}.
- As strict as the SGLang release it speaks (`sglang_release`, default the latest supported; server info reports
  it as "version" so a client negotiates the same protocol it would with SGLang), with SGLang's status codes and
  messages (engines.sglang.protocol):
  - 0.5.23 session rule: /update_weights_from_distributed and /update_weights_from_tensor outside a session ->
    400 "... must run between begin_weight_update() and end_weight_update()", WITHOUT joining the broadcast;
    /begin_weight_update while a session is open and /end_weight_update without one -> 400. (0.5.5: no session
    routes, updates need none; `load_format` is dropped as 0.5.5 does, so a flattened bucket fails there.)
  - sampling_params keys that SGLang's SamplingParams does not have -> 400 {"error": "unknown field `k`, ..."}.
  - a prompt of >= context length tokens, or prompt + max_new_tokens > context length -> 400 with SGLang's text.
  - /flush_cache while requests run (or wait, unless paused) -> 400; with ?timeout=S (0.5.23) it waits up to S
    seconds for that, then 400 "Timed out waiting for idle state.". The CPU engine has no prefix cache, so a flush
    that succeeds drops nothing.
- POST /update_weights_from_disk {model_path, load_format, abort_all_requests, weight_version, flush_cache} ->
  {"success", "message", "num_paused_requests"} (see updates.py; `weights_root` restricts model_path).
- GET|POST /release_memory_occupation {tags} and /resume_memory_occupation {tags} -> JSON null, or 400 with
  {"error": {"message"}} (release while requests run). While released, requests wait (see engine.py).
- Our extension, not SGLang's: POST /weights_checksum {names?: [str], dtype?: str} -> {"checksum": hex sha256 over
  (name, bytes) of the named parameters in order (default: the model's state_dict order)}.
- With an API key every route except /health* needs `Authorization: Bearer <key>` (SGLang's rule), else 401.
- Errors: 400 {"error": {"message": ...}} for bad input; weight routes answer {"success", "message"} with 400 when
  success is false, like SGLang.
- Limits (`Limits`, engine options; SGLang has none of these, so their refusals use its generic 400 for a
  ValueError and HTTP's 413 for a body): `sampling_params.n` <= max_n, requests in one body (prompts x n) <=
  max_batch, a body <= max_body_bytes (max_weights_body_bytes for /update_weights_from_tensor, whose base64
  safetensors buckets are large), else 413 before the body is read into memory. Every malformed request is a 4xx
  with a one-line reason; an unexpected exception while parsing a request is a 400 naming the exception, never a
  500 (only a failure of the engine itself is a 5xx).
- /init_weights_update_group waits at most `group_timeout_s` (engine option; a body field `timeout_s`, our
  extension, may shorten it) for the other ranks, on a daemon thread, so SIGTERM still stops a server whose join
  hangs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import threading
import uuid
from typing import Any

import msgspec
import torch
from aiohttp import web

from engines.local.engine import Engine, Request
from engines.local.routing import encode_routing
from engines.local.sampling import SamplingParams
from engines.local.updates import WeightReceiver
from engines.sglang import protocol as sgl
from pipeline.contracts.weight_wire import parse_dtype

log = logging.getLogger(__name__)

ENGINE_NAME = "dapo-local-0.1"
# sglang 0.5.23 sglang/api/v1/api_types.py SamplingParams, in declaration order (its unknown-field message lists them)
SGLANG_SAMPLING_FIELDS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)  # fmt: skip
PUBLIC_PREFIXES = ("/health", "/ready", "/metrics")
# GenerateReqInput fields we accept; those we do not implement must keep their neutral value.
_GENERATE_FIELDS = {"text", "input_ids", "sampling_params", "return_logprob", "rid", "stream"}
_GENERATE_FIELDS |= {"return_routed_experts", "routed_experts_start_len"}  # MoE routing (engines/local/routing.py)
_GENERATE_NEUTRAL: dict[str, Any] = {
    "logprob_start_len": -1,
    "top_logprobs_num": 0,
    "token_ids_logprob": None,
    "return_text_in_logprobs": False,
    "log_metrics": True,
    "return_hidden_states": False,
    "return_entropy": False,
    "custom_labels": None,
    "priority": None,
    "extra_key": None,
    "no_logs": False,
    "lora_path": None,
    "data_parallel_rank": None,
}


class BadRequest(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask of the engine (engine options: `python -m engines.local --max-n ...`)."""

    max_n: int = 256
    """sampling_params.n at most this (n=1e8 once grew the engine to 19.5 GB)."""
    max_batch: int = 4096
    """Requests one body may create (prompts x n)."""
    max_body_bytes: int = 32 * 2**20
    """Bytes of a request body (413 above)."""
    max_weights_body_bytes: int = 1536 * 2**20
    """Bytes of an /update_weights_from_tensor body (a 512 MB bucket is ~683 MB in base64)."""
    group_timeout_s: float = 120.0
    """Longest wait of /init_weights_update_group for the other ranks (also the group's per-broadcast timeout)."""


class ContractError(BadRequest):
    """SGLang's /generate schema gate: answered as 400 {"error": "<text>"}."""


def _unknown_field(key: str, fields: tuple[str, ...]) -> str:
    listed = ", ".join(f"`{f}`" for f in fields)
    return f"unknown field `{key}`, expected one of {listed}"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")


def _error(message: str, status: int = 400) -> web.Response:
    return _json({"error": {"message": message}}, status)


def _result(success: bool, message: str, **extra: Any) -> web.Response:
    return _json({"success": success, "message": message, **extra}, 200 if success else 400)


async def _body(request: web.Request) -> dict:
    # aiohttp answers 413 itself once more than client_max_size bytes arrive (chunked bodies too); a declared
    # length over the limit is refused before a byte is read
    limit = request._client_max_size  # noqa: SLF001 - aiohttp keeps the (per-request) limit only here
    if limit and request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _require(body: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in body]
    if missing:
        raise BadRequest(f"missing field {missing[0]!r}")


class LocalServer:
    def __init__(
        self,
        engine: Engine,
        model_path: str,
        tokenizer=None,
        api_key: str = "",
        weights_root: str = "",
        sglang_release: str = sgl.LATEST.release,
        enable_return_routed_experts: bool = False,
        limits: Limits | None = None,
        **info: Any,
    ) -> None:
        self.engine = engine
        # SGLang's --enable-return-routed-experts: without it a request's return_routed_experts returns nothing.
        self.enable_return_routed_experts = enable_return_routed_experts
        self.model_path = model_path
        self.tokenizer = tokenizer
        self._api_key = api_key
        self.info = info
        self.limits = limits or Limits()
        self.receiver = WeightReceiver(engine, self.limits.group_timeout_s, allowed_root=weights_root)
        self.protocol = sgl.protocol_for(sglang_release)
        self.session_open = False  # 0.5.23's weight-update session (one per engine)
        self._joins: set[asyncio.Future] = set()  # group joins in progress (cancelled at shutdown)
        if tokenizer is not None:  # SGLang also stops at the tokenizer's EOS and extra stop tokens
            engine.eos_ids |= sgl.stop_token_ids(tokenizer=tokenizer)

    # ------------------------------------------------------------------ app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth, self._errors], client_max_size=self.limits.max_body_bytes)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/health_generate", self.health_generate)
        for path in {"/get_model_info", self.protocol.model_info_path}:
            r.add_get(path, self.model_info)
        for path in {"/get_server_info", self.protocol.server_info_path}:
            r.add_get(path, self.server_info)
        r.add_get("/get_weight_version", self.get_weight_version)
        r.add_get("/get_load", self.get_load)
        for method in ("POST", "PUT"):
            r.add_route(method, "/generate", self.generate)
        for method in ("GET", "POST"):
            r.add_route(method, "/flush_cache", self.flush_cache)
            r.add_route(method, "/get_weights_by_name", self.get_weights_by_name)
            r.add_route(method, "/release_memory_occupation", self.release_memory_occupation)
            r.add_route(method, "/resume_memory_occupation", self.resume_memory_occupation)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/init_weights_update_group", self.init_weights_update_group)
        r.add_post("/destroy_weights_update_group", self.destroy_weights_update_group)
        if self.protocol.session:
            r.add_post("/begin_weight_update", self.begin_weight_update)
            r.add_post("/end_weight_update", self.end_weight_update)
        r.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)
        r.add_post("/update_weights_from_tensor", self.update_weights_from_tensor)
        r.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        r.add_post("/update_weight_version", self.update_weight_version)
        r.add_post("/weights_checksum", self.weights_checksum)
        app.on_shutdown.append(self._cancel_joins)
        return app

    async def _cancel_joins(self, _app: web.Application) -> None:
        """A join waiting for a dead master must not hold up shutdown (aiohttp waits for running handlers)."""
        for fut in list(self._joins):
            fut.cancel()

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self._api_key and not request.path.startswith(PUBLIC_PREFIXES):
            expected = f"Bearer {self._api_key}".encode()
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                return _json({"error": "Unauthorized"}, 401)
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except ContractError as e:
            return _json({"error": str(e)}, 400)
        except BadRequest as e:
            return _error(str(e))
        except web.HTTPException:
            raise  # aiohttp's own answers (413 body too large, 405, 404)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
            return _error(_one_line(f"{type(e).__name__}: {e}"))

    async def _on_engine(self, fn) -> Any:
        return await asyncio.wrap_future(self.engine.call(fn))

    # ------------------------------------------------------------------ info
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.engine.alive else 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        if not self.engine.alive:
            return web.Response(status=503)
        load = self.engine.load()
        if load["paused"] or load["num_running"] or load["released"]:
            return web.Response(status=200)  # busy, paused or released: the engine thread is alive, nothing to prove
        params = SamplingParams(max_new_tokens=1, temperature=0.0)
        req = Request(rid=f"HEALTH_CHECK_{uuid.uuid4().hex}", prompt=[0], params=params, return_logprob=False)
        try:
            await asyncio.wait_for(self._run([req]), timeout=20)
        except (TimeoutError, RuntimeError):
            return web.Response(status=503)
        return web.Response(status=200)

    def _model_info(self) -> dict:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path if self.tokenizer is not None else None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.engine.weight_version,
            "model_type": getattr(self.engine.model.config, "model_type", None),
            "architectures": getattr(self.engine.model.config, "architectures", None),
        }

    async def model_info(self, request: web.Request) -> web.Response:
        return _json(self._model_info())

    async def server_info(self, request: web.Request) -> web.Response:
        return _json(
            {
                **self.info,
                "model_path": self.model_path,
                "weight_version": self.engine.weight_version,
                "max_running_requests": self.engine.max_running,
                "context_length": self.engine.max_len,
                "runner": type(self.engine.runner).__name__,
                "internal_states": [{**self.engine.load(), "steps": self.engine.steps}],
                "version": self.protocol.release,  # the protocol spoken, so clients negotiate it
                "engine": ENGINE_NAME,
            }
        )

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return _json({"weight_version": self.engine.weight_version})

    async def get_load(self, request: web.Request) -> web.Response:
        return _json([self.engine.load()])

    # ------------------------------------------------------------------ generation
    def _build_requests(self, body: dict) -> tuple[list[Request], bool]:
        for key, value in body.items():
            if key in _GENERATE_FIELDS:
                continue
            if key in _GENERATE_NEUTRAL:
                if value not in (_GENERATE_NEUTRAL[key], None):
                    raise BadRequest(f"{key}={value!r} is not supported by the local engine")
                continue
            raise BadRequest(f"unknown field {key!r}")
        if body.get("stream"):
            raise BadRequest("stream=true is not supported by the local engine")
        prompts, single = self._prompts(body)
        sp = body.get("sampling_params")
        if sp is not None and not isinstance(sp, (dict, list)):
            raise BadRequest("sampling_params must be an object or a list of objects")
        sps = sp if isinstance(sp, list) else [sp] * len(prompts)
        if len(sps) != len(prompts):
            raise BadRequest(f"sampling_params has {len(sps)} entries for {len(prompts)} prompts")
        for p in sps:
            if p is not None and not isinstance(p, dict):
                raise BadRequest("sampling_params must be an object or a list of objects")
            unknown = [k for k in (p or {}) if k not in SGLANG_SAMPLING_FIELDS]
            if unknown:
                raise ContractError(_unknown_field(unknown[0], SGLANG_SAMPLING_FIELDS))
        params = [SamplingParams.from_json(p) for p in sps]
        n = params[0].n
        if any(p.n != n for p in params):
            raise BadRequest("sampling_params.n must be the same for every prompt")
        if not 1 <= n <= self.limits.max_n:
            raise BadRequest(f"sampling_params.n must be in [1, {self.limits.max_n}] (engine option --max-n), got {n}")
        if n > 1 and not single:
            raise BadRequest("n > 1 with a batch of prompts is not supported by the local engine")
        if len(prompts) * n > self.limits.max_batch:
            raise BadRequest(
                f"{len(prompts)} prompts x n={n} requests in one body exceed {self.limits.max_batch} "
                "(engine option --max-batch)"
            )
        rid = body.get("rid")
        if isinstance(rid, list):
            # SGLang's GenerateReqInput._normalize_rid text
            if single or len(rid) != len(prompts):
                raise BadRequest("The specified rids length mismatch with the batch_size for batch processing.")
            if not all(isinstance(r, str) for r in rid):
                raise BadRequest("The rid should be a string or a list of strings.")
        elif rid is not None and not isinstance(rid, str):
            raise BadRequest("The rid should be a string or a list of strings.")
        rets = body.get("return_logprob")
        if isinstance(rets, list):
            if len(rets) != len(prompts) or not all(isinstance(r, (bool, type(None))) for r in rets):
                raise BadRequest(f"return_logprob must be a bool or a list of {len(prompts)} bools (one per prompt)")
        elif rets is not None and not isinstance(rets, bool):
            raise BadRequest("return_logprob must be a bool or a list of bools")
        rets = rets if isinstance(rets, list) else [bool(rets)] * len(prompts)
        reqs = []
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            self._check_length(prompt, p)
            for j in range(n):
                if isinstance(rid, list):
                    sub = rid[i]
                elif rid is None:
                    sub = uuid.uuid4().hex
                else:
                    sub = rid if (single and n == 1) else f"{rid}_{i * n + j}"
                reqs.append(Request(rid=str(sub), prompt=prompt, params=p, return_logprob=bool(rets[i])))
        self._routing_request(body, reqs)
        return reqs, single and n == 1

    def _routing_request(self, body: dict, reqs: list[Request]) -> None:
        """return_routed_experts / routed_experts_start_len, with SGLang's scheduler checks of the start."""
        start = body.get("routed_experts_start_len") or 0
        if not body.get("return_routed_experts"):
            return
        for req in reqs:
            if not isinstance(start, int) or start < 0:
                raise BadRequest(f"{start=} is lower than 0. Please use a non-negative routed_experts_start_len.")
            if start > len(req.prompt):
                raise BadRequest(
                    f"routed_experts_start_len={start} is higher than the number of input tokens "
                    f"{len(req.prompt)}. Please use a smaller routed_experts_start_len."
                )
            req.return_routed_experts = self.enable_return_routed_experts
            req.routed_experts_start_len = start

    def _check_length(self, prompt: list[int], p: SamplingParams) -> None:
        """SGLang's TokenizerManager._validate_one_request, with its messages (no auto-truncation)."""
        ctx = self.engine.max_len
        if not prompt:
            raise BadRequest("input_ids must not be empty")
        if len(prompt) >= ctx:
            raise BadRequest(
                f"The input ({len(prompt)} tokens) is longer than the model's context length ({ctx} tokens)."
            )
        if len(prompt) + p.max_new_tokens > ctx:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You requested a "
                f"total of {len(prompt) + p.max_new_tokens} tokens: {len(prompt)} tokens from the input messages and "
                f"{p.max_new_tokens} tokens for the completion. Please reduce the number of tokens in the input "
                "messages or the completion to fit within the limit."
            )

    def _prompts(self, body: dict) -> tuple[list[list[int]], bool]:
        ids = body.get("input_ids")
        if ids is None:
            text = body.get("text")
            if text is None:
                raise BadRequest("either input_ids or text is required")
            if self.tokenizer is None:
                raise BadRequest("text input needs a tokenizer in the model directory; send input_ids")
            if not (
                isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))
            ):
                raise BadRequest("text must be a string or a non-empty list of strings")
            texts = [text] if isinstance(text, str) else text
            ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
            return ids, isinstance(text, str)
        if not isinstance(ids, list) or not ids:
            raise BadRequest("input_ids must be a non-empty list")
        single = not isinstance(ids[0], list)
        prompts = [ids] if single else ids
        vocab = self.engine.model.config.vocab_size
        for i, p in enumerate(prompts):
            if not isinstance(p, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p
            ):
                raise BadRequest(f"input_ids[{i}] must hold integers in [0, {vocab})")
        return [list(p) for p in prompts], single

    async def _run(self, reqs: list[Request]) -> list[Request]:
        loop = asyncio.get_running_loop()
        futs = []
        for req in reqs:
            fut = loop.create_future()
            req.on_done = lambda r, f=fut: loop.call_soon_threadsafe(_set_once, f, r)
            futs.append(fut)
        for req in reqs:
            self.engine.submit(req)
        try:
            return list(await asyncio.gather(*futs))
        except asyncio.CancelledError:
            for req in reqs:  # the client went away: free the engine (SGLang does the same)
                self.engine.abort(req.rid)
            raise

    def _output(self, req: Request) -> dict:
        if req.error is not None:
            raise RuntimeError(req.error)
        meta = {
            "id": req.rid,
            "finish_reason": req.finish,
            "prompt_tokens": len(req.prompt),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": 0,
            "weight_version": req.weight_version,
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(req.logprobs, req.output_ids, strict=True)]
        routing = req.routing() if req.return_routed_experts else None
        if routing is not None:  # SGLang: the fed tokens [start, prompt + completion - 1), base64 of int32
            meta["routed_experts"] = encode_routing(
                routing[req.routed_experts_start_len : len(req.prompt) + len(req.output_ids) - 1]
            )
        out: dict[str, Any] = {"output_ids": req.output_ids, "meta_info": meta}
        if self.tokenizer is not None:
            out = {"text": self.tokenizer.decode(req.output_ids), **out}
        return out

    async def generate(self, request: web.Request) -> web.Response:
        reqs, single = self._build_requests(await _body(request))
        done = await self._run(reqs)
        try:
            outs = [self._output(r) for r in done]
        except RuntimeError as e:
            return _error(f"engine failed: {e}", 500)
        return _json(outs[0] if single else outs)

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await _body(request)
        rid, abort_all = body.get("rid"), body.get("abort_all", False)
        _check_type(body, "rid", (str, type(None)), "a string")  # AbortReq.rid: str
        _check_type(body, "abort_all", (bool, type(None)), "a bool")
        self.engine.abort(rid=rid or None, abort_all=bool(abort_all))
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await _body(request)
        mode = body.get("mode", "abort")
        _check_type(body, "mode", str, "a string")
        await asyncio.wrap_future(self.engine.pause(mode))
        return _json({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await _body(request)
        await asyncio.wrap_future(self.engine.resume())
        return _json({"message": "Generation continued successfully.", "status": "ok"})

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _check_tags(body)
        await asyncio.wrap_future(self.engine.release_memory(body.get("tags")))
        log.info("release_memory_occupation: released %s", sorted(self.engine.released))
        return _json(None)

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _check_tags(body)
        await asyncio.wrap_future(self.engine.resume_memory(body.get("tags")))
        log.info("resume_memory_occupation: still released %s", sorted(self.engine.released))
        return _json(None)

    def _idle(self) -> bool:
        """SGLang's Scheduler.is_fully_idle(ignore_waiting=paused): nothing running, nothing waiting unless paused."""
        load = self.engine.load()
        return load["num_running"] == 0 and (bool(load["paused"]) or load["num_waiting"] == 0)

    async def flush_cache(self, request: web.Request) -> web.Response:
        # No prefix cache to drop (KV lives only as long as its request); refused when SGLang would refuse.
        timeout = 0.0
        if self.protocol.flush_timeout and "timeout" in request.query:
            try:
                timeout = float(request.query["timeout"])
            except ValueError:
                return _json({"detail": "timeout must be a number"}, 422)
            if timeout < 0:
                return _json({"detail": "timeout must be >= 0"}, 422)
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._idle():
            if timeout <= 0:  # 0.5.5 answers its success text with the 400
                text = sgl.MSG_FLUSH_FAILED if self.protocol.flush_timeout else sgl.MSG_FLUSH_OK
                return web.Response(text=text, status=400)
            if asyncio.get_running_loop().time() >= deadline:
                return web.Response(text=sgl.MSG_FLUSH_TIMEOUT, status=400)
            await asyncio.sleep(0.01)
        return web.Response(text=sgl.MSG_FLUSH_OK, status=200)

    # ------------------------------------------------------------------ weights
    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _require(body, "master_address", "master_port", "rank_offset", "world_size")
        _check_type(body, "master_address", str, "a string")
        _check_type(body, "group_name", str, "a string")
        _check_type(body, "backend", str, "a string")
        for key in ("master_port", "rank_offset", "world_size"):
            _check_type(body, key, int, "an integer")
        if not 0 < body["master_port"] < 65536:
            raise BadRequest(f"master_port must be in [1, 65535], got {body['master_port']}")
        if not 0 <= body["rank_offset"] < body["world_size"]:
            raise BadRequest(f"rank_offset {body['rank_offset']} must be in [0, world_size {body['world_size']})")
        args = {k: body[k] for k in ("master_address", "master_port", "rank_offset", "world_size")}
        args["group_name"] = body.get("group_name", "weight_update_group")
        args["backend"] = body.get("backend", "nccl")
        timeout = self.limits.group_timeout_s
        if body.get("timeout_s") is not None:  # our extension: a sender may ask for a shorter bound
            _check_type(body, "timeout_s", (int, float), "a number")
            if not 0 < body["timeout_s"] <= timeout:
                raise BadRequest(f"timeout_s must be in (0, {timeout}] (engine option --group-timeout-s)")
            timeout = float(body["timeout_s"])
        ok, msg = await _in_daemon_thread(lambda: self.receiver.init_group(**args, timeout_s=timeout), self._joins)
        return _result(ok, msg)

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _check_type(body, "group_name", str, "a string")
        group = body.get("group_name", "weight_update_group")
        ok, msg = await self._on_engine(lambda: self.receiver.destroy_group(group))
        return _result(ok, msg)

    async def _weight_update(self, request: web.Request, required: tuple[str, ...], update) -> tuple[dict, bool, str]:
        """The frame of SGLang's update_weights_* routes: the body (with `required`), abort_all_requests, then
        `update(body) -> (success, message)` on the engine thread."""
        body = await _body(request)
        _require(body, *required)
        _check_type(body, "weight_version", (str, type(None)), "a string")
        _check_type(body, "load_format", (str, type(None)), "a string")
        _check_type(body, "group_name", str, "a string")
        for key in ("names", "dtypes"):
            if key in required and not (isinstance(body[key], list) and all(isinstance(x, str) for x in body[key])):
                raise BadRequest(f"{key} must be a list of strings")
        if "shapes" in required and not (
            isinstance(body["shapes"], list)
            and all(isinstance(s, list) and all(_is_int(d) and d >= 0 for d in s) for s in body["shapes"])
        ):
            raise BadRequest("shapes must be a list of lists of non-negative integers")
        if "model_path" in required:
            _check_type(body, "model_path", str, "a string")
        if "serialized_named_tensors" in required:
            _check_type(body, "serialized_named_tensors", (str, list), "a string or a list")
        if body.get("abort_all_requests"):
            self.engine.abort(abort_all=True)
        ok, msg = await self._on_engine(lambda: update(body))
        return body, ok, msg

    async def begin_weight_update(self, request: web.Request) -> web.Response:
        await _body(request)
        if self.session_open:
            return _result(False, sgl.MSG_SESSION_OPEN)
        self.session_open = True
        return _result(True, "Success")

    async def end_weight_update(self, request: web.Request) -> web.Response:
        await _body(request)
        if not self.session_open:
            return _result(False, sgl.MSG_NO_SESSION)
        self.session_open = False
        return _result(True, "Success")

    def _outside_session(self, route: str) -> web.Response | None:
        """0.5.23 refuses distributed/tensor updates outside a session, before joining any broadcast."""
        if self.protocol.session and not self.session_open:
            return _result(False, sgl.MSG_NEEDS_SESSION.format(route=route))
        return None

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        refused = self._outside_session("update_weights_from_distributed")
        if refused is not None:
            return refused
        flat_ok = self.protocol.flat_buckets  # 0.5.5 drops load_format (its request class has no such field)
        _, ok, msg = await self._weight_update(
            request,
            ("names", "dtypes", "shapes"),
            lambda b: self.receiver.update_from_distributed(
                b["names"],
                b["dtypes"],
                b["shapes"],
                b.get("group_name", "weight_update_group"),
                b.get("weight_version"),
                b.get("load_format") if flat_ok else None,
            ),
        )
        return _result(ok, msg)

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        refused = self._outside_session("update_weights_from_tensor")
        if refused is not None:
            return refused
        _, ok, msg = await self._weight_update(
            request.clone(client_max_size=self.limits.max_weights_body_bytes),
            ("serialized_named_tensors",),
            lambda b: self.receiver.update_from_tensor(
                b["serialized_named_tensors"], b.get("load_format"), b.get("weight_version")
            ),
        )
        return _result(ok, msg)

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body, ok, msg = await self._weight_update(
            request,
            ("model_path",),
            lambda b: self.receiver.update_from_disk(b["model_path"], b.get("load_format"), b.get("weight_version")),
        )
        log.log(logging.INFO if ok else logging.WARNING, "update_weights_from_disk %s: %s", body["model_path"], msg)
        return _result(ok, msg, num_paused_requests=0)

    async def update_weight_version(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _require(body, "new_version")
        _check_type(body, "new_version", (str, int), "a string")
        if body.get("abort_all_requests", True):
            self.engine.abort(abort_all=True)
        version = str(body["new_version"])

        def apply() -> None:
            self.engine.weight_version = version

        await self._on_engine(apply)
        return _result(True, f"Weight version updated to {version}", new_version=version)

    async def get_weights_by_name(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _require(body, "name")
        _check_type(body, "name", str, "a string")
        _check_type(body, "truncate_size", int, "an integer")
        param = self.engine.params.get(body["name"])
        if param is None:
            return _error(f"{body['name']}: no such parameter in the model")
        size = max(0, int(body.get("truncate_size", 100)))
        with torch.no_grad():
            values = param.detach().float()[:size].tolist() if param.dim() else [param.item()]
        return _json(values)

    async def weights_checksum(self, request: web.Request) -> web.Response:
        body = await _body(request)
        _check_type(body, "dtype", (str, type(None)), "a string")
        names = body.get("names")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise BadRequest("names must be a list of strings")
        dtype = parse_dtype(body["dtype"]) if body.get("dtype") else None
        checksum = await self._on_engine(lambda: self.engine.checksum(names, dtype))
        return _json({"checksum": checksum})


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_type(body: dict, key: str, types: type | tuple[type, ...], what: str) -> None:
    """400 naming `key` when it is present with another JSON type (bool is not an integer here)."""
    if key not in body:
        return
    value = body[key]
    wanted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in wanted:
        raise BadRequest(f"{key} must be {what}, got {value!r}")
    if not isinstance(value, wanted):
        raise BadRequest(f"{key} must be {what}, got {type(value).__name__}")


def _check_tags(body: dict) -> None:
    tags = body.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise BadRequest("tags must be a list of strings")


async def _in_daemon_thread(fn, running: set[asyncio.Future]) -> Any:
    """`fn()` on a fresh daemon thread: a wait stuck in C (a rendezvous with a dead master) then neither blocks
    the event loop nor the interpreter's exit (the default executor's threads are joined at shutdown, which is
    what kept SIGTERM from stopping the server). The pending future sits in `running` until it resolves."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    running.add(fut)
    fut.add_done_callback(running.discard)

    def run() -> None:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting handler
            loop.call_soon_threadsafe(_set_exc_once, fut, e)
        else:
            loop.call_soon_threadsafe(_set_once, fut, result)

    threading.Thread(target=run, name="group-join", daemon=True).start()
    return await fut


def _set_exc_once(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _set_once(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
