"""Evaluation: avg@k / pass@k of a policy on held-out prompts, through the engines or with plain HF generate.

Contract:
- `evaluate(client, prompts, tokenizer, reward_runner, k, sampling, max_concurrency)` (async) sends k requests
  per prompt through `EngineClient.generate` (at most `max_concurrency` in flight), decodes each response
  without special tokens, scores it with `reward_runner.score_async(response, answer)` when the runner has it,
  else `reward_runner.score` (awaited if a coroutine, else run in a worker thread), and returns `summarize(...)`.
  A request the engine aborts (a weight update during training pauses the engines with `abort`) is resumed: the
  prompt plus the tokens generated so far are sent again for the remaining budget (at most `MAX_RESUMES` times),
  so an evaluation during training scores whole responses, never a truncated prefix. Such a response's tail comes
  from the weights that followed (one or two versions later at most, as the evaluation is short).
- `evaluate_hf(model, tokenizer, prompts, ...)` does the same offline with `model.generate` (greedy when
  temperature is 0, else pure sampling: top_k off, `top_p` as given), seeded; for the warm start and tests.
- `summarize` -> {"acc": avg@k (mean over prompts of the mean acc of its k responses), "pass": pass@k (share of
  prompts with at least one correct response), "reward": mean reward, "response_len": mean response tokens,
  "truncated": share of responses that hit max_new_tokens, "n_prompts", "k", "per_prompt": [...]}.
- `eval_main(cfg)` (`dapo eval`): evaluates the configured model (model.path, any HF checkpoint, or the tiny model
  with its warm start) with eval.* sampling, on local engines it launches (SGLang on GPU with
  engine.backend=sglang, the CPU engine otherwise, or engine.urls when external), on every set of data.eval_path:
  one source, or several separated by commas. A set may be named: `bench:aime24` (DAPO's 960-row parquet, 30
  problems x 32 copies: avg@1 over it is avg@32), `bench:aime24-30` (the 30-problem jsonl, DAPO's template),
  `bench:math500`, `bench:gsm8k` (DAPO's template), read from $DAPO_DATA_DIR (default ../shared/data next to the
  repository); a named set scores with its own scorer (Math-Verify for MATH-500 and GSM8K, DAPO's for AIME)
  unless eval.reward_fn is set, and takes `?key=value` overrides like any file source (`bench:math500?template=chat`).
  Prints one JSON line per set and a Markdown table; writes eval.json ({set: metrics}) and eval.md.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.contracts.records import Prompt
from pipeline.flow.data import data_dir

EVAL_SETS: dict[str, tuple[str, str, str]] = {
    # name: (file under the data directory, source parameters, default scorer)
    "aime24": ("aime-2024.parquet", "answer_key=reward_model.ground_truth", "pipeline.flow.rewards:dapo_math_reward"),
    "aime24-30": (
        "aime24_test.jsonl",
        "prompt_key=problem&id_key=id&template=dapo",
        "pipeline.flow.rewards:dapo_math_reward",
    ),
    "math500": (
        "math500_test.jsonl",
        "prompt_key=problem&id_key=unique_id&template=dapo",
        "pipeline.flow.rewards:math_verify_reward",
    ),
    "gsm8k": (
        "gsm8k_test.jsonl",
        "prompt_key=question&answer_key=answer|after:####&template=dapo",
        "pipeline.flow.rewards:math_verify_reward",
    ),
}
"""The named evaluation sets of `dapo eval` (see the module docstring)."""

MAX_RESUMES = 100
"""Resumptions of one aborted evaluation request before its partial output is scored as it is."""


@dataclass
class PromptResult:
    prompt_id: str
    answer: str
    accs: list[bool] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)


def summarize(results: Sequence[PromptResult]) -> dict[str, Any]:
    """Aggregate per-prompt results (see the module docstring)."""
    scored = [r for r in results if r.accs]
    n_resp = sum(len(r.accs) for r in scored)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else 0.0

    return {
        "acc": mean([mean([float(a) for a in r.accs]) for r in scored]),
        "pass": mean([float(any(r.accs)) for r in scored]),
        "reward": sum(sum(r.rewards) for r in scored) / max(1, n_resp),
        "response_len": sum(sum(r.lengths) for r in scored) / max(1, n_resp),
        "truncated": sum(sum(r.truncated) for r in scored) / max(1, n_resp),
        "n_prompts": len(scored),
        "k": max((len(r.accs) for r in scored), default=0),
        "per_prompt": [r.__dict__ for r in results],
    }


def _as_score(result: Any) -> tuple[float, bool]:
    """(reward, acc) from a RewardResult, a reward dict ({"score", "acc"}), a bool or a number."""
    if isinstance(result, dict):
        acc = bool(result.get("acc", result.get("score", 0) > 0))
        return float(result.get("score", result.get("reward", float(acc)))), acc
    if hasattr(result, "acc"):
        return float(getattr(result, "reward", float(result.acc))), bool(result.acc)
    if isinstance(result, bool):
        return float(result), result
    return float(result), float(result) > 0


# ------------------------------------------------------------------------------------------------ engines
async def evaluate(
    client: Any,
    prompts: Sequence[Prompt],
    tokenizer: Any,
    reward_runner: Any,
    k: int,
    sampling: dict[str, Any],
    max_concurrency: int = 64,
) -> dict[str, Any]:
    """avg@k through the engine client (see the module docstring)."""
    if k < 1:
        raise ValueError(f"eval.n_samples: k must be >= 1; got {k}")
    results = [PromptResult(p.prompt_id, p.answer) for p in prompts]
    gate = asyncio.Semaphore(max(1, max_concurrency))
    score_async = getattr(reward_runner, "score_async", None)
    if score_async is None and inspect.iscoroutinefunction(reward_runner.score):
        score_async = reward_runner.score
    max_new = int(sampling.get("max_new_tokens", 0))

    async def one(i: int, j: int) -> None:
        p = prompts[i]
        async with gate:
            output_ids, finish = await _generate_whole(client, p.prompt_ids, sampling, f"eval-{p.prompt_id}-{j}")
        text = tokenizer.decode(output_ids, skip_special_tokens=True)
        if score_async is not None:
            scored = await score_async(text, p.answer)
        else:
            scored = await asyncio.to_thread(reward_runner.score, text, p.answer)
        reward, acc = _as_score(scored)
        r = results[i]
        r.accs.append(acc)
        r.rewards.append(reward)
        r.lengths.append(len(output_ids))
        r.truncated.append(finish == "length" or (max_new > 0 and len(output_ids) >= max_new))
        if j == 0:
            r.responses.append(text)

    await asyncio.gather(*(one(i, j) for i in range(len(prompts)) for j in range(k)))
    return summarize(results)


async def _generate_whole(client: Any, prompt_ids: list[int], sampling: dict[str, Any], rid: str) -> tuple[list, str]:
    """Output ids and finish reason of one request, resumed after aborts (see the module docstring)."""
    max_new = int(sampling.get("max_new_tokens", 0))
    output_ids: list[int] = []
    for attempt in range(MAX_RESUMES + 1):
        params = dict(sampling)
        if max_new:
            params["max_new_tokens"] = max_new - len(output_ids)
        sub_rid = rid if attempt == 0 else f"{rid}-r{attempt}"
        out = await client.generate(prompt_ids + output_ids, params, rid=sub_rid, return_logprob=False)
        output_ids += out.output_ids
        if out.finish_reason != "abort" or (max_new and len(output_ids) >= max_new):
            return output_ids, out.finish_reason
        await asyncio.sleep(0.02 * min(attempt + 1, 10))  # let the weight update that aborted it finish
    return output_ids, "abort"


# ------------------------------------------------------------------------------------------------ offline
def default_score_fn() -> Callable[[str, str], Any]:
    from pipeline.flow.rewards import dapo_math_reward

    return dapo_math_reward


@torch.no_grad()
def generate_hf(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[list[int]]:
    """Responses (cut after eos, eos kept) for a batch of prompts, left-padded."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(list(p))
        mask[i, width - len(p) :] = 1
    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **kwargs,
    )
    responses = []
    for row in out[:, width:].tolist():
        responses.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return responses


