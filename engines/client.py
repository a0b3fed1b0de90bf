"""One async HTTP client for SGLang servers and the local CPU engine (they speak the same protocol).

Contract (routes and fields checked against sglang 0.5.5 and 0.5.23; see tests/test_sglang_contract.py):
- `generate` POSTs /generate {input_ids, sampling_params, return_logprob, rid?} and normalises SGLang's answer
  into `GenerateOutput`: meta_info.finish_reason {"type": ...} -> "stop" | "length" | "abort", and
  meta_info.output_token_logprobs [[logprob, token_id, text], ...] -> [logprob, ...].
- MoE routing (SGLang's R3 capture): `generate(..., return_routed_experts=True, routed_experts_start_len=s)` adds
  those request fields; `routed_experts(out, num_layers, top_k)` decodes meta_info["routed_experts"] (base64 of int32
  (tokens, num_hidden_layers, top_k), the fed tokens [s, prompt + completion - 1)) into a compact np.int16 array
  (None when the answer has none: a server without --enable-return-routed-experts, or a dense model).
- Routing: an explicit `url`; else the engine a `rid` was last sent to (sticky); else the live engine with the
  fewest outstanding requests (ties rotate). With `router_url` (an sglang-router in front of the engines), unrouted
  generate calls go to the router instead, and control calls still go to every engine.
- Retries with exponential backoff on connection errors only; after `max_retries` failed retries the engine is
  marked dead and `EngineDeadError` (naming its URL) is raised; dead engines get no more traffic until
  `add_url`. Timeouts and HTTP errors raise `EngineError` (also naming the URL) without retrying.
- Calls that address all engines (pause, continue, flush, abort_all) run on every live engine concurrently.
- The API key is sent as `Authorization: Bearer <key>` (SGLang's header) and never appears in logs or reprs. With an
  `admin_api_key` (SGLang 0.5.23's --admin-api-key) the control routes (`ADMIN_ROUTES`: weights, pause, continue,
  flush, abort, memory) carry that key instead, as SGLang then refuses the plain one there.
- Version negotiation: `protocol(url)` reads the server's version once (GET /server_info, else /get_server_info
  on servers without it) and returns its `engines.sglang.protocol.Protocol`, or raises `UnsupportedVersion` naming
  the supported releases. Control and weight calls speak that protocol: /model_info or /get_model_info,
  /flush_cache?timeout= where offered, `load_format` only where the route takes it (else ValueError: the caller
  must send per-tensor broadcasts), /begin_weight_update and /end_weight_update where a session exists (no-ops
  answering success on releases without one). Generation needs no negotiation.
- Sync callers (a trainer thread) use `run_sync(coro)` / `submit(coro)`, which run on a private event loop.
- `close()` / `close_sync()` cancel and await every task `submit` started that is still running (a version probe to
  an engine that went away, say) before the sessions close: no task is left pending or with an unretrieved
  exception, and the caller waiting on such a task gets `EngineError` naming the engine URL and route. A task whose
  caller gave up (cancelled its future) and that fails anyway has its exception consumed (logged at debug).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Iterable
from typing import Any

import aiohttp

from engines.sglang.protocol import Protocol, protocol_for
from pipeline.contracts.engine_api import (  # noqa: F401 (routed_experts: re-exported)
    FINISH_REASONS,
    EngineDeadError,
    EngineError,
    GenerateOutput,
    routed_experts,
)

log = logging.getLogger(__name__)

# SGLang 0.5.23 routes marked AuthLevel.ADMIN_OPTIONAL that this client calls (http_server.py)
ADMIN_ROUTES = frozenset({
    "/flush_cache", "/abort_request", "/pause_generation", "/continue_generation", "/init_weights_update_group",
    "/destroy_weights_update_group", "/begin_weight_update", "/end_weight_update", "/update_weights_from_distributed",
    "/update_weights_from_tensor", "/update_weights_from_disk", "/update_weight_version", "/get_weights_by_name",
    "/release_memory_occupation", "/resume_memory_occupation",
})  # fmt: skip
_STICKY_MAX = 100_000


def parse_generate_output(obj: dict, url: str) -> GenerateOutput:
    """Normalise one SGLang /generate result (dict with output_ids and meta_info)."""
    if not isinstance(obj, dict) or "output_ids" not in obj:
        raise EngineError(f"{url}/generate: unexpected answer {str(obj)[:200]!r}", url)
    meta = obj.get("meta_info") or {}
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in FINISH_REASONS:
        raise EngineError(f"{url}/generate: unknown finish_reason {reason!r}", url)
    output_ids = [int(t) for t in obj["output_ids"]]
    raw = meta.get("output_token_logprobs")
    logprobs = [float(item[0]) for item in raw] if raw else []
    if raw is not None and len(logprobs) != len(output_ids):
        raise EngineError(f"{url}/generate: {len(logprobs)} logprobs for {len(output_ids)} output tokens", url)
    return GenerateOutput(
        output_ids=output_ids,
        logprobs=logprobs,
        finish_reason=kind,
        weight_version=str(meta.get("weight_version", "")),
        url=url,
        prompt_tokens=int(meta.get("prompt_tokens", 0)),
        rid=str(meta.get("id", "")),
        meta_info=meta,
    )


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _routing_fields(on: bool, start_len: int) -> dict[str, Any]:
    """SGLang's GenerateReqInput routing fields (sent only when asked: older servers need not know them)."""
    if not on:
        return {}
    return {"return_routed_experts": True, "routed_experts_start_len": int(start_len)}


