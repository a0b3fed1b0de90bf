"""RolloutManager (asyncio): prompts -> engines -> rewards -> groups PUSHed to the buffer, within the staleness bound.

Contract:
- Generation: every prompt drawn becomes a group of G = rollout.n_samples_per_prompt separate requests with rids
  `{group_id}-{i}` (resends `{group_id}-{i}.{k}`). Separate requests rather than n=G: each one is routed, retried,
  aborted and resumed on its own, and they spread over engines (SGLang shares the prompt's KV cache anyway).
  Every live engine is kept at `rollout.max_inflight_per_engine` requests; a new group is admitted when a slot is
  free, no admitted request is still waiting for one, and the admission rule allows it.
- Admission and the staleness bound: pipeline/flow/admission.py. With v the weight version the engines hold, a group
  admitted under v (its start version) is trained at a version <= v + max_staleness: a new group starts while
  kept + reserved groups leave room under (v + s + 1) * weight_sync.every * batch_size, and, with dynamic
  sampling, a bounded number more against the expected keep rate (rollout.over_admission). A group the filter
  keeps is pushed as kept only if a reservation is left for its start version; otherwise (an over-admitted
  surplus) its prompt is re-queued, reason `over_admitted`, not counted as an attempt; groups that can no longer
  be kept are cancelled and re-queued the same way. The buffer learns the reservations from every frame's status
  (`pending`) for its EDF check. A group's samples carry per-token versions >= its start version, so no trained
  sample exceeds the bound; s = 0 is synchronous, on-policy. Requests running when a batch fills stay in flight
  for the next one.
- Weight updates (the orchestrator calls `before_weight_update()`, syncs, then `after_weight_update(version)`):
  no request is sent between the two. rollout.partial_rollout: `wait` lets in-flight requests finish; `abort`
  aborts them and re-queues (at the front) the prompts of every group not fully generated; `resume` aborts them,
  keeps each generated prefix with its logprobs and versions, and afterwards resends prompt + prefix with
  max_new_tokens reduced by the prefix, so a sample's `versions` list is per token (old version, then new).
  MoE routing replay (algorithm.routing_replay = rollout, a MoE model.path): each request asks for the routed
  experts (`routed_experts_start_len` = where the tokens it has not recorded begin: 0, or for a resumed prefix its
  last token) and the sample carries every fed token's own record (Sample.routed_experts), across resumes.
- Tokens are tagged with the engine's reported `weight_version` (the manager's version when the engine reports a
  non-integer, e.g. SGLang's initial "default").
- Failures: a request that raises (EngineDeadError, EngineError, anything) is retried on another live engine
  (resume mode keeps its earlier prefix); after `max_request_retries` failures its group is abandoned and the
  prompt re-queued. A prompt is generated at most 1 + rollout.max_gen_rounds times per epoch; past that it ends
  as filtered (reason `max_gen_rounds`). Reward failures are contained by the reward runner. The loop never dies.
  An engine's 4xx answer (`is_request_error`: the request is wrong, e.g. a sampling parameter out of the engine's
  range) is no engine failure: nothing is retried or sent any more, and `fatal()` names the engine URL and its
  message, which the driver raises (the run stops with that one error).
- Dynamic sampling follows DAPO: a group the filter drops is a terminal outcome ("filtered by reason"); its
  prompt is not regenerated this epoch (new prompts are drawn instead). It is still sent (header only, no tokens)
  so the buffer counts it.
- Accounting: every draw ends in exactly one of pushed (then trained or filtered at the buffer), requeued,
  gave_up, or is in flight: drawn == pushed + requeued + gave_up + in_flight (`accounting()`). Each frame carries
  these counters (`RolloutStatus`), and the buffer checks the whole identity
  drawn == trained + filtered + requeued + in_flight + buffered on that consistent cut.
- `state_dict()` saves the queue with the in-flight prompts at its front (they are re-queued on load; their
  generation is redone) and the counters; `state_dict()["pushed"]` is the cut the buffer's checkpoint must use.
- The client is anything with `alive_urls`, async `generate(input_ids, sampling_params, rid=, return_logprob=,
  url=) -> GenerateOutput` and async `abort(rid=None, abort_all=False)` (engines.client.EngineClient, or a
  simulated engine); the reward runner anything with async `score_async(response, answer) -> RewardResult` and
  `metrics()`; the tokenizer anything with `decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import numpy as np

from pipeline.algorithm.filters import dynamic_sampling_filter
from pipeline.algorithm.shaping import shape_reward
from pipeline.config import Config, layout
from pipeline.contracts.engine_api import (
    EngineDeadError,
    EngineError,
    GenerateClient,
    GenerateOutput,
    routed_experts,
)
from pipeline.contracts.records import ROUTE_DTYPE, Group, Prompt, Sample
from pipeline.flow.admission import AdmissionControl
from pipeline.flow.prompt_queue import PromptQueue
from pipeline.flow.rewards import WRONG_REWARD, RewardResult
from pipeline.flow.transport import GroupSender, RolloutStatus, encode_group, encode_status

log = logging.getLogger(__name__)


class RewardScorer(Protocol):
    async def score_async(self, response: str, answer: str) -> RewardResult: ...

    def metrics(self) -> dict[str, float]: ...


@dataclass(eq=False)
class _Request:
    group: _GroupRun
    index: int
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    routes: list[np.ndarray] = field(default_factory=list)  # routed-expert records of the fed tokens, in order
    finish: str = ""
    rid: str = ""
    sends: int = 0
    failures: int = 0
    avoid: str | None = None
    task: asyncio.Task | None = None
    done: bool = False


@dataclass(eq=False)
class _GroupRun:
    prompt: Prompt
    group_id: str
    draw: int
    start_version: int
    requests: list[_Request] = field(default_factory=list)
    samples: list[Sample | None] = field(default_factory=list)
    scored: int = 0
    abandoned: bool = False


def route_shape(cfg: Config) -> tuple[int, int] | None:
    """(num_hidden_layers, num_experts_per_tok) of a mixture-of-experts `model.path` when algorithm.routing_replay
    asks for the engines' routing; None otherwise (off, a dense model or the built-in tiny one)."""
    if cfg.algorithm.routing_replay != "rollout" or not cfg.model.path:
        return None
    import json
    import os

    path = os.path.join(cfg.model.path, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"algorithm.routing_replay: cannot read {path} ({e})") from e
    hf = hf.get("text_config", hf)
    topk = int(hf.get("num_experts_per_tok") or 0)
    return (int(hf["num_hidden_layers"]), topk) if topk else None


