"""Simulated engines, tokenizer and rewards, and a harness running RolloutManager + RolloutBuffer + a simulated
trainer: the test bed of tests/test_rollout.py and benchmarks/bench_pipeline.py (no model, no HTTP).

Contract:
- `SimEngineClient` offers what the manager uses of engines.client.EngineClient (`alive_urls`, async `generate`,
  async `abort`) under a latency model: an engine runs at most `capacity` requests at once; a request holds a slot
  for `base_s + tokens * per_token_s * speed[engine] * jitter` seconds (jitter uniform in [1 - j, 1 + j]).
  Abort returns the tokens made so far with finish_reason "abort". `kill(url)` makes an engine dead (its requests
  raise EngineDeadError); `fail_prob` makes a request raise EngineError after part of its time.
- Responses are deterministic functions of (sample key = rid without its resend suffix, position): a resumed
  request continues exactly the tokens an uninterrupted one would have produced (`expected_response`). Token 0 is
  CORRECT or WRONG (probability from the prompt: some prompts always right, some always wrong, the rest mixed, so
  dynamic sampling has work); the last token of a finished response is EOS.
- `run_sim(...)` runs the manager on its own event loop thread, the buffer, and a trainer loop in the caller's
  thread (get_batch -> train_s, in trainer.num_minibatches parts of train_s / n each when the loop would stream
  them, see pipeline.config.Layout.stream_parts -> every E steps before_weight_update / engines at v+1 after sync_s /
  after_weight_update), and returns what was trained, step times and both sides' accounting.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config, DataConfig, layout
from pipeline.contracts.engine_api import EngineDeadError, EngineError, GenerateOutput
from pipeline.contracts.records import Group, Prompt, as_lists
from pipeline.flow.buffer import make_buffer
from pipeline.flow.rewards import RewardResult
from pipeline.flow.rollout import RolloutManager
from pipeline.flow.transport import GroupReceiver

EOS, CORRECT, WRONG = 1, 3, 4
_VOCAB = 200


def _h(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def _u(*parts: Any) -> float:
    return _h(*parts) / 2**64


def sample_key(rid: str) -> str:
    """`g12-3` and its resends `g12-3.1`, `g12-3.2` name the same sample."""
    return rid.split(".", 1)[0]


class SimEngineClient:
    def __init__(
        self,
        n_engines: int = 2,
        capacity: int = 8,
        per_token_s: float = 0.001,
        base_s: float = 0.0,
        jitter: float = 0.0,
        speeds: list[float] | None = None,
        min_len: int = 4,
        max_len: int = 64,
        fail_prob: float = 0.0,
        p_always_right: float = 0.15,
        p_always_wrong: float = 0.15,
        seed: int = 0,
    ):
        self.urls = [f"sim://engine{i}" for i in range(n_engines)]
        self.capacity, self.per_token_s, self.base_s, self.jitter = capacity, per_token_s, base_s, jitter
        self.speeds = dict(zip(self.urls, speeds or [1.0] * n_engines, strict=True))
        self.min_len, self.max_len, self.fail_prob, self.seed = min_len, max_len, fail_prob, seed
        self.p_right, self.p_wrong = p_always_right, p_always_wrong
        self.version = 0
        self.dead: set[str] = set()
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._live: dict[str, tuple[asyncio.Event, str]] = {}  # rid -> (interrupt, url)
        self._interrupt: dict[str, str] = {}  # rid -> "abort" | "dead"
        self._first_len: dict[str, int] = {}
        self._abort_all_at = -1.0
        self._rng = random.Random(seed)
        self.requests = self.aborted = self.failed = 0
        self.busy_s = 0.0  # slot-seconds spent generating

    # ------------------------------------------------------------------ model of the responses
    def p_correct(self, prompt_ids: list[int]) -> float:
        u = _u(self.seed, "difficulty", tuple(prompt_ids))
        if u < self.p_right:
            return 1.0
        if u < self.p_right + self.p_wrong:
            return 0.0
        return 0.2 + 0.6 * _u(self.seed, "p", tuple(prompt_ids))

    def target_len(self, key: str) -> int:
        return self.min_len + _h(self.seed, "len", key) % (self.max_len - self.min_len + 1)

    def token(self, key: str, pos: int, prompt_ids: list[int]) -> int:
        if pos == 0:
            return CORRECT if _u(self.seed, "acc", key) < self.p_correct(prompt_ids) else WRONG
        return 5 + _h(self.seed, "tok", key, pos) % (_VOCAB - 5)

    def expected_response(self, rid: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The full response of a sample generated without interruption."""
        key = sample_key(rid)
        n = min(self.target_len(key), max_new_tokens)
        out = [self.token(key, k, prompt_ids) for k in range(n)]
        if self.target_len(key) <= max_new_tokens:
            out[-1] = EOS
        return out

    @staticmethod
    def logprob(token: int) -> float:
        return -0.01 * (1 + token % 50)

    # ------------------------------------------------------------------ client API
    @property
    def alive_urls(self) -> list[str]:
        return [u for u in self.urls if u not in self.dead]

    def set_version(self, version: int) -> None:
        self.version = int(version)

    def kill(self, url: str) -> None:
        self.dead.add(url)
        for rid, (ev, u) in list(self._live.items()):
            if u == url:
                self._interrupt[rid] = "dead"
                ev.set()

    async def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        if abort_all:
            self._abort_all_at = time.monotonic()
            targets = list(self._live)
        else:
            targets = [rid] if rid in self._live else []
        for r in targets:
            self._interrupt.setdefault(r, "abort")
            self._live[r][0].set()

    async def generate(
        self,
        input_ids: list[int],
        sampling_params: dict,
        rid: str | None = None,
        return_logprob: bool = True,
        url: str | None = None,
    ) -> GenerateOutput:
        url = url or self.alive_urls[0]
        rid = rid or f"anon{self.requests}"
        if url in self.dead:
            raise EngineDeadError(f"engine {url} is marked dead", url)
        self.requests += 1
        submitted = time.monotonic()
        key = sample_key(rid)
        prompt_len = self._first_len.setdefault(key, len(input_ids))
        prompt_ids, done = input_ids[:prompt_len], len(input_ids) - prompt_len
        budget = int(sampling_params["max_new_tokens"])
        total = self.target_len(key)
        n = min(total - done, budget)
        finish = "stop" if total - done <= budget else "length"
        sem = self._sems.setdefault(url, asyncio.Semaphore(self.capacity))
        async with sem:
            if self._abort_all_at >= submitted:  # aborted while waiting for a slot
                return self._output(key, prompt_ids, done, 0, "abort", url, len(input_ids))
            tok_s = self.per_token_s * self.speeds[url]
            duration = self.base_s + n * tok_s * (1 + self.jitter * (2 * self._rng.random() - 1))
            fails = self._rng.random() < self.fail_prob
            ev = asyncio.Event()
            self._live[rid] = (ev, url)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(ev.wait(), duration * (0.5 if fails else 1.0))
                interrupted = self._interrupt.pop(rid, "abort")
            except TimeoutError:
                interrupted = self._interrupt.pop(rid, None)
            finally:
                self._live.pop(rid, None)
                self.busy_s += time.monotonic() - t0
        if interrupted == "dead" or url in self.dead:
            raise EngineDeadError(f"engine {url} died", url)
        if fails and interrupted is None:
            self.failed += 1
            raise EngineError(f"{url}/generate: simulated failure", url)
        if interrupted == "abort":
            self.aborted += 1
            made = min(n, int((time.monotonic() - t0 - self.base_s) / max(tok_s, 1e-12)))
            return self._output(key, prompt_ids, done, max(made, 0), "abort", url, len(input_ids))
        return self._output(key, prompt_ids, done, n, finish, url, len(input_ids))

    def _output(self, key, prompt_ids, done, n, finish, url, prompt_tokens) -> GenerateOutput:
        ids = [self.token(key, done + k, prompt_ids) for k in range(n)]
        last = self.target_len(key) - 1 - done  # the response's end is EOS even in an abort that reached it
        if 0 <= last < n:
            ids[last] = EOS
        return GenerateOutput(
            output_ids=ids,
            logprobs=[self.logprob(t) for t in ids],
            finish_reason=finish,
            weight_version=str(self.version),
            url=url,
            prompt_tokens=prompt_tokens,
        )


class SimTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        head = {CORRECT: "C", WRONG: "W"}.get(ids[0], "?") if ids else ""
        return f"{head}:{len(ids)}"


class SimRewards:
    """acc iff the response starts with the CORRECT token; reward +1 / -1."""

    def __init__(self) -> None:
        self.calls = 0

    async def score_async(self, response: str, answer: str) -> RewardResult:
        self.calls += 1
        acc = response.startswith("C")
        return RewardResult(1.0 if acc else -1.0, acc)

    def metrics(self) -> dict[str, float]:
        return {"reward/calls": float(self.calls)}


def sim_prompts(n: int, prompt_len: int = 8, seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    return [
        Prompt(prompt_id=f"p{i}", prompt_ids=[rng.randrange(5, _VOCAB) for _ in range(prompt_len)], answer="C")
        for i in range(n)
    ]


def sim_config(**rollout: Any) -> Config:
    """A Config for simulations; keyword arguments set rollout fields, and `batch_size`, `num_minibatches`, `every`,
    `dynamic_sampling`, `seed` the trainer / weight-sync / algorithm ones."""
    cfg = Config(data=DataConfig(train_path="synthetic:sim"))
    cfg.trainer.batch_size = rollout.pop("batch_size", 4)
    cfg.trainer.num_minibatches = rollout.pop("num_minibatches", 1)
    cfg.trainer.seed = rollout.pop("seed", 1)
    cfg.weight_sync.every = rollout.pop("every", 1)
    cfg.algorithm.dynamic_sampling = rollout.pop("dynamic_sampling", True)
    cfg.algorithm.overlong.soft_punish = rollout.pop("soft_punish", False)
    cfg.rollout.n_samples_per_prompt = 4
    cfg.rollout.max_new_tokens = 64
    cfg.rollout.max_inflight_per_engine = 8
    for k, v in rollout.items():
        if not hasattr(cfg.rollout, k):
            raise KeyError(f"rollout.{k}: no such field")
        setattr(cfg.rollout, k, v)
    return cfg


@dataclass
class SimResult:
    trained: list[list[Group]] = field(default_factory=list)
    """Per step, the groups trained (decoded)."""
    versions: list[int] = field(default_factory=list)
    """Per step, the trainer version."""
    step_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    rollout_stats: dict[str, float] = field(default_factory=dict)
    rollout_accounting: dict[str, int] = field(default_factory=dict)
    buffer_accounting: dict[str, int] = field(default_factory=dict)
    buffer_metrics: dict[str, float] = field(default_factory=dict)


def run_sim(
    cfg: Config,
    client: SimEngineClient,
    prompts: list[Prompt],
    steps: int,
    train_s: float | Callable[[int], float] = 0.0,
    sync_s: float = 0.0,
    timeout_s: float = 30.0,
    on_step: Callable[[int, SimEngineClient], None] | None = None,
) -> SimResult:
    """Run the pipeline for `steps` trainer steps (see module doc)."""
    res = SimResult()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sim-rollout", daemon=True)
    thread.start()

    def call(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    async def make() -> RolloutManager:
        return RolloutManager(cfg, client, SimTokenizer(), prompts, buffer.address, SimRewards())

    t = cfg.trainer
    lay = layout(cfg)
    buffer = make_buffer(lay, GroupReceiver())
    manager = call(make())
    running = asyncio.run_coroutine_threadsafe(manager.run(), loop)
    version, t_start = 0, time.perf_counter()
    parts = lay.stream_parts
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            delay = train_s(step) if callable(train_s) else train_s
            batch: list[Group] = []
            for _ in range(parts):  # each mini-batch trains as soon as its groups are there
                batch += buffer.get_batch(version, timeout_s, size=t.batch_size // parts)
                if delay:
                    time.sleep(delay / parts)
            res.trained.append([as_lists(g) for g in batch])  # the record compares with lists
            res.versions.append(version)
            if on_step is not None:
                on_step(step, client)
            if step % cfg.weight_sync.every == 0:
                call(manager.before_weight_update())
                client.set_version(version + 1)
                if sync_s:
                    time.sleep(sync_s)
                version += 1
                call(manager.after_weight_update(version))
            res.step_s.append(time.perf_counter() - t0)
        res.wall_s = time.perf_counter() - t_start
        res.rollout_stats = call(_stats(manager))
    finally:
        call(manager.stop())
        running.result(timeout_s)
        res.rollout_accounting = manager.accounting()
        keys = ("drawn", "pushed", "requeued", "in_flight")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the final status frame is on its way
            b = buffer.accounting()
            if all(b[k] == res.rollout_accounting[k] for k in keys):
                break
            time.sleep(0.01)
        res.buffer_accounting = buffer.accounting()
        res.buffer_metrics = buffer.metrics()
        buffer.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    return res


async def _stats(manager: RolloutManager) -> dict[str, float]:
    return manager.stats()