class EngineClient:
    def __init__(
        self,
        urls: Iterable[str],
        api_key: str = "",
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        connect_timeout_s: float = 10.0,
        router_url: str | None = None,
        pool_size: int = 1024,
        admin_api_key: str = "",
    ) -> None:
        self._urls: list[str] = []
        self._dead: set[str] = set()
        self._protocols: dict[str, Protocol] = {}
        self._outstanding: dict[str, int] = {}
        for url in urls:
            self.add_url(url)
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.router_url = router_url.rstrip("/") if router_url else None
        self.pool_size = pool_size
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._admin_headers = {"Authorization": f"Bearer {admin_api_key}"} if admin_api_key else None
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._sticky: OrderedDict[str, str] = OrderedDict()
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self._bg_loop: asyncio.AbstractEventLoop | None = None
        self._bg_thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()  # started by submit(), on the private loop; close() ends them
        self._closing: set[asyncio.Task] = set()  # those close() cancelled: they fail with an EngineError
        self._ending = False  # close() is cancelling them: a request cut short on the private loop names its URL

    def __repr__(self) -> str:  # never shows the API key
        keys = f"api_key={'***' if self._headers else ''!r}, admin_api_key={'***' if self._admin_headers else ''!r}"
        return f"EngineClient(urls={self._urls}, dead={sorted(self._dead)}, {keys})"

    # ------------------------------------------------------------------ engine set (fault-tolerance hooks)
    @property
    def urls(self) -> list[str]:
        return list(self._urls)

    @property
    def alive_urls(self) -> list[str]:
        return [u for u in self._urls if u not in self._dead]

    def add_url(self, url: str) -> None:
        """Add an engine, or bring a dead one back into rotation."""
        url = url.rstrip("/")
        if url not in self._urls:
            self._urls.append(url)
        self._outstanding.setdefault(url, 0)
        self._protocols.pop(url, None)  # a restarted engine may run another release
        self._dead.discard(url)

    def mark_dead(self, url: str) -> None:
        url = url.rstrip("/")
        if url not in self._dead:
            log.warning("engine %s marked dead", url)
        self._dead.add(url)

    def outstanding(self, url: str) -> int:
        return self._outstanding.get(url.rstrip("/"), 0)

    def pick_url(self, rid: str | None = None) -> str:
        with self._lock:
            if rid is not None:
                url = self._sticky.get(rid)
                if url is not None and url not in self._dead:
                    return url
            alive = self.alive_urls
            if not alive:
                raise EngineDeadError(f"no live engine (dead: {', '.join(sorted(self._dead)) or 'none'})")
            low = min(self._outstanding[u] for u in alive)
            candidates = [u for u in alive if self._outstanding[u] == low]
            return candidates[next(self._rr) % len(candidates)]

    def _remember(self, rid: str, url: str) -> None:
        with self._lock:
            self._sticky[rid] = url
            self._sticky.move_to_end(rid)
            while len(self._sticky) > _STICKY_MAX:
                self._sticky.popitem(last=False)

    # ------------------------------------------------------------------ transport
    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            for old in [lp for lp in self._sessions if lp.is_closed()]:
                del self._sessions[old]  # left behind by an asyncio.run() that ended without close()
            connector = aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=0)
            session = aiohttp.ClientSession(connector=connector, headers=self._headers)
            self._sessions[loop] = session
        return session

    async def _request(
        self,
        url: str,
        path: str,
        body: Any = None,
        method: str = "POST",
        timeout_s: float | None = None,
        retries: int | None = None,
        parse: str = "json",
        mark_dead: bool = True,
        params: dict | None = None,
    ) -> Any:
        url = url.rstrip("/")
        headers = self._admin_headers if self._admin_headers is not None and path in ADMIN_ROUTES else None
        if url in self._dead:
            raise EngineDeadError(f"engine {url} is marked dead", url)
        retries = self.max_retries if retries is None else retries
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s, sock_connect=self.connect_timeout_s)
        for attempt in itertools.count():
            try:
                async with self._session().request(
                    method, url + path, json=body, timeout=timeout, headers=headers, params=params
                ) as resp:
                    raw = await resp.read()
                    if resp.status == 401:
                        raise EngineError(f"{url}{path}: HTTP 401 unauthorized (wrong or missing API key)", url, 401)
                    if resp.status >= 400:
                        text = raw.decode("utf-8", "replace")[:500]
                        raise EngineError(f"{url}{path}: HTTP {resp.status}: {text}", url, resp.status)
                    if parse == "json":
                        return await resp.json(content_type=None) if raw else None
                    return raw.decode("utf-8", "replace")
            except (aiohttp.ClientConnectionError, ConnectionError) as e:
                if isinstance(e, TimeoutError) and not isinstance(e, aiohttp.ConnectionTimeoutError):
                    raise EngineError(f"{url}{path}: no answer within {timeout.total:.0f}s", url) from e
                if attempt < retries:
                    await asyncio.sleep(self.backoff_s * 2**attempt)
                    continue
                if not mark_dead:
                    raise EngineError(f"{url}{path}: {type(e).__name__}: {e}", url) from e
                self.mark_dead(url)
                raise EngineDeadError(
                    f"engine {url} unreachable after {attempt + 1} attempts ({type(e).__name__}: {e}); marked dead",
                    url,
                ) from e
            except TimeoutError as e:
                raise EngineError(f"{url}{path}: no answer within {timeout.total:.0f}s", url) from e
            except asyncio.CancelledError:
                if not (self._ending and _running_in(self._bg_loop)):
                    raise  # the caller's own cancellation stays one
                raise EngineError(
                    f"{url}{path}: the engine client was closed before the engine answered", url
                ) from None
        raise AssertionError("unreachable")

    async def _on_all(self, path: str, body: Any = None, method: str = "POST", parse: str = "json") -> dict[str, Any]:
        return await self._each(lambda u: self._request(u, path, body, method=method, parse=parse), path)

    async def _each(self, call, what: str) -> dict[str, Any]:
        """`call(url)` on every live engine concurrently; EngineError listing every failure (`.failures`)."""
        urls = self.alive_urls
        results = await asyncio.gather(*(call(u) for u in urls), return_exceptions=True)
        failures = {u: r for u, r in zip(urls, results, strict=True) if isinstance(r, BaseException)}
        if failures:
            detail = "; ".join(str(e) for e in failures.values())
            err = EngineError(f"{what} failed on {len(failures)}/{len(urls)} engines: {detail}")
            err.failures = failures  # type: ignore[attr-defined]
            raise err
        return dict(zip(urls, results, strict=True))

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        input_ids: list[int],
        sampling_params: dict,
        rid: str | None = None,
        return_logprob: bool = True,
        url: str | None = None,
        timeout_s: float | None = None,
        return_routed_experts: bool = False,
        routed_experts_start_len: int = 0,
    ) -> GenerateOutput:
        if int(sampling_params.get("n", 1) or 1) != 1:
            raise ValueError("generate: sampling_params.n > 1 returns several outputs; use generate_n")
        routing = _routing_fields(return_routed_experts, routed_experts_start_len)
        out = await self._generate(input_ids, sampling_params, rid, return_logprob, url, timeout_s, routing)
        return parse_generate_output(out[1], out[0])

    async def generate_n(
        self,
        input_ids: list[int],
        sampling_params: dict,
        rid: str | None = None,
        return_logprob: bool = True,
        url: str | None = None,
        timeout_s: float | None = None,
        return_routed_experts: bool = False,
        routed_experts_start_len: int = 0,
    ) -> list[GenerateOutput]:
        """n = sampling_params["n"] samples of one prompt in one request (SGLang answers a list)."""
        routing = _routing_fields(return_routed_experts, routed_experts_start_len)
        target, obj = await self._generate(input_ids, sampling_params, rid, return_logprob, url, timeout_s, routing)
        objs = obj if isinstance(obj, list) else [obj]
        return [parse_generate_output(o, target) for o in objs]

    async def _generate(
        self, input_ids, sampling_params, rid, return_logprob, url, timeout_s, extra: dict | None = None
    ) -> tuple[str, Any]:
        if url is not None:
            target = url.rstrip("/")
        elif self.router_url is not None:
            target = self.router_url
        else:
            target = self.pick_url(rid)
        body: dict[str, Any] = {
            "input_ids": list(input_ids),
            "sampling_params": sampling_params,
            "return_logprob": return_logprob,
            **(extra or {}),
        }
        if rid is not None:
            body["rid"] = rid
            self._remember(rid, target)
        with self._lock:
            self._outstanding[target] = self._outstanding.get(target, 0) + 1
        try:
            return target, await self._request(target, "/generate", body, timeout_s=timeout_s)
        finally:
            with self._lock:
                self._outstanding[target] -= 1

    async def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Abort one request (on the engine it went to, else everywhere) or, with abort_all, everything."""
        if abort_all:
            await self._on_all("/abort_request", {"rid": "", "abort_all": True}, parse="text")
            return
        if not rid:
            raise ValueError("abort: give a rid or abort_all=True")
        with self._lock:
            url = self._sticky.get(rid)
        if url is not None and url not in self._dead:
            await self._request(url, "/abort_request", {"rid": rid, "abort_all": False}, parse="text")
        else:
            await self._on_all("/abort_request", {"rid": rid, "abort_all": False}, parse="text")

    # ------------------------------------------------------------------ control (all engines)
    async def pause_generation(self, mode: str = "abort") -> dict[str, Any]:
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause_generation: mode must be abort, retract or in_place; got {mode!r}")
        return await self._on_all("/pause_generation", {"mode": mode})

    async def continue_generation(self) -> dict[str, Any]:
        return await self._on_all("/continue_generation", {})

    async def flush_cache(self, timeout_s: float = 0.0) -> dict[str, Any]:
        """Flush every engine's prefix cache. SGLang refuses (400) while requests run or wait; with `timeout_s` > 0 a
        release that offers it waits up to that long for the scheduler to become idle."""

        async def one(url: str) -> Any:
            proto = await self.protocol(url)
            params = {"timeout": f"{timeout_s:g}"} if timeout_s > 0 and proto.flush_timeout else None
            limit = self.timeout_s + (timeout_s if params else 0.0)
            return await self._request(url, "/flush_cache", None, parse="text", params=params, timeout_s=limit)

        return await self._each(one, "/flush_cache")

    # ------------------------------------------------------------------ info
    async def health(self, url: str) -> bool:
        try:
            await self._request(url, "/health", method="GET", timeout_s=5.0, retries=0, parse="text", mark_dead=False)
            return True
        except EngineError:
            return False

    async def protocol(self, url: str) -> Protocol:
        """The protocol of the engine at `url` (its version is read once; `add_url` of a restarted engine re-reads)."""
        url = url.rstrip("/")
        proto = self._protocols.get(url)
        if proto is None:
            info = await self.get_server_info(url)
            version = info.get("version") if isinstance(info, dict) else None
            if not version:
                raise EngineError(f"{url}: the server info carries no 'version'; is this an SGLang server?", url)
            proto = self._protocols[url] = protocol_for(str(version), url)
        return proto

    async def get_model_info(self, url: str) -> dict:
        return await self._request(url, (await self.protocol(url)).model_info_path, method="GET")

    async def get_server_info(self, url: str) -> dict:
        """/server_info (0.5.23), else the /get_server_info of releases without it (0.5.5 answers 404 there)."""
        proto = self._protocols.get(url.rstrip("/"))
        if proto is not None:
            return await self._request(url, proto.server_info_path, method="GET")
        try:
            return await self._request(url, "/server_info", method="GET")
        except EngineError as e:
            if e.status != 404:
                raise
        return await self._request(url, "/get_server_info", method="GET")

    async def get_weight_version(self, url: str) -> str:
        # The model info carries weight_version in sglang 0.5.5 and 0.5.23 (0.5.23 dropped /get_weight_version).
        return str((await self.get_model_info(url))["weight_version"])

    # ------------------------------------------------------------------ weights (one engine each)
    async def _checked(self, url: str, path: str, body: dict) -> dict:
        try:
            res = await self._request(url, path, body)
        except EngineError as e:
            if e.status == 400:  # SGLang answers success=false with HTTP 400
                raise EngineError(f"{url}{path}: {str(e).split(': ', 2)[-1]}", url, 400) from None
            raise
        if not isinstance(res, dict) or not res.get("success", False):
            raise EngineError(f"{url}{path}: {res}", url)
        return res

    async def init_weights_update_group(
        self,
        url: str,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> dict:
        body = {
            "master_address": master_address,
            "master_port": int(master_port),
            "rank_offset": int(rank_offset),
            "world_size": int(world_size),
            "group_name": group_name,
            "backend": backend,
        }
        return await self._checked(url, "/init_weights_update_group", body)

    async def destroy_weights_update_group(self, url: str, group_name: str = "weight_update_group") -> dict:
        return await self._checked(url, "/destroy_weights_update_group", {"group_name": group_name})

    async def begin_weight_update(self, url: str) -> dict:
        """Open the weight-update session that SGLang 0.5.23 requires around distributed/tensor updates (refused,
        HTTP 400, while one is open); a success no-op on releases without sessions."""
        if not (await self.protocol(url)).session:
            return {"success": True, "message": "no weight-update session in this release"}
        return await self._checked(url, "/begin_weight_update", {"selector": "all"})

    async def end_weight_update(self, url: str) -> dict:
        """Close the session `begin_weight_update` opened (refused, HTTP 400, when none is open)."""
        if not (await self.protocol(url)).session:
            return {"success": True, "message": "no weight-update session in this release"}
        return await self._checked(url, "/end_weight_update", {})

    async def update_weights_from_distributed(
        self,
        url: str,
        names: list[str],
        dtypes: list[Any],
        shapes: list[list[int]],
        group_name: str = "weight_update_group",
        flush_cache: bool = False,
        weight_version: str | None = None,
        load_format: str | None = None,
        abort_all_requests: bool = False,
    ) -> dict:
        body: dict[str, Any] = {
            "names": list(names),
            "dtypes": [_dtype_name(d) for d in dtypes],
            "shapes": [list(map(int, s)) for s in shapes],
            "group_name": group_name,
            "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests,
            "weight_version": weight_version,
        }
        if load_format is not None:
            proto = await self.protocol(url)
            if not proto.flat_buckets:  # 0.5.5 drops the field silently and would read per-tensor broadcasts
                raise ValueError(f"{url}: SGLang {proto.release} takes no load_format; send per-tensor broadcasts")
            body["load_format"] = load_format
        return await self._checked(url, "/update_weights_from_distributed", body)

    async def update_weights_from_tensor(
        self,
        url: str,
        serialized_named_tensors: list[str],
        load_format: str | None = None,
        flush_cache: bool = True,
        weight_version: str | None = None,
        abort_all_requests: bool = False,
    ) -> dict:
        body = {
            "serialized_named_tensors": list(serialized_named_tensors),
            "load_format": load_format,
            "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests,
            "weight_version": weight_version,
        }
        return await self._checked(url, "/update_weights_from_tensor", body)

    async def update_weights_from_disk(
        self,
        url: str,
        model_path: str,
        load_format: str | None = None,
        weight_version: str | None = None,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
    ) -> dict:
        """Load a checkpoint directory the engine can read (answers success, message, num_paused_requests)."""
        body: dict[str, Any] = {
            "model_path": model_path,
            "load_format": load_format,
            "abort_all_requests": abort_all_requests,
            "weight_version": weight_version,
        }
        if not flush_cache and (await self.protocol(url)).disk_flush_field:  # 0.5.5 has none and always flushes
            body["flush_cache"] = False
        return await self._checked(url, "/update_weights_from_disk", body)

    async def release_memory_occupation(self, tags: list[str] | None = None) -> dict[str, Any]:
        """Every engine gives back the memory of `tags` (None: all); SGLang needs --enable-memory-saver."""
        return await self._on_all("/release_memory_occupation", {"tags": tags})

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> dict[str, Any]:
        return await self._on_all("/resume_memory_occupation", {"tags": tags})

    async def update_weight_version(self, url: str, new_version: str, abort_all_requests: bool = False) -> dict:
        body = {"new_version": str(new_version), "abort_all_requests": abort_all_requests}
        return await self._checked(url, "/update_weight_version", body)

    async def get_weights_by_name(self, url: str, name: str, truncate_size: int = 100) -> list:
        return await self._request(url, "/get_weights_by_name", {"name": name, "truncate_size": int(truncate_size)})

    async def weights_checksum(self, url: str, names: list[str] | None = None, dtype: Any = None) -> str:
        """Our extension (local engine only): sha256 over the named parameters' bytes."""
        body: dict[str, Any] = {}
        if names is not None:
            body["names"] = list(names)
        if dtype is not None:
            body["dtype"] = _dtype_name(dtype)
        return str((await self._request(url, "/weights_checksum", body))["checksum"])

    # ------------------------------------------------------------------ sync use and shutdown
    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._bg_loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="engine-client", daemon=True)
                thread.start()
                self._bg_loop, self._bg_thread = loop, thread
            return self._bg_loop

    def submit(self, coro: Awaitable[Any]) -> concurrent.futures.Future:
        """Run a coroutine of this client on its private loop; returns a concurrent future. close() ends it."""
        return asyncio.run_coroutine_threadsafe(self._tracked(coro), self._background_loop())

    async def _tracked(self, coro: Awaitable[Any]) -> Any:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        # A caller that cancelled its future no longer reads the task's outcome (asyncio then copies nothing into
        # the future): consume a late failure here, or asyncio reports "Task exception was never retrieved".
        task.add_done_callback(_consume_task)
        try:
            return await coro
        except asyncio.CancelledError:
            if task not in self._closing:
                raise
            task.uncancel()  # close() cut it short where no request was in flight (between two, in a fan-out)
            what = getattr(coro, "__qualname__", type(coro).__name__)
            raise EngineError(f"{what}: the engine client was closed before it finished") from None
        finally:
            self._tasks.discard(task)
            self._closing.discard(task)

    async def _end_tasks(self, grace_s: float = 5.0) -> None:
        """Cancel the tasks submit() started on this (the private) loop and wait for them, but not for the caller."""
        mine = {t for t in self._tasks if t is not asyncio.current_task() and not t.done()}
        if not mine:
            return
        self._closing |= mine
        self._ending = True
        try:
            for task in mine:
                task.cancel()
            _, stuck = await asyncio.wait(mine, timeout=grace_s)
        finally:
            self._ending = False
        if stuck:
            log.warning("engine client closed with %d task(s) still running: %s", len(stuck), stuck)

    def run_sync(self, coro: Awaitable[Any], timeout: float | None = None) -> Any:
        """Blocking call for non-async code (e.g. weight sync from a trainer thread)."""
        return self.submit(coro).result(timeout)

    async def close(self) -> None:
        current = asyncio.get_running_loop()
        bg = self._bg_loop
        if bg is current:
            await self._end_tasks()
        elif bg is not None and not bg.is_closed() and bg.is_running():
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._end_tasks(), bg))
        for loop, session in list(self._sessions.items()):
            if loop is current:
                await session.close()
            elif loop is bg and not loop.is_closed():
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(session.close(), loop))
        self._sessions.clear()
        self._stop_background()

    def close_sync(self) -> None:
        """Close from non-async code (sessions of the private loop only)."""
        if self._bg_loop is not None:
            self.run_sync(self.close())
        self._stop_background()

    def _stop_background(self) -> None:
        loop, thread = self._bg_loop, self._bg_thread
        if loop is None or (thread is not None and thread is threading.current_thread()):
            return
        if _running_in(loop):
            return  # close() was awaited on the private loop itself; it stops when the process ends
        self._bg_loop = self._bg_thread = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        loop.close()


def _consume_task(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("engine client task %s ended in %r", task.get_name(), task.exception())


def _running_in(loop: asyncio.AbstractEventLoop | None) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
