"""The CPU engine's scheduler: continuous batching on one background thread, and SGLang's control semantics.

Contract:
- `submit(req)` queues a request; `req.on_done(req)` is called on the engine thread exactly once when it finishes,
  with `req.finish` set to SGLang's finish-reason JSON ({"type": "stop", "matched": id} | {"type": "length",
  "length": n} | {"type": "abort", "message": ...}) or `req.error` set if the engine failed.
- Each iteration: control operations queued with `call()` run first (pause, weight updates, ...), then pending
  aborts, then (unless paused) one decode step for the running rows plus a prefill of newly admitted requests,
  whose first token is sampled in the same iteration. Requests join and leave the batch between iterations.
- Finish checks follow SGLang's order: a stop token (EOS unless `ignore_eos`, or `stop_token_ids`; both disabled
  by `ignore_eos`) beats the length cap; the matched token is kept in `output_ids`.
- `abort(rid)` ends every request whose rid starts with `rid` (SGLang's scheduler rule, which also covers the
  `{rid}_{i}` sub-requests of n > 1); `abort(abort_all=True)` ends all. Partial outputs are returned.
- `pause(mode)`: "abort" ends every queued and running request with abort; "in_place" freezes running requests
  with their KV; "retract" frees their KV and re-queues them first, to be recomputed from prompt + output on
  continue. Requests submitted while paused wait. `resume()` continues.
- Weight updates (`load_tensors`) run between iterations, so no forward ever sees half-updated weights. Fused MoE
  expert tensors also take their per-expert checkpoint names (`experts.{e}.gate_proj.weight`, ...), as views.
- `release_memory(tags)` / `resume_memory(tags)` (SGLang's /release_memory_occupation and
  /resume_memory_occupation; tags kv_cache, weights, cuda_graph, none = all): release is refused unless the engine
  is idle, or paused with only waiting requests (SGLang's rule); "kv_cache" frees every lane's KV cache, the other
  tags are only recorded (nothing to free on CPU; weights are kept, where SGLang without a CPU backup loses them).
  While any tag is released nothing is scheduled: requests wait, as they do while paused, until every tag is
  resumed.
- Routed experts (SGLang's return_routed_experts): on a MoE model (HFRunner) a request with
  `return_routed_experts` collects the top-k experts of every token the engine feeds (prompt and generated tokens,
  `Request.routing()`); a retracted request re-prefilled keeps its first record of each position.
- Lanes: with `lanes` > 1 the running batch is split into that many independent row groups (own KV cache and
  sampler), stepped concurrently on a thread pool with one torch thread each. On a few CPU cores this uses every
  core without OpenMP barriers on the many small ops of a decode step. Control semantics are unchanged: lanes
  only run inside an iteration, never alongside control operations.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from engines.local.runner import make_runner, supports_fast_path
from engines.local.sampling import SamplingParams, sample
from pipeline.contracts.weight_wire import weights_checksum

log = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "in_place", "retract")
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU memory types


@dataclass
class Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    return_logprob: bool = True
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    on_done: Callable[[Request], None] = lambda r: None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: dict | None = None
    error: str | None = None
    weight_version: str = ""
    created: float = field(default_factory=time.monotonic)
    # MoE, with return_routed_experts on an engine that records routing: (n, L, k) int32 chunks of the experts of
    # the fed tokens in position order (positions [0, routed_len)); a retracted request keeps its first record.
    routed: list[torch.Tensor] = field(default_factory=list)
    routed_len: int = 0

    def add_routing(self, first: int, routes: torch.Tensor) -> None:
        """Records of positions [first, first + len(routes)); only positions not recorded yet are kept."""
        skip = self.routed_len - first
        if skip < 0:
            raise RuntimeError(f"request {self.rid}: routing of positions [{self.routed_len}, {first}) was lost")
        if skip < routes.shape[0]:
            self.routed.append(routes[skip:])
            self.routed_len = first + routes.shape[0]

    def routing(self) -> torch.Tensor | None:
        """(fed tokens, L, k) int32, or None when nothing was recorded."""
        return torch.cat(self.routed) if self.routed else None


class _Lane:
    """A group of rows with its own runner (KV cache) and sampler; `running[i]` is the runner's row i."""

    def __init__(self, runner, generator: torch.Generator) -> None:
        self.runner = runner
        self.generator = generator
        self.running: list[Request] = []
        self.admitted = 0

    def step(self, new: list[Request], original_logprob: bool) -> list[tuple[Request, int, float]]:
        """Decode the running rows, prefill `new` (appended as rows), sample one token for every row."""
        logits = []
        if self.running:
            logits.append(self.runner.decode([r.output_ids[-1] for r in self.running]))
            self._record(self.running)
        if new:
            logits.append(self.runner.prefill([r.prompt + r.output_ids for r in new]))
            self._record(new)
            self.running.extend(new)
            self.admitted += len(new)
        if not logits:
            return []
        tokens, logprobs = sample(torch.cat(logits), [r.params for r in self.running], self.generator, original_logprob)
        return list(zip(self.running, tokens.tolist(), logprobs.tolist(), strict=True))

    def _record(self, reqs: list[Request]) -> None:
        """The routed experts of the tokens the runner's last call fed (MoE runners only)."""
        routes = getattr(self.runner, "last_routing", None)
        if routes is None:
            return
        for req, (first, r) in zip(reqs, routes, strict=True):
            if req.return_routed_experts:
                req.add_routing(first, r)
        self.runner.last_routing = None

    def remove(self, row: int) -> Request:
        req = self.running[row]
        self.runner.remove(row)
        self.running[row] = self.running[-1]
        self.running.pop()
        return req

    def reset(self) -> list[Request]:
        reqs, self.running = self.running, []
        self.runner.reset()
        return reqs


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_running: int = 64,
        max_len: int | None = None,
        max_prefill_tokens: int = 8192,
        seed: int = 0,
        runner: str = "auto",
        original_logprob: bool = False,
        weight_version: str = "default",
        lanes: int = 1,
    ) -> None:
        self.model = model.eval()
        cfg = model.config
        self.max_len = int(max_len or getattr(cfg, "max_position_embeddings", 2048))
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        if runner == "hf" or (runner == "auto" and not supports_fast_path(model)):
            lanes = 1  # the generic runner recomputes every row on each join: lanes would not pay off
        lanes = max(1, min(lanes, max_running))
        self.lane_capacity = -(-max_running // lanes)
        runners = [make_runner(model, self.lane_capacity, self.max_len, runner) for _ in range(lanes)]
        self.lanes = [_Lane(r, torch.Generator().manual_seed(seed + i)) for i, r in enumerate(runners)]
        self.runner = runners[0]
        self._pool = ThreadPoolExecutor(lanes, thread_name_prefix="local-engine-lane") if lanes > 1 else None
        self.original_logprob = original_logprob
        self.eos_ids = _eos_ids(model)
        self.weight_version = weight_version
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.params.update(_expert_views(model))
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._ops: deque[tuple[Callable[[], Any], Future]] = deque()
        self._aborts: list[str | None] = []  # None = abort all
        self._paused: str | None = None
        self.released: set[str] = set()  # memory tags given back by release_memory (nothing runs meanwhile)
        self._stop = False
        self.error: str | None = None
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="local-engine", daemon=True)

    # ------------------------------------------------------------------ thread-safe API
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def paused(self) -> str | None:
        return self._paused

    def load(self) -> dict:
        with self._cv:
            running = sum(len(lane.running) for lane in self.lanes)
            waiting = len(self._waiting)
            return {
                "num_running": running,
                "num_waiting": waiting,
                "paused": self._paused,
                "released": sorted(self.released),
            }

    def submit(self, req: Request) -> None:
        with self._cv:
            if self.error is not None:
                raise RuntimeError(f"engine failed: {self.error}")
            self._waiting.append(req)
            self._cv.notify_all()

    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        if not abort_all and not rid:
            return  # SGLang ignores an empty rid without abort_all (it would prefix-match everything)
        with self._cv:
            self._aborts.append(None if abort_all else rid)
            self._cv.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine thread between iterations; the future holds its result or exception."""
        fut: Future = Future()
        with self._cv:
            if not self._thread.is_alive() or self._stop:
                fut.set_exception(RuntimeError("engine thread is not running"))
                return fut
            self._ops.append((fn, fut))
            self._cv.notify_all()
        return fut

    def pause(self, mode: str = "abort") -> Future:
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {', '.join(PAUSE_MODES)}; got {mode!r}")
        return self.call(lambda: self._do_pause(mode))

    def resume(self) -> Future:
        return self.call(self._do_resume)

    def release_memory(self, tags: list[str] | None = None) -> Future:
        tags = _memory_tags(tags)
        return self.call(lambda: self._do_release(tags))

    def resume_memory(self, tags: list[str] | None = None) -> Future:
        tags = _memory_tags(tags)
        return self.call(lambda: self._do_resume_memory(tags))

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stop or self._ops or self._aborts or self._has_work()):
                        self._cv.wait()
                    if self._stop:
                        break
                    ops, self._ops = list(self._ops), deque()
                    aborts, self._aborts = self._aborts, []
                for fn, fut in ops:
                    _run_op(fn, fut)
                if aborts:
                    self._apply_aborts(aborts)
                if self._scheduling:
                    self._step()
        except BaseException as e:  # noqa: BLE001 - the engine must report, not vanish
            log.exception("engine loop failed")
            self._fail_all(f"{type(e).__name__}: {e}")
        finally:
            self._drain_ops()

    def _has_work(self) -> bool:
        return self._scheduling and bool(self._waiting or any(lane.running for lane in self.lanes))

    @property
    def _scheduling(self) -> bool:
        return self._paused is None and not self.released

    def _step(self) -> None:
        new = self._admit()
        jobs = [(lane, new[i]) for i, lane in enumerate(self.lanes) if lane.running or new[i]]
        if not jobs:
            return
        self.steps += 1
        if len(jobs) == 1 or self._pool is None:
            results = [lane.step(reqs, self.original_logprob) for lane, reqs in jobs]
        else:
            futures = [self._pool.submit(lane.step, reqs, self.original_logprob) for lane, reqs in jobs]
            results = [f.result() for f in futures]
        for (lane, _), rows in zip(jobs, results, strict=True):
            finished = []
            for row, (req, tok, lp) in enumerate(rows):
                req.output_ids.append(tok)
                if req.return_logprob:
                    req.logprobs.append(lp)
                req.finish = self._finish_reason(req, tok)
                if req.finish is not None:
                    finished.append(row)
            for row in reversed(finished):
                self._deliver(lane.remove(row))

    def _admit(self) -> list[list[Request]]:
        """Take waiting requests while there is room, each to the lane with the fewest rows."""
        new: list[list[Request]] = [[] for _ in self.lanes]
        sizes = [len(lane.running) for lane in self.lanes]
        budget, admitted = self.max_prefill_tokens, 0
        with self._cv:
            while self._waiting:
                lane = min(range(len(self.lanes)), key=sizes.__getitem__)
                if sizes[lane] >= self.lane_capacity:
                    break
                req = self._waiting[0]
                size = len(req.prompt) + len(req.output_ids)
                if admitted and size > budget:
                    break  # the rest waits for the next iteration; a single long prompt always fits
                self._waiting.popleft()
                if req.params.max_new_tokens == 0 or len(req.output_ids) >= req.params.max_new_tokens:
                    req.finish = {"type": "length", "length": req.params.max_new_tokens}
                    self._deliver(req)
                    continue
                new[lane].append(req)
                sizes[lane] += 1
                budget -= size
                admitted += 1
        return new

    def _finish_reason(self, req: Request, tok: int) -> dict | None:
        p = req.params
        if not p.ignore_eos and (tok in self.eos_ids or tok in p.stop_token_ids):
            return {"type": "stop", "matched": tok}
        if len(req.output_ids) >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        if len(req.prompt) + len(req.output_ids) >= self.max_len:
            return {"type": "length", "length": len(req.output_ids)}
        return None

    def _deliver(self, req: Request) -> None:
        req.weight_version = self.weight_version
        try:
            req.on_done(req)
        except Exception:  # noqa: BLE001 - a broken callback must not kill the engine
            log.exception("on_done callback failed for %s", req.rid)

    def _apply_aborts(self, aborts: list[str | None]) -> None:
        def hit(req: Request) -> bool:
            return any(a is None or req.rid.startswith(a) for a in aborts)

        for lane in self.lanes:
            for row in reversed(range(len(lane.running))):
                if hit(lane.running[row]):
                    self._abort_req(lane.remove(row))
        with self._cv:
            keep = deque(r for r in self._waiting if not hit(r))
            dropped = [r for r in self._waiting if hit(r)]
            self._waiting = keep
        for req in dropped:
            self._abort_req(req)

    def _abort_req(self, req: Request, message: str = "Aborted") -> None:
        req.finish = {"type": "abort", "message": message, "status_code": None, "err_type": None}
        self._deliver(req)

    def _do_pause(self, mode: str) -> dict:
        self._paused = mode
        if mode == "abort":
            self._apply_aborts([None])
        elif mode == "retract":
            retracted = [req for lane in self.lanes for req in lane.reset()]
            with self._cv:
                self._waiting.extendleft(reversed(retracted))
        return {"mode": mode}

    def _do_resume(self) -> None:
        self._paused = None

    def _do_release(self, tags: list[str]) -> None:
        busy = any(lane.running for lane in self.lanes) or bool(self._waiting and self._scheduling)
        if busy:
            raise ValueError(
                "release_memory_occupation should be called only when the server is idle (pause_generation first: "
                f"{self.load()['num_running']} requests running)"
            )
        self.released.update(tags)
        if "kv_cache" in tags:
            for lane in self.lanes:
                lane.runner.release_cache()

    def _do_resume_memory(self, tags: list[str]) -> None:
        if "kv_cache" in tags and "kv_cache" in self.released:
            for lane in self.lanes:
                lane.runner.restore_cache()
        self.released.difference_update(tags)

    def _fail_all(self, message: str) -> None:
        with self._cv:
            self.error = message
            reqs = [req for lane in self.lanes for req in lane.running] + list(self._waiting)
            for lane in self.lanes:
                lane.running = []
            self._waiting = deque()
        for req in reqs:
            req.error = message
            self._deliver(req)

    def _drain_ops(self) -> None:
        with self._cv:
            ops, self._ops = list(self._ops), deque()
        for _, fut in ops:
            if not fut.done():
                fut.set_exception(RuntimeError(f"engine stopped: {self.error or 'shutdown'}"))

    # ------------------------------------------------------------------ weights (engine thread only)
    def check_tensors(self, metas: Iterable[tuple[str, torch.Size]]) -> list[str]:
        """Problems with (name, shape) pairs against the model; empty if all fit."""
        problems = []
        for name, shape in metas:
            param = self.params.get(name)
            if param is None:
                problems.append(f"{name}: no such parameter in the model")
            elif tuple(param.shape) != tuple(shape):
                problems.append(f"{name}: shape {list(shape)} does not match the model's {list(param.shape)}")
        return problems

    @torch.no_grad()
    def load_tensors(self, named: list[tuple[str, torch.Tensor]], weight_version: str | None = None) -> None:
        for name, tensor in named:
            self.params[name].copy_(tensor)
        if weight_version is not None:
            self.weight_version = str(weight_version)

    def checksum(self, names: list[str] | None = None, dtype: torch.dtype | None = None) -> str:
        names = names if names is not None else list(self.model.state_dict().keys())
        missing = [n for n in names if n not in self.params]
        if missing:
            raise ValueError(f"{missing[0]}: no such parameter in the model")
        return weights_checksum([(n, self.params[n]) for n in names], dtype)


def _expert_views(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint names of fused MoE expert weights (transformers 5 keeps a layer's experts as 3D `gate_up_proj`
    (E, 2I, H) and `down_proj` (E, H, I)): `experts.{e}.{gate,up,down}_proj.weight`, as views of the fused tensors,
    so weight updates under the names HF checkpoints, SGLang and the trainers use are written in place."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (
            isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter) and gate_up.dim() == 3
        ):
            continue
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            out[f"{prefix}.{e}.gate_proj.weight"] = gate_up.data[e, :inter]
            out[f"{prefix}.{e}.up_proj.weight"] = gate_up.data[e, inter:]
            out[f"{prefix}.{e}.down_proj.weight"] = down.data[e]
    return out


def _run_op(fn: Callable[[], Any], fut: Future) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as e:  # noqa: BLE001 - handed to the caller
        fut.set_exception(e)


def _memory_tags(tags: list[str] | None) -> list[str]:
    """SGLang's rule: no tags (None or []) means every memory type; an unknown tag is refused here."""
    if not tags:
        return list(MEMORY_TAGS)
    bad = [t for t in tags if t not in MEMORY_TAGS]
    if bad:
        raise ValueError(f"unknown memory tag {bad[0]!r}; tags are {', '.join(MEMORY_TAGS)}")
    return list(tags)


def _eos_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for src in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return ids