def evaluate_hf(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    score_fn: Callable[[str, str], Any] | None = None,
    k: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    top_p: float = 1.0,
) -> dict[str, Any]:
    """avg@k with plain HF generate (see the module docstring); `score_fn` defaults to DAPO's math reward."""
    score_fn = score_fn or default_score_fn()
    results = [PromptResult(p.prompt_id, p.answer) for p in prompts]
    work = [(i, j) for i in range(len(prompts)) for j in range(k)]
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(work), batch_size):
            chunk = work[start : start + batch_size]
            outs = generate_hf(
                model,
                [prompts[i].prompt_ids for i, _ in chunk],
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                max_new_tokens,
                temperature,
                top_p,
            )
            for (i, j), out in zip(chunk, outs, strict=True):
                text = tokenizer.decode(out, skip_special_tokens=True)
                reward, acc = _as_score(score_fn(text, prompts[i].answer))
                r = results[i]
                r.accs.append(acc)
                r.rewards.append(reward)
                r.lengths.append(len(out))
                r.truncated.append(tokenizer.eos_token_id not in out and len(out) >= max_new_tokens)
                if j == 0:
                    r.responses.append(text)
    model.train(was_training)
    return summarize(results)


# ------------------------------------------------------------------------------------------------ CLI
def eval_sampling(cfg: Any, eos_id: int) -> dict[str, Any]:
    """SGLang sampling_params for evaluation: eval.temperature with the rollout's length and nucleus settings."""
    return {
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "temperature": cfg.eval.temperature,
        "top_p": cfg.rollout.top_p,
        "top_k": cfg.rollout.top_k,
        "stop_token_ids": [eos_id],
    }


