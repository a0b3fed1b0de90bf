"""Rewards: the DAPO math scorer for training, a Math-Verify scorer for evaluation, and the runner that calls
either one with a timeout and never lets a failure escape.

Contract:
- A reward function is `fn(response: str, answer: str) -> float | dict`; a dict has "score" (float) and optionally
  "acc" (bool) and "pred" (str). For a float, acc := reward > 0. It is configured by dotted path
  (`algorithm.reward_fn = "module:function"`).
- `dapo_math_reward` follows the DAPO recipe's string verifier (verl `math_dapo`, Minerva normalisation): chat end
  tokens are removed, the last 300 characters are searched for the last `Answer:` (any case) and the rest of that
  line is normalised (text after the last `=`, units and filler words, `\\text{}`/`\\boxed{}`/`$`, spaces, thousands
  commas) and compared as a string with the normalised reference: +1.0 if equal, else -1.0.
  Deliberate differences from the reference verifier: a trailing "." is dropped ("Answer: 34." is right there it
  is wrong), and an answer that normalises to "" is always wrong. As in the reference, numbers are compared as
  strings: "034" != "34" and "0.5" != "\\frac{1}{2}" (use `math_verify_reward` for semantic equality).
- `math_verify_reward` parses the reference and the prediction (the last `Answer:` line when there is one, else the
  whole response: boxed/LaTeX/plain expressions) with the `math_verify` package and checks equivalence. Its
  signal-based timeouts are disabled (they only work in the main thread); it runs on a daemon thread under our own
  timeout and raises TimeoutError past `timeout_s`.
- `RewardRunner(fn_path, timeout_s, workers)` runs the function on daemon worker threads. `score`/`score_async`
  return a `RewardResult` and never raise: a function that raises, returns something unusable, or runs longer than
  `timeout_s` (measured from when it starts, not from when it was queued) gives reward -1.0 (the wrong-answer
  value), acc False and `failed` = "timeout", "bad_return" or the exception's class name; failures are counted by
  reason in `metrics()`. A hung call is abandoned: its thread is replaced and, being a daemon, never blocks
  interpreter exit. Abandoned threads are bounded (`DaemonPool(max_hung=...)`): past the bound no replacement is
  started, and once every worker is stuck a call fails at once as "timeout", so a hanging function cannot grow
  the process's threads without limit.
- Failures are logged at WARNING with the exception's text: the first of each reason at once, then at most one
  summary line per `LOG_EVERY_S`. `fatal()` is the run-stopping verdict ("" while healthy): the first
  `fail_first` calls all failed, or more than `fail_ratio` of the last `fail_window` did; its text names the
  function, the counts by reason and the last failure's exception. The rollout actor reports it and the training
  loop stops with it (pipeline/runtime/cluster.py `RolloutActor.error`, pipeline/runtime/train.py `_next_batch`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import itertools
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import load_reward_fn

log = logging.getLogger(__name__)

WRONG_REWARD = -1.0
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")
_ANSWER_RE = re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE)
_TAIL_CHARS = 300  # the reference verifier only looks at the end of the response

# Minerva normalisation (Lewkowycz et al. 2022, appendix D.1), in the order the DAPO verifier applies it.
_REPLACE = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
_UNITS_AND_FILLERS = (
    (
        "square ways integers dollars mph inches hours km units \\ldots sue points feet minutes digits cents degrees "
        "cm gm pounds meters meals edges students childrentickets multiples"
    ).split()
    + ["\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}"]
    + [
        "\\mathrm{th}",
        "^\\circ",
        "^{\\circ}",
        "\\;",
        ",\\!",
        "{,}",
        '"',
        "\\dots",
    ]
)
_REGEX_STEPS = (
    (re.compile(r"(.*?)\$(.*?)\$(.*)"), r"$\2$"),  # keep only the first $...$ span of a line
    (re.compile(r"\\text\{(.*?)\}"), r"\1"),
    (re.compile(r"\\textbf\{(.*?)\}"), r"\1"),
    (re.compile(r"\\overline\{(.*?)\}"), r"\1"),
    (re.compile(r"\\boxed\{(.*)\}"), r"\1"),
    (re.compile(r"frac([^{])(.)"), r"frac{\1}{\2}"),  # \frac12 -> \frac{1}{2}
    (re.compile(r"sqrt([^{])"), r"sqrt{\1}"),  # \sqrt2 -> \sqrt{2}
)


def strip_end_tokens(text: str) -> str:
    for tok in _END_TOKENS:
        text = text.replace(tok, "")
    return text


def normalize_final_answer(answer: str) -> str:
    """Minerva-style normal form of a final answer string (see the module docstring)."""
    s = answer.split("=")[-1]
    for old, new in _REPLACE:
        s = s.replace(old, new)
    for junk in _UNITS_AND_FILLERS:
        s = s.replace(junk, "")
    for pattern, repl in _REGEX_STEPS:
        s = pattern.sub(repl, s)
    s = s.replace("$", "").strip().rstrip(".")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def extract_answer_line(response: str, tail_chars: int | None = _TAIL_CHARS) -> str | None:
    """The text after the last `Answer:` (to the end of its line), or None."""
    text = strip_end_tokens(response)
    if tail_chars is not None:
        text = text[-tail_chars:]
    found = _ANSWER_RE.findall(text)
    return found[-1] if found else None


def dapo_math_reward(response: str, answer: str) -> dict:
    """DAPO's training reward: {"score": +1.0 | -1.0, "acc": bool, "pred": normalised prediction or ""}."""
    line = extract_answer_line(response)
    pred = normalize_final_answer(line) if line is not None else ""
    acc = bool(pred) and pred == normalize_final_answer(str(answer))
    return {"score": 1.0 if acc else WRONG_REWARD, "acc": acc, "pred": pred}


