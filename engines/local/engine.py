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
- Weight updates (`update_weights`) run between iterations, so no forward ever sees half-updated weights.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from engines.local.runner import make_runner
from engines.local.sampling import SamplingParams, sample

log = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "in_place", "retract")


@dataclass
class Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    return_logprob: bool = True
    on_done: Callable[[Request], None] = lambda r: None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: dict | None = None
    error: str | None = None
    weight_version: str = ""
    created: float = field(default_factory=time.monotonic)


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
    ) -> None:
        self.model = model.eval()
        cfg = model.config
        self.max_len = int(max_len or getattr(cfg, "max_position_embeddings", 2048))
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.runner = make_runner(model, max_running, self.max_len, runner)
        self.original_logprob = original_logprob
        self.eos_ids = _eos_ids(model)
        self.weight_version = weight_version
        self.generator = torch.Generator().manual_seed(seed)
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self._cv = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # index == runner row
        self._ops: deque[tuple[Callable[[], Any], Future]] = deque()
        self._aborts: list[str | None] = []  # None = abort all
        self._paused: str | None = None
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

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def paused(self) -> str | None:
        return self._paused

    def load(self) -> dict:
        with self._cv:
            return {"num_running": len(self._running), "num_waiting": len(self._waiting), "paused": self._paused}

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
                if self._paused is None:
                    self._step()
        except BaseException as e:  # noqa: BLE001 - the engine must report, not vanish
            log.exception("engine loop failed")
            self._fail_all(f"{type(e).__name__}: {e}")
        finally:
            self._drain_ops()

    def _has_work(self) -> bool:
        return self._paused is None and bool(self._waiting or self._running)

    def _step(self) -> None:
        new = self._admit()
        logits = []
        if self._running:
            logits.append(self.runner.decode([r.output_ids[-1] for r in self._running]))
        if new:
            logits.append(self.runner.prefill([r.prompt + r.output_ids for r in new]))
            self._running.extend(new)
        if not logits:
            return
        self.steps += 1
        tokens, logprobs = sample(
            torch.cat(logits), [r.params for r in self._running], self.generator, self.original_logprob
        )
        finished = []
        for row, (req, tok, lp) in enumerate(zip(self._running, tokens.tolist(), logprobs.tolist(), strict=True)):
            req.output_ids.append(tok)
            if req.return_logprob:
                req.logprobs.append(lp)
            req.finish = self._finish_reason(req, tok)
            if req.finish is not None:
                finished.append(row)
        for row in reversed(finished):
            self._deliver(self._remove_row(row))

    def _admit(self) -> list[Request]:
        new: list[Request] = []
        budget = self.max_prefill_tokens
        with self._cv:
            while self._waiting and len(self._running) + len(new) < self.max_running:
                req = self._waiting[0]
                size = len(req.prompt) + len(req.output_ids)
                if new and size > budget:
                    break  # the rest waits for the next iteration; a single long prompt always fits
                self._waiting.popleft()
                if req.params.max_new_tokens == 0 or len(req.output_ids) >= req.params.max_new_tokens:
                    req.finish = {"type": "length", "length": req.params.max_new_tokens}
                    self._deliver(req)
                    continue
                new.append(req)
                budget -= size
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

    def _remove_row(self, row: int) -> Request:
        req = self._running[row]
        self.runner.remove(row)
        self._running[row] = self._running[-1]
        self._running.pop()
        return req

    def _deliver(self, req: Request) -> None:
        req.weight_version = self.weight_version
        try:
            req.on_done(req)
        except Exception:  # noqa: BLE001 - a broken callback must not kill the engine
            log.exception("on_done callback failed for %s", req.rid)

    def _apply_aborts(self, aborts: list[str | None]) -> None:
        def hit(req: Request) -> bool:
            return any(a is None or req.rid.startswith(a) for a in aborts)

        for row in reversed(range(len(self._running))):
            if hit(self._running[row]):
                self._abort_req(self._remove_row(row))
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
            retracted, self._running = self._running, []
            self.runner.reset()
            with self._cv:
                self._waiting.extendleft(reversed(retracted))
        return {"mode": mode, "running": len(self._running)}

    def _do_resume(self) -> None:
        self._paused = None

    def _fail_all(self, message: str) -> None:
        with self._cv:
            self.error = message
            reqs = list(self._running) + list(self._waiting)
            self._running, self._waiting = [], deque()
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


def weights_checksum(named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> str:
    """sha256 over (name, raw bytes) in the given order; tensors cast to `dtype` first when given.

    Our extension (`POST /weights_checksum`), not SGLang's. A sender holding bf16 weights passes dtype=bfloat16
    so an engine that stores them in float32 hashes the same bytes.
    """
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        h.update(name.encode())
        h.update(b"\0")
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run_op(fn: Callable[[], Any], fut: Future) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as e:  # noqa: BLE001 - handed to the caller
        fut.set_exception(e)


def _eos_ids(model: torch.nn.Module) -> set[int]:
    ids: set[int] = set()
    for src in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list | tuple):
            ids.update(int(e) for e in eos)
    return ids