def parse_version(reported: str, default: int) -> int:
    try:
        return int(reported)
    except (TypeError, ValueError):
        return default


class RolloutManager:
    def __init__(
        self,
        cfg: Config,
        client: GenerateClient,
        tokenizer: Any,
        prompts: list[Prompt],
        push_address: str,
        rewards: RewardScorer,
        *,
        sender: GroupSender | None = None,
        max_request_retries: int = 3,
        abort_timeout_s: float = 60.0,
    ):
        r = cfg.rollout
        self.cfg, self.client, self.tokenizer, self.rewards = cfg, client, tokenizer, rewards
        self.G, self.L, self.s = r.n_samples_per_prompt, r.max_new_tokens, layout(cfg).max_staleness
        self.B, self.E = cfg.trainer.batch_size, cfg.weight_sync.every
        self.mode, self.max_inflight, self.max_gen_rounds = (
            r.partial_rollout,
            r.max_inflight_per_engine,
            r.max_gen_rounds,
        )
        self.dynamic_sampling, self.overlong = layout(cfg).dynamic_sampling, cfg.algorithm.overlong
        self.sampling = {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k}
        self.max_request_retries, self.abort_timeout_s = max_request_retries, abort_timeout_s
        # MoE rollout routing replay: (layers, top-k) of the engines' routed-expert records, None when not asked
        self.route_shape = route_shape(cfg)
        self.queue = PromptQueue(prompts, seed=cfg.trainer.seed, shuffle=cfg.data.shuffle)
        _check_shaping(self.overlong, self.L)  # fail here, not in a scoring task that would leave a group hanging
        self.sender = sender if sender is not None else GroupSender(push_address)

        self._version = 0
        self._updating = self._stopping = False
        self._groups: dict[str, _GroupRun] = {}  # unresolved, by group id
        self.admission = AdmissionControl(self.s, self.B, self.E, r.over_admission)
        self._ready: list[tuple[int, int, int, int, _Request]] = []  # heap: oldest group first
        self._ready_seq = 0  # tie-breaker: a request is never compared
        self._load: Counter = Counter()  # requests in flight per engine URL
        self._running = 0
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_task: asyncio.Task | None = None
        self._status_dirty = True

        self._drawn = self._pushed = self._gave_up = 0
        self._requeued: Counter = Counter()  # by reason
        self._decisions: Counter = Counter()  # the filter's decisions (over-admitted surpluses included)
        self._failures: Counter = Counter()  # request failures by kind
        self._counts: Counter = Counter()  # retries, resumed, tokens, wasted_tokens, over_admitted, internal_errors
        self._window = _Window()
        self._fatal = ""  # an engine refused a request (4xx): the run stops (see fatal())

    # ------------------------------------------------------------------ orchestrator API
    async def run(self) -> None:
        """Generate until stop(). Never raises on engine, reward or transport trouble."""
        self._post_status()
        while not self._stopping:
            self._wake.clear()
            try:
                self._schedule()
            except Exception:  # a bug must not stop generation silently: log, count, keep going
                self._counts["internal_errors"] += 1
                log.exception("rollout: scheduling failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)  # also re-checks engines that come back
            except TimeoutError:
                pass

    def set_version(self, version: int, stale_dropped: int | None = None) -> None:
        """The engines' weight version (at start or resume). `stale_dropped`: the buffer's cumulative count of kept
        groups dropped as stale (filter/drop_stale), which frees their admission capacity (0 in steady state)."""
        self._version = int(version)
        self.admission.set_version(version, stale_dropped)
        self._status_dirty = True
        self._wake.set()

    async def before_weight_update(self) -> None:
        """Stop sending requests and settle in-flight ones per rollout.partial_rollout; returns when none runs."""
        self._updating = True
        if self.mode == "wait":
            await self._idle.wait()
        else:
            await self._abort_in_flight()
            if self.mode == "abort":
                unfinished = [g for g in self._groups.values() if not all(r.done for r in g.requests)]
                for g in sorted(unfinished, key=lambda g: -g.draw):  # pushed to the front newest first: order kept
                    self._abandon(g, "weight_update")
        self._post_status()

    async def after_weight_update(self, version: int) -> None:
        self.set_version(version)
        self._updating = False
        self._wake.set()

    async def stop(self) -> None:
        """Stop generating; in-flight groups stay counted in flight (state_dict re-queues them)."""
        self._stopping = True
        self._wake.set()
        if self._running:
            try:
                await asyncio.wait_for(self.client.abort(abort_all=True), 5)
            except Exception as e:
                log.debug("rollout: abort at stop failed: %r", e)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._post_status()  # the buffer's view of the accounting ends consistent with ours
        try:
            await asyncio.wait_for(self.sender.drain(), 5)
        except TimeoutError:
            log.warning("rollout: %d frames not delivered at stop", self.sender.backlog)
        self.sender.close()

    # ------------------------------------------------------------------ admission and dispatch
    def _schedule(self) -> None:
        if self._fatal:  # nothing more is sent after a refused request
            return
        if not self._stopping:
            self._cancel_hopeless()  # also during an update: in wait mode it would wait for them
        if not (self._updating or self._stopping):
            self._dispatch()
            while not self._ready and self._free_slots() > 0 and self.admission.may_admit():
                self._admit()
                self._dispatch()
        if self._status_dirty:
            self._post_status()

    def _free_slots(self) -> int:
        return sum(max(0, self.max_inflight - self._load[u]) for u in self.client.alive_urls)

    def _admit(self) -> None:
        prompt = self.queue.draw()
        self._drawn += 1
        g = _GroupRun(prompt, f"g{self._drawn}", self._drawn, self._version, samples=[None] * self.G)
        g.requests = [_Request(g, i) for i in range(self.G)]
        for req in g.requests:
            self._push_ready(req)
        self._groups[g.group_id] = g
        if not self.admission.admitted():  # no reservation: admitted against the expected keep rate
            self._counts["over_admitted"] += 1
        self._status_dirty = True

    def _cancel_hopeless(self) -> None:
        doomed = self.admission.hopeless()
        if doomed:  # newest first: each goes to the queue's front, so their order is kept
            for g in sorted((g for g in self._groups.values() if g.start_version in doomed), key=lambda g: -g.draw):
                self._abandon(g, "over_admitted")

    def _push_ready(self, req: _Request) -> None:
        self._ready_seq += 1
        heapq.heappush(self._ready, (req.group.start_version, req.group.draw, req.index, self._ready_seq, req))

    def _pick_url(self, avoid: str | None) -> str | None:
        free = [u for u in self.client.alive_urls if self._load[u] < self.max_inflight]
        if len(free) > 1 and avoid in free:
            free.remove(avoid)
        return min(free, key=lambda u: self._load[u]) if free else None

    def _dispatch(self) -> None:
        while self._ready and not (self._updating or self._stopping):
            req = self._ready[0][-1]
            if req.group.abandoned or req.done or req.task is not None:  # stale entry
                heapq.heappop(self._ready)
                continue
            url = self._pick_url(req.avoid)
            if url is None:
                return
            heapq.heappop(self._ready)
            self._send_request(req, url)

    def _send_request(self, req: _Request, url: str) -> None:
        remaining = self.L - len(req.ids)
        if remaining <= 0:  # a resumed prefix that already reached max_new_tokens
            req.finish, req.done = "length", True
            self._spawn(self._score(req))
            return
        g = req.group
        rid = f"{g.group_id}-{req.index}" + (f".{req.sends}" if req.sends else "")
        req.rid = rid
        req.sends += 1
        params = {"max_new_tokens": remaining, **self.sampling}
        self._load[url] += 1
        self._running += 1
        self._idle.clear()
        req.task = self._spawn(self._generate(req, url, rid, params, self._version))

    async def _generate(self, req: _Request, url: str, rid: str, params: dict, version: int) -> None:
        out: GenerateOutput | None = None
        err: BaseException | None = None
        try:
            extra = self._routing_request(req)
            out = await self.client.generate(req.group.prompt.prompt_ids + req.ids, params, rid=rid, url=url, **extra)
            if extra:
                self._take_routes(req, out, url, extra["routed_experts_start_len"])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            err = e
        finally:
            self._load[url] -= 1
            self._running -= 1
            req.task = None
            if self._running == 0:
                self._idle.set()
            self._wake.set()
        if out is not None and len(out.logprobs) != len(out.output_ids):
            err = EngineError(f"{url}: {len(out.logprobs)} logprobs for {len(out.output_ids)} output tokens", url)
        if err is not None:
            self._on_error(req, url, err)
        else:
            self._on_output(req, out, version)

    def _on_output(self, req: _Request, out: GenerateOutput, version: int) -> None:
        n = len(out.output_ids)
        self._counts["tokens"] += n
        self._window.tokens += n
        g = req.group
        if g.abandoned or self._stopping:
            self._counts["wasted_tokens"] += n
            return
        req.ids += out.output_ids
        req.logprobs += out.logprobs
        req.versions += [parse_version(out.weight_version, version)] * n
        if self.route_shape is not None:
            req.routes.append(out.meta_info.pop("_routes"))
        if out.finish_reason != "abort":
            req.finish, req.done = out.finish_reason, True
            self._spawn(self._score(req))
            return
        if self._updating and self.mode == "abort":
            return  # before_weight_update re-queues the whole group
        if self.mode == "resume":
            self._counts["resumed"] += 1
        else:  # an abort we did not ask for: start the sample over, so its tokens keep one version
            self._counts["wasted_tokens"] += len(req.ids)
            req.ids, req.logprobs, req.versions, req.routes = [], [], [], []
        self._push_ready(req)

    def _routing_request(self, req: _Request) -> dict[str, Any]:
        """SGLang's routed-experts fields: the first send records every token from 0; a resumed request (prompt +
        prefix) only from the prefix's last token on, which its earlier request sampled but never fed."""
        if self.route_shape is None:
            return {}
        start = len(req.group.prompt.prompt_ids) + len(req.ids) - 1 if req.ids else 0
        return {"return_routed_experts": True, "routed_experts_start_len": start}

    def _take_routes(self, req: _Request, out: GenerateOutput, url: str, start: int) -> None:
        """Decode the answer's records (raises EngineError when missing or malformed: handled as a failed request)."""
        layers, topk = self.route_shape
        routes = routed_experts(out, layers, topk, start_len=start)
        if routes is None and out.finish_reason == "abort":
            routes = np.zeros((0, layers, topk), np.int16) if not out.output_ids else None  # None: sample unrecorded
        elif routes is None:
            raise EngineError(
                f"{url}/generate: no meta_info.routed_experts although algorithm.routing_replay = rollout (is the "
                "engine started with --enable-return-routed-experts, and the model a mixture of experts?)",
                url,
            )
        out.meta_info["_routes"] = routes  # taken by _on_output; the base64 string is dropped with it
        out.meta_info.pop("routed_experts", None)

    def _sample_routes(self, req: _Request) -> dict[str, Any]:
        """The Sample's routed-experts fields: (prompt + response - 1, L, k) int16 bytes when complete."""
        if self.route_shape is None or not req.routes:
            return {}
        if any(r is None for r in req.routes):
            self._counts["routing_incomplete"] += 1
            return {}
        routes = np.concatenate(req.routes) if len(req.routes) > 1 else req.routes[0]
        if routes.shape[0] != len(req.group.prompt.prompt_ids) + len(req.ids) - 1:
            self._counts["routing_incomplete"] += 1  # the trainer routes such a sample itself
            return {}
        layers, topk = self.route_shape
        return {"routed_experts": routes.astype(ROUTE_DTYPE).tobytes(), "routed_layers": layers, "routed_topk": topk}

    def _on_error(self, req: _Request, url: str, err: BaseException) -> None:
        if is_request_error(err):  # the engine refused the request itself: every retry would be refused the same
            self._request_refused(url, err)
            return
        kind = (
            "engine_dead" if isinstance(err, EngineDeadError) else "engine" if isinstance(err, EngineError) else "other"
        )
        self._failures[kind] += 1
        log.warning("rollout: request %s-%d on %s failed: %s", req.group.group_id, req.index, url, err)
        g = req.group
        if g.abandoned or self._stopping:
            return
        req.failures += 1
        req.avoid = url
        if req.failures > self.max_request_retries:
            self._abandon(g, "engine_error")
        else:
            self._counts["retries"] += 1
            self._push_ready(req)

    def _request_refused(self, url: str, err: BaseException) -> None:
        """Fatal to the run: stop generating and say why once (`fatal()`, polled by the driver)."""
        self._failures["request"] += 1
        if self._fatal:
            return
        self._fatal = f"engine {url} refused a request (a request error, not an engine failure: not retried): {err}"
        log.error("rollout: %s", self._fatal)

    def progress(self) -> dict[str, Any]:
        """Totals since start, without resetting anything (unlike stats()): groups generated (pushed), kept,
        filtered by reason, requeued, and the reward function's failures; the driver prints them while it waits."""
        rewards = self.rewards.metrics()
        return {
            "generated": self._pushed,
            "kept": self.admission.kept,
            "filtered": {k: v for k, v in sorted(self._decisions.items()) if k != "kept"},
            "requeued": sum(self._requeued.values()),
            "reward_failures": int(rewards.get("reward/failed", 0)),
        }

    def fatal(self) -> str:
        """Why generation cannot go on ("" while it can): an engine answered a request with a 4xx."""
        return self._fatal

    async def _abort_in_flight(self) -> None:
        deadline = time.monotonic() + self.abort_timeout_s
        while self._running:
            try:
                await asyncio.wait_for(self.client.abort(abort_all=True), 10)
            except Exception as e:
                log.warning("rollout: abort_all failed: %r", e)
            try:
                await asyncio.wait_for(self._idle.wait(), 0.5)
            except TimeoutError:
                pass
            if self._running and time.monotonic() > deadline:  # engines ignore the abort: drop the requests
                log.warning(
                    "rollout: %d requests still running %.0fs after abort; cancelling",
                    self._running,
                    self.abort_timeout_s,
                )
                for g in list(self._groups.values()):
                    for r in g.requests:
                        if r.task is not None:
                            r.task.cancel()
                            self._push_ready(r)
                await self._idle.wait()

    # ------------------------------------------------------------------ groups: scoring, finishing, abandoning
    async def _score(self, req: _Request) -> None:
        g = req.group
        try:
            text = self.tokenizer.decode(req.ids, skip_special_tokens=True)
            res = await self.rewards.score_async(text, g.prompt.answer)
            task_reward, acc, failed = res.reward, res.acc, res.failed
        except Exception as e:  # the runner never raises; a tokenizer might
            task_reward, acc, failed = WRONG_REWARD, False, f"decode_{type(e).__name__}"
        if g.abandoned:
            return
        sample = Sample(
            prompt_id=g.prompt.prompt_id,
            group_id=g.group_id,
            index=req.index,
            prompt_ids=g.prompt.prompt_ids,
            response_ids=req.ids,
            logprobs=req.logprobs,
            versions=req.versions,
            finish_reason=req.finish,
            task_reward=task_reward,
            acc=acc,
            reward_failed=failed,
            max_new_tokens=self.L,
            **self._sample_routes(req),
        )
        sample.reward = shape_reward(sample, self.overlong)
        g.samples[req.index] = sample
        g.scored += 1
        if g.scored == self.G:
            self._finish(g)

    def _finish(self, g: _GroupRun) -> None:
        p = g.prompt
        group = Group(
            prompt_id=p.prompt_id,
            group_id=g.group_id,
            samples=g.samples,
            answer=p.answer,
            attempt=p.attempt,
            epoch=p.epoch,
        )
        keep, reason = True, ""
        if self.dynamic_sampling:  # the one place the filter is decided: the buffer counts the reason sent with it
            decision = dynamic_sampling_filter(group)
            keep, reason = decision.keep, ("" if decision.keep else decision.reason)
            self._decisions[decision.reason] += 1
            self.admission.observe(keep)
        if keep and not self.admission.keep(g.start_version):  # over-admitted surplus: the bound has no slot for it
            self._abandon(g, "over_admitted")
            return
        self._resolve(g, kept=keep)
        self._pushed += 1
        self._window.add(group)
        self._post(encode_group(group, self._status(), start_version=g.start_version, drop_reason=reason))
        self._status_dirty = False  # the frame carried the latest status

    def _resolve(self, g: _GroupRun, kept: bool = False) -> None:
        del self._groups[g.group_id]
        self.admission.resolved(g.start_version, kept)
        self._status_dirty = True

    def _abandon(self, g: _GroupRun, reason: str) -> None:
        """Give up this attempt: cancel its requests, re-queue the prompt at the front (or give up the prompt). An
        over-admitted surplus is not the prompt's attempt: it does not count towards max_gen_rounds."""
        if g.abandoned:
            return
        g.abandoned = True
        for r in g.requests:
            if r.task is not None:
                r.task.cancel()
                self._spawn(self._abort_quietly(r.rid))
        self._counts["wasted_tokens"] += sum(len(r.ids) for r in g.requests)
        self._resolve(g)
        p = g.prompt
        attempt = p.attempt + (reason != "over_admitted")
        if attempt > self.max_gen_rounds:
            self._gave_up += 1
            log.warning("rollout: prompt %s given up after %d attempts this epoch", p.prompt_id, attempt)
        else:
            self.queue.push_front([msgspec.structs.replace(p, attempt=attempt)])
            self._requeued[reason] += 1

    async def _abort_quietly(self, rid: str) -> None:
        try:
            await asyncio.wait_for(self.client.abort(rid=rid), 10)
        except Exception as e:  # best effort: the engine may be dead, or already done with it
            log.debug("rollout: abort of %s failed: %r", rid, e)

    # ------------------------------------------------------------------ transport
    def _status(self) -> RolloutStatus:
        return RolloutStatus(
            version=self._version,
            drawn=self._drawn,
            pushed=self._pushed,
            requeued=sum(self._requeued.values()),
            gave_up=self._gave_up,
            in_flight=len(self._groups),
            pending=self.admission.reserved(),
        )

    def _post_status(self) -> None:
        self._status_dirty = False
        self._post(encode_status(self._status()))

    def _post(self, frames: list[bytes]) -> None:
        """Queue a frame in stream order without blocking the loop (backpressure waits in the sender's outbox)."""
        if not self.sender.post(frames) and (self._drain_task is None or self._drain_task.done()):
            self._drain_task = self._spawn(self.sender.drain())

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._counts["internal_errors"] += 1
            log.error("rollout: task failed", exc_info=task.exception())
        self._wake.set()

    # ------------------------------------------------------------------ accounting, metrics, state
    def accounting(self) -> dict[str, int]:
        """drawn == pushed + requeued + gave_up + in_flight (this side of the identity; the buffer checks the rest)."""
        out = {
            "drawn": self._drawn,
            "pushed": self._pushed,
            "kept": self.admission.kept,
            "requeued": sum(self._requeued.values()),
            "gave_up": self._gave_up,
            "in_flight": len(self._groups),
        }
        out["balanced"] = int(out["drawn"] == out["pushed"] + out["requeued"] + out["gave_up"] + out["in_flight"])
        return out

    def stats(self) -> dict[str, float]:
        """Metrics since the previous call (rates, means) and counters (totals)."""
        m = self._window.metrics()
        self._window = _Window()
        m.update(
            {
                "rollout/inflight": float(self._running),
                "rollout/queued_requests": float(len(self._ready)),
                "rollout/version": float(self._version),
                "rollout/alive_engines": float(len(self.client.alive_urls)),
                "rollout/engine_failures": float(sum(self._failures.values())),
            }
        )
        m.update(self.admission.metrics())
        m.update({f"rollout/engine_failures_{k}": float(v) for k, v in self._failures.items()})
        m.update({f"rollout/{k}": float(v) for k, v in self._counts.items()})
        m.update({f"rollout/filter_{k}": float(v) for k, v in self._decisions.items()})
        m.update({f"rollout/requeued_{k}": float(v) for k, v in self._requeued.items()})
        m.update({f"rollout/{k}": float(v) for k, v in self.accounting().items()})
        m.update(self.rewards.metrics())
        return m

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; the in-flight prompts are saved at the front of the queue. `pushed` is the buffer's cut."""
        in_flight = sorted(self._groups.values(), key=lambda g: g.draw)
        return {
            "queue": self.queue.state_dict(front_first=[g.prompt for g in in_flight]),
            "drawn": self._drawn,
            "pushed": self._pushed,
            "kept": self.admission.kept,
            "gave_up": self._gave_up,
            "requeued": dict(self._requeued),
            "in_flight": len(in_flight),
            "version": self._version,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Before run(): the saved in-flight prompts are at the queue's front and now count as re-queued."""
        if self._groups or self._drawn:
            raise RuntimeError("RolloutManager.load_state_dict: call it before run()")
        self.queue.load_state_dict(state["queue"])
        self._drawn, self._pushed, self.admission.kept = state["drawn"], state["pushed"], state["kept"]
        self._gave_up = state["gave_up"]
        self._requeued = Counter(state["requeued"])
        self._requeued["resume"] += state["in_flight"]
        self.set_version(state["version"])


RETRYABLE_4XX = (408, 429)
"""4xx answers that report a passing state of the engine (request timeout, too many requests), not the request."""


def is_request_error(err: BaseException) -> bool:
    """An engine's 4xx answer: the request is wrong (a sampling parameter out of the engine's range, a prompt too
    long for its context, a refused limit, a wrong API key). Connection errors, timeouts and 5xx are engine
    failures: the engine is healed and the request re-queued."""
    status = getattr(err, "status", None)
    return isinstance(err, EngineError) and status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX


def _check_shaping(overlong: Any, max_new_tokens: int) -> None:
    probe = Sample(
        prompt_id="",
        group_id="",
        index=0,
        prompt_ids=[],
        response_ids=[],
        logprobs=[],
        versions=[],
        max_new_tokens=max_new_tokens,
    )
    try:
        shape_reward(probe, overlong)
    except ValueError as e:
        raise ValueError(
            f"rollout: overlong shaping cannot run with rollout.max_new_tokens={max_new_tokens}: {e}"
        ) from None


class _Window:
    """Per-interval rollout metrics (reset by each stats() call)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.tokens = self.groups = self.n = self.truncated = 0
        self.len_sum = self.reward_sum = self.acc_sum = 0.0

    def add(self, group: Group) -> None:
        self.groups += 1
        for s in group.samples:
            self.n += 1
            self.len_sum += s.response_len
            self.reward_sum += s.reward
            self.acc_sum += s.acc
            self.truncated += s.truncated

    def metrics(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {
            "rollout/tokens_per_s": self.tokens / max(time.monotonic() - self.t0, 1e-9),
            "rollout/groups_finished": float(self.groups),
            "rollout/response_len_mean": self.len_sum / n,
            "rollout/reward_mean": self.reward_sum / n,
            "rollout/acc_mean": self.acc_sum / n,
            "rollout/truncated_frac": self.truncated / n,
        }