# --------------------------------------------------------------------------------------------------- math_verify
class _QuietTimeoutWarning(logging.Filter):
    """math_verify warns once that its own timeouts are off; we time it out ourselves, so drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_MV_POOL: DaemonPool | None = None
_MV_LOCK = threading.Lock()


def _mv_parse(text: str) -> list:
    from math_verify import parse

    wrapped = any(m in text for m in ("$", "\\boxed", "\\(", "\\["))
    parsed = parse(text if wrapped else f"${text}$", parsing_timeout=None)
    return parsed or (parse(text, parsing_timeout=None) if not wrapped else [])


def _math_verify_core(response: str, answer: str) -> dict:
    from math_verify import parse, verify

    gold = _mv_parse(str(answer))
    line = extract_answer_line(response, tail_chars=None)
    pred = _mv_parse(line) if line is not None else parse(strip_end_tokens(response), parsing_timeout=None)
    acc = bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))
    return {"score": 1.0 if acc else WRONG_REWARD, "acc": acc, "pred": str(pred[-1]) if pred else ""}


def math_verify_reward(response: str, answer: str, timeout_s: float = 10.0) -> dict:
    """Semantic scorer for evaluation ({"score", "acc", "pred"}); raises TimeoutError past timeout_s."""
    global _MV_POOL
    with _MV_LOCK:
        if _MV_POOL is None:
            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).addFilter(_QuietTimeoutWarning())
            _MV_POOL = DaemonPool(4, "math-verify")
    task = _MV_POOL.submit(_math_verify_core, response, answer)
    ok, value = _MV_POOL.wait(task, timeout_s)
    if not ok:
        raise value if isinstance(value, BaseException) else RuntimeError(str(value))
    return value


# --------------------------------------------------------------------------------------------------- threads
class _Timeout(Exception):
    pass


class _Task:
    __slots__ = ("fn", "args", "started", "done")

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args
        self.started: cf.Future = cf.Future()  # resolved when a worker picks the task up
        self.done: cf.Future = cf.Future()  # (ok, value | exception)


class DaemonPool:
    """Daemon worker threads. A worker stuck in a timed-out task is abandoned (it exits when, if ever, the task
    returns) and replaced, so the pool keeps its width and a hung task never blocks interpreter exit."""

    _ids = itertools.count()

    def __init__(self, workers: int, name: str, max_hung: int | None = None):
        self.name = name
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running: dict[_Task, threading.Thread] = {}
        self._abandoned: set[threading.Thread] = set()
        self._workers = max(1, int(workers))
        # Threads stuck in abandoned tasks are replaced up to this many; then the pool shrinks instead of growing.
        self.max_hung = max(0, int(max_hung)) if max_hung is not None else 4 * self._workers
        self._live = 0  # serving (not abandoned) workers
        for _ in range(self._workers):
            self._spawn()

    @property
    def hung(self) -> int:
        """Abandoned threads still stuck in their task."""
        with self._lock:
            return len(self._abandoned)

    def _spawn(self) -> None:
        self._live += 1
        threading.Thread(target=self._loop, name=f"{self.name}-{next(self._ids)}", daemon=True).start()

    def _loop(self) -> None:
        me = threading.current_thread()
        while (task := self._queue.get()) is not None:
            if not task.done.set_running_or_notify_cancel():
                continue  # the caller gave up before the task started
            with self._lock:
                self._running[task] = me
            _resolve(task.started, time.monotonic())
            try:
                outcome = (True, task.fn(*task.args))
            except BaseException as e:  # noqa: BLE001 - a reward function's failure is data, not a crash
                outcome = (False, e)
            _resolve(task.done, outcome)
            with self._lock:
                self._running.pop(task, None)
                if me in self._abandoned:
                    self._abandoned.discard(me)
                    if self._live >= self._workers:
                        return  # a replacement already took this thread's place
                    self._live += 1  # the pool had shrunk (max_hung): this thread serves again

    def submit(self, fn: Callable, *args: Any) -> _Task:
        task = _Task(fn, args)
        with self._lock:
            if self._live == 0:  # every worker is stuck and max_hung is spent: fail now rather than queue forever
                self._refuse(task)
                return task
            self._queue.put(task)
        return task

    def _refuse(self, task: _Task) -> None:
        _resolve(task.started, time.monotonic())
        hung = len(self._abandoned)
        _resolve(task.done, (False, TimeoutError(f"{self.name}: no free worker ({hung} calls hung, the most kept)")))

    def abandon(self, task: _Task) -> None:
        """Give up on a running task: its thread is written off and, up to max_hung, a fresh worker replaces it."""
        with self._lock:
            thread = self._running.get(task)
            if thread is None or thread in self._abandoned:
                return
            self._abandoned.add(thread)
            self._live -= 1
            if len(self._abandoned) <= self.max_hung:
                self._spawn()
            elif self._live == 0:  # nobody left to run what is queued: fail it
                while True:
                    try:
                        queued = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if queued is not None:
                        self._refuse(queued)

    def wait(self, task: _Task, timeout_s: float) -> tuple[bool, Any]:
        """Block until the task finishes: (True, result) | (False, exception); TimeoutError after timeout_s of running."""
        task.started.result()
        try:
            return task.done.result(timeout=timeout_s)
        except cf.TimeoutError:
            self.abandon(task)
            return False, TimeoutError(f"{self.name}: call exceeded {timeout_s} s")

    async def wait_async(self, task: _Task, timeout_s: float) -> tuple[bool, Any]:
        try:
            await asyncio.wrap_future(task.started)
            return await asyncio.wait_for(asyncio.wrap_future(task.done), timeout_s)
        except TimeoutError:
            self.abandon(task)
            return False, TimeoutError(f"{self.name}: call exceeded {timeout_s} s")
        except asyncio.CancelledError:
            task.done.cancel()  # not started yet: the worker skips it
            raise

    def shutdown(self) -> None:
        """Ask the idle workers to exit (hung ones are daemons and are simply left behind)."""
        for _ in range(self._workers):
            self._queue.put(None)
        with self._lock:
            self._live = 0


def _resolve(fut: cf.Future, value: Any) -> None:
    try:
        fut.set_result(value)
    except cf.InvalidStateError:  # cancelled by a caller that stopped waiting
        pass


# --------------------------------------------------------------------------------------------------- runner
@dataclass(frozen=True)
class RewardResult:
    reward: float
    acc: bool
    failed: str = ""  # "", "timeout", "bad_return", or the exception's class name


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class RewardRunner:
    """Scores responses with a configured reward function on daemon threads, with a timeout; never raises."""

    LOG_EVERY_S = 30.0

    def __init__(
        self,
        fn_path: str,
        timeout_s: float,
        workers: int,
        fail_first: int = 32,
        fail_window: int = 256,
        fail_ratio: float = 0.95,
        max_hung: int | None = None,
    ):
        self.fn = load_reward_fn(fn_path)
        self.fn_path = fn_path
        self.timeout_s = float(timeout_s)
        self._pool = DaemonPool(workers, "reward", max_hung)
        self._lock = threading.Lock()
        self.calls = 0
        self.failures: dict[str, int] = {}
        self.fail_first, self.fail_ratio = fail_first, fail_ratio
        self._recent: collections.deque[bool] = collections.deque(maxlen=fail_window)  # True: the call failed
        self._fatal = ""
        self._last_error = ""
        self._logged_reasons: set[str] = set()
        self._unlogged = 0  # failures since the last warning
        self._next_log = 0.0

    def score(self, response: str, answer: str) -> RewardResult:
        task = self._pool.submit(self.fn, response, answer)
        return self._result(*self._pool.wait(task, self.timeout_s))

    async def score_async(self, response: str, answer: str) -> RewardResult:
        task = self._pool.submit(self.fn, response, answer)
        return self._result(*await self._pool.wait_async(task, self.timeout_s))

    def _result(self, ok: bool, value: Any) -> RewardResult:
        if not ok:
            if isinstance(value, TimeoutError):
                return self._fail("timeout", f"no result within algorithm.reward_timeout_s={self.timeout_s:g} s")
            return self._fail(type(value).__name__, f"{type(value).__name__}: {value}")
        try:
            if isinstance(value, dict):
                reward = float(value["score"])
                acc = bool(value["acc"]) if "acc" in value else reward > 0
            else:
                reward = float(value)
                acc = reward > 0
        except (KeyError, TypeError, ValueError):
            return self._fail("bad_return", f"returned {_short(value)} (expected a float or a dict with 'score')")
        if not math.isfinite(reward):
            return self._fail("bad_return", f"returned a non-finite score {reward}")
        self._count(failed=False)
        return RewardResult(reward, acc)

    def _count(self, failed: bool) -> None:
        with self._lock:
            self.calls += 1
            self._recent.append(failed)
            if failed and not self._fatal:
                self._fatal = self._verdict()
                if self._fatal:
                    log.error("%s", self._fatal)

    def _verdict(self) -> str:
        """The fatal message when (almost) every call fails, else "" (called with the lock held)."""
        failed = sum(self._recent)
        window = len(self._recent)
        first = self.calls == sum(self.failures.values()) and self.calls >= self.fail_first
        mostly = window == self._recent.maxlen and failed > self.fail_ratio * window
        if not (first or mostly):
            return ""
        scope = f"all of the first {self.calls}" if first else f"{failed} of the last {window}"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items(), key=lambda kv: -kv[1]))
        return (
            f"reward function {self.fn_path} failed on {scope} calls ({reasons}); last failure: {self._last_error}. "
            "Fix the function (or algorithm.reward_timeout_s); every sample scored so would get the wrong-answer reward"
        )

    def _fail(self, reason: str, detail: str) -> RewardResult:
        with self._lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1
            self._last_error = detail
            self._unlogged += 1
            now = time.monotonic()
            first_of_reason = reason not in self._logged_reasons
            if first_of_reason or now >= self._next_log:
                self._logged_reasons.add(reason)
                n, self._unlogged, self._next_log = self._unlogged, 0, now + self.LOG_EVERY_S
                counts = ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items()))
                log.warning(
                    "reward function %s failed (%s): %s [%d failure(s) since the last such line; %d of %d calls "
                    "so far: %s]", self.fn_path, reason, detail, n, sum(self.failures.values()), self.calls + 1, counts,
                )  # fmt: skip
        self._count(failed=True)
        return RewardResult(WRONG_REWARD, False, reason)

    def fatal(self) -> str:
        """Why the run must stop ("" while the function mostly works): see the module docstring."""
        with self._lock:
            return self._fatal

    def metrics(self) -> dict[str, float]:
        """reward/calls, reward/failed (total), reward/failed_<reason>, reward/hung_threads."""
        with self._lock:
            out = {"reward/calls": float(self.calls), "reward/failed": float(sum(self.failures.values()))}
            out.update({f"reward/failed_{k}": float(v) for k, v in sorted(self.failures.items())})
        out["reward/hung_threads"] = float(self._pool.hung)
        return out

    def close(self) -> None:
        self._pool.shutdown()