def resolve_eval_set(spec: str) -> tuple[str, str, str | None]:
    """(name, source, default scorer or None) of one eval set: `bench:<name>[?k=v...]` or a plain source."""
    if not spec.startswith("bench:"):
        return spec, spec, None
    name, _, extra = spec[len("bench:") :].partition("?")
    if name not in EVAL_SETS:
        raise ValueError(f"data.eval_path: unknown eval set {spec!r}; known: bench:{', bench:'.join(EVAL_SETS)}")
    file, params, scorer = EVAL_SETS[name]
    path = data_dir() / file
    if not path.is_file():
        raise ValueError(f"data.eval_path: {spec}: {path} not found (set DAPO_DATA_DIR to the data directory)")
    return name, f"{path}?{params}" + (f"&{extra}" if extra else ""), scorer


def eval_table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| set | prompts | k | avg@k | pass@k | mean length | truncated |", "|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['n_prompts']} | {m['k']} | {m['acc']:.3f} | {m['pass']:.3f} | "
            f"{m['response_len']:.1f} | {m['truncated']:.3f} |"
        )
    return "\n".join(lines)


def eval_main(cfg: Any) -> int:
    """`dapo eval CONFIG`: see the module docstring."""
    from pipeline.config import engine_api_key
    from pipeline.flow.data import DataError, load_prompts
    from pipeline.flow.rewards import RewardRunner
    from pipeline.tokenizer import load_tokenizer
    from pipeline.warmstart import prepare_model_dir

    if not cfg.data.eval_path:
        print("dapo eval: data.eval_path is empty; nothing to evaluate")
        return 2
    try:
        sets = [resolve_eval_set(s.strip()) for s in cfg.data.eval_path.split(",") if s.strip()]
    except ValueError as e:
        print(f"dapo eval: {e}")
        return 2
    run_dir = Path(cfg.logging.dir) / (cfg.logging.run_name or time.strftime("eval-%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model_dir(cfg, str(run_dir))
    tokenizer = load_tokenizer(cfg.model.tokenizer if not cfg.model.path else cfg.model.path, model_dir)
    loaded = []
    for name, source, scorer in sets:
        try:
            prompts = load_prompts(cfg.data, tokenizer, path=source, seed=cfg.trainer.seed)
        except DataError as e:
            print(f"dapo eval: {e}")
            return 2
        loaded.append((name, prompts[: cfg.eval.max_prompts] if cfg.eval.max_prompts else prompts, scorer))
    sampling = eval_sampling(cfg, tokenizer.eos_token_id)
    from pipeline.runtime.run_security import secure_run

    a = cfg.algorithm  # the runners start worker threads: made last, closed in the finally below
    work = [
        (name, prompts, RewardRunner(cfg.eval.reward_fn or scorer or a.reward_fn, a.reward_timeout_s, a.reward_workers))
        for name, prompts, scorer in loaded
    ]
    try:
        with secure_run(cfg):  # a random API key for the engines launched here, a private staging root
            results = asyncio.run(
                _eval_on_engines(cfg, model_dir, run_dir, work, tokenizer, sampling, engine_api_key(cfg))
            )
    finally:
        for _, _, runner in work:
            runner.close()  # its worker threads (an in-process `dapo eval` left them running)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    table = eval_table(results)
    (run_dir / "eval.md").write_text(table + "\n")
    for name, metrics in results.items():
        print(json.dumps({"set": name, **{k: v for k, v in metrics.items() if k != "per_prompt"}}))
    print(table)
    return 0


def engine_client(cfg: Any, urls: list[str]) -> Any:
    """The HTTP client of the engine API (`pipeline.contracts.engine_api.GenerateClient`) for `urls`."""
    from pipeline.config import engine_api_key
    from pipeline.runtime import wiring

    e = cfg.engine
    return wiring.engine_client(
        urls, api_key=engine_api_key(cfg), timeout_s=e.request_timeout_s, max_retries=e.max_retries
    )


async def _eval_on_engines(cfg, model_dir, run_dir, work, tokenizer, sampling, api_key) -> dict[str, Any]:
    from pipeline.runtime import wiring
    from pipeline.runtime.weight_sync.colocated import engine_args

    procs = []
    try:
        if cfg.engine.backend == "external":
            urls = list(cfg.engine.urls)
        else:
            for i in range(cfg.engine.num_engines):
                port = cfg.engine.base_port + i if cfg.engine.base_port else wiring.free_port(cfg.engine.host)
                log = run_dir / f"eval_engine{i}.log"  # engine_args: the private weight root (run_security.py)
                procs.append(wiring.launch_engine(cfg.engine, model_dir, port, log, engine_args(cfg)))
            urls = [p.url for p in procs]
        e = cfg.engine
        client = wiring.engine_client(urls, api_key=api_key, timeout_s=e.request_timeout_s, max_retries=e.max_retries)
        try:
            concurrency = e.max_running_requests * len(urls)
            k = cfg.eval.n_samples
            return {
                name: await evaluate(client, prompts, tokenizer, runner, k, sampling, concurrency)
                for name, prompts, runner in work
            }
        finally:
            await client.close()
    finally:
        for p in procs:
            p.stop()
