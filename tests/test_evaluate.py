"""Evaluation: avg@k / pass@k arithmetic, the engine-client path with fakes, HF generate, and `dapo eval`."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from engines.client import GenerateOutput
from pipeline.config import ModelConfig, TinyModelConfig, load_config
from pipeline.contracts.records import Prompt
from pipeline.flow.tasks import answer_matches
from pipeline.modeling import build_tiny_model
from pipeline.runtime.evaluate import (
    EVAL_SETS,
    PromptResult,
    data_dir,
    eval_main,
    eval_sampling,
    evaluate,
    evaluate_hf,
    generate_hf,
    resolve_eval_set,
    summarize,
)
from pipeline.tokenizer import build_char_tokenizer

TINY_CPU = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")


def test_summarize_hand_computed():
    results = [
        PromptResult("a", "1", accs=[True, False], rewards=[1.0, -1.0], lengths=[4, 6], truncated=[False, True]),
        PromptResult("b", "2", accs=[False, False], rewards=[-1.0, -1.0], lengths=[2, 4], truncated=[False, False]),
        PromptResult("c", "3", accs=[True, True], rewards=[1.0, 1.0], lengths=[3, 5], truncated=[False, False]),
    ]
    m = summarize(results)
    assert m["acc"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert m["pass"] == pytest.approx(2 / 3)
    assert m["reward"] == pytest.approx(0.0)
    assert m["response_len"] == pytest.approx(24 / 6)
    assert m["truncated"] == pytest.approx(1 / 6)
    assert (m["n_prompts"], m["k"], len(m["per_prompt"])) == (3, 2, 3)


class FakeClient:
    """Answers prompt i's j-th request with a canned response; records concurrency and request ids."""

    def __init__(self, tok, responses: dict[str, list[str]]):
        self.tok, self.responses = tok, responses
        self.in_flight = self.max_in_flight = 0
        self.rids: list[str] = []
        self.sampling: list[dict] = []

    async def generate(self, input_ids, sampling_params, rid=None, return_logprob=True):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        self.rids.append(rid)
        self.sampling.append(sampling_params)
        text = self.tok.decode(input_ids)
        n = sum(r.startswith(f"eval-{text}-") for r in self.rids) - 1
        out = self.tok.encode(self.responses[text][n]) + [self.tok.eos_token_id]
        limit = sampling_params["max_new_tokens"]
        finish = "length" if len(out) > limit else "stop"
        out = out[:limit]
        return GenerateOutput(out, [0.0] * len(out), finish, "0", "http://fake", len(input_ids))


class SyncRunner:
    def score(self, response, answer):
        ok = answer_matches(response, answer)
        return {"score": 1.0 if ok else -1.0, "acc": ok}


class AsyncRunner:
    async def score_async(self, response, answer):
        return SyncRunner().score(response, answer)


@pytest.mark.parametrize("runner", [SyncRunner(), AsyncRunner()], ids=["sync", "async"])
def test_evaluate_through_client(runner):
    tok = build_char_tokenizer()
    prompts = [Prompt(prompt_id=pid, prompt_ids=tok.encode(pid), answer=ans) for pid, ans in (("p", "7"), ("q", "3"))]
    responses = {"p": ["Answer: 7", "Answer: 8", "Answer: 7"], "q": ["Answer: 4", "no answer at all, rambling"]}
    responses["q"].append("Answer: 5")
    client = FakeClient(tok, responses)
    sampling = {"max_new_tokens": 20, "temperature": 1.0}
    m = asyncio.run(evaluate(client, prompts, tok, runner, k=3, sampling=sampling, max_concurrency=2))
    # p: 2 of 3 right; q: none right -> avg@3 = (2/3 + 0) / 2, pass@3 = 1/2.
    assert m["acc"] == pytest.approx(1 / 3) and m["pass"] == pytest.approx(0.5)
    assert m["reward"] == pytest.approx((1 - 1 + 1 - 1 - 1 - 1) / 6)
    assert m["truncated"] == pytest.approx(1 / 6)  # the 26-character rambling hit max_new_tokens=20
    assert m["response_len"] == pytest.approx((10 + 10 + 10 + 10 + 20 + 10) / 6)  # 9 chars + eos, or 20 cut
    assert client.max_in_flight == 2
    assert sorted(client.rids) == [f"eval-{p}-{j}" for p in "pq" for j in range(3)]
    assert all(s == sampling for s in client.sampling)
    assert [r["prompt_id"] for r in m["per_prompt"]] == ["p", "q"]
    assert m["per_prompt"][0]["responses"] == ["Answer: 7"]  # decoded without the eos


class AbortingClient:
    """Aborts every request after `chunk` new tokens until `aborts` aborts were given; records what it was sent."""

    def __init__(self, tok, response: str, chunk: int, aborts: int):
        self.tok, self.chunk, self.aborts = tok, chunk, aborts
        self.full = tok.encode(response) + [tok.eos_token_id]
        self.calls: list[tuple[list[int], int, str]] = []

    async def generate(self, input_ids, sampling_params, rid=None, return_logprob=True):
        self.calls.append((list(input_ids), sampling_params["max_new_tokens"], rid))
        done = len(input_ids) - 1  # the prompt is one token long
        rest = self.full[done:][: sampling_params["max_new_tokens"]]
        if self.aborts > 0 and len(rest) > self.chunk:
            self.aborts -= 1
            return GenerateOutput(rest[: self.chunk], [0.0] * self.chunk, "abort", "0", "http://fake", len(input_ids))
        return GenerateOutput(rest, [0.0] * len(rest), "stop", "0", "http://fake", len(input_ids))


def test_evaluate_resumes_requests_aborted_by_a_weight_update():
    tok = build_char_tokenizer()
    prompt = Prompt(prompt_id="p", prompt_ids=tok.encode("p"), answer="12")
    client = AbortingClient(tok, "5+7=12\nAnswer: 12", chunk=4, aborts=2)
    m = asyncio.run(evaluate(client, [prompt], tok, SyncRunner(), k=1, sampling={"max_new_tokens": 30}))
    # Without resumption the aborted 4-token prefix "5+7=" would be scored (wrong, 4 tokens long).
    assert m["acc"] == 1.0 and m["response_len"] == len(client.full) == 18  # 17 characters + eos
    assert m["per_prompt"][0]["responses"] == ["5+7=12\nAnswer: 12"]
    p_ids = tok.encode("p")
    assert (
        client.calls
        == [
            (p_ids, 30, "eval-p-0"),
            (p_ids + client.full[:4], 26, "eval-p-0-r1"),  # prompt + prefix, for the remaining budget
            (p_ids + client.full[:8], 22, "eval-p-0-r2"),
        ]
    )


def test_generate_hf_left_padding_matches_one_by_one():
    tok = build_char_tokenizer()
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64), init_seed=3)
    model = build_tiny_model(cfg, len(tok))
    prompts = [tok.encode(s) for s in ("Compute 1+2.", "Hi", "A longer prompt here")]
    batched = generate_hf(model, prompts, eos_id=1, pad_id=0, max_new_tokens=8)
    for p, out in zip(prompts, batched, strict=True):
        ids = torch.tensor([p])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             eos_token_id=1, pad_token_id=0)[0, len(p):].tolist()  # fmt: skip
        assert out == (ref[: ref.index(1) + 1] if 1 in ref else ref)


def test_evaluate_hf_sampling_is_seeded():
    tok = build_char_tokenizer()
    model = build_tiny_model(ModelConfig(tiny=TinyModelConfig(hidden_size=32, intermediate_size=64)), len(tok))
    prompts = [Prompt(prompt_id=str(i), prompt_ids=tok.encode(f"Compute {i}+1."), answer=str(i + 1)) for i in range(3)]
    a = evaluate_hf(model, tok, prompts, answer_matches, k=2, temperature=1.0, max_new_tokens=6, seed=4)
    b = evaluate_hf(model, tok, prompts, answer_matches, k=2, temperature=1.0, max_new_tokens=6, seed=4)
    c = evaluate_hf(model, tok, prompts, answer_matches, k=2, temperature=1.0, max_new_tokens=6, seed=5)
    assert a == b and a["per_prompt"] != c["per_prompt"]
    assert a["k"] == 2 and all(len(r["accs"]) == 2 for r in a["per_prompt"])
    assert a["acc"] == 0.0  # a random model does not write "Answer: n"


def test_eval_sampling_from_config():
    cfg = load_config(TINY_CPU, ["eval.temperature=0.6", "rollout.top_p=0.9", "rollout.max_new_tokens=32"])
    assert eval_sampling(cfg, eos_id=1) == {
        "max_new_tokens": 32, "temperature": 0.6, "top_p": 0.9, "top_k": -1, "stop_token_ids": [1],
    }  # fmt: skip


def test_eval_main_on_a_local_engine(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DAPO_CACHE_DIR", str(tmp_path / "cache"))
    a, b = "synthetic:arith?split=test&n=6", "synthetic:arith?split=test&n=4&ops=1"
    cfg = load_config(TINY_CPU, [
        f"data.eval_path={a}, {b}", "eval.n_samples=2", "rollout.max_new_tokens=12",
        f"logging.dir={tmp_path}", "logging.run_name=ev", "engine.startup_timeout_s=120",
        "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.warm_start_steps=0",
    ])  # fmt: skip
    before = {t.ident for t in threading.enumerate()}
    assert eval_main(cfg) == 0
    # the reward runners' worker threads end with the command (an in-process `dapo eval` left 4 of them running)
    deadline = time.monotonic() + 5
    while [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("reward-")]:
        assert time.monotonic() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.05)
    out = capsys.readouterr().out.strip().splitlines()
    lines = [json.loads(x) for x in out if x.startswith("{")]
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert [x["set"] for x in lines] == list(saved) == [a, b]
    assert [(x["n_prompts"], x["k"]) for x in lines] == [(6, 2), (4, 2)]
    assert all(x["acc"] == 0.0 for x in lines)  # an untrained model
    assert all(len(r["lengths"]) == 2 and max(r["lengths"]) <= 12 for r in saved[a]["per_prompt"])
    table = (tmp_path / "ev" / "eval.md").read_text().splitlines()
    assert table[2] == f"| {a} | 6 | 2 | 0.000 | 0.000 | {saved[a]['response_len']:.1f} | {saved[a]['truncated']:.3f} |"
    assert out[-len(table) :] == table
    assert (tmp_path / "ev" / "init_model" / "config.json").is_file()


def test_named_eval_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPO_DATA_DIR", str(tmp_path))
    (tmp_path / "math500_test.jsonl").write_text("")
    name, source, scorer = resolve_eval_set("bench:math500?template=chat")
    assert name == "math500" and scorer == "pipeline.flow.rewards:math_verify_reward"
    assert source == f"{tmp_path}/math500_test.jsonl?prompt_key=problem&id_key=unique_id&template=dapo&template=chat"
    assert resolve_eval_set("x.jsonl") == ("x.jsonl", "x.jsonl", None)
    with pytest.raises(ValueError, match=r"unknown eval set 'bench:nope'; known: bench:aime24, bench:aime24-30"):
        resolve_eval_set("bench:nope")
    with pytest.raises(ValueError, match=r"bench:gsm8k: .*gsm8k_test.jsonl not found \(set DAPO_DATA_DIR"):
        resolve_eval_set("bench:gsm8k")


@pytest.mark.skipif(not (data_dir() / "gsm8k_test.jsonl").is_file(), reason="../shared/data not present")
def test_named_sets_load_from_the_shared_data():
    from pipeline.config import DataConfig
    from pipeline.flow.data import load_prompts

    tok = build_char_tokenizer()
    sizes = {}
    for name in EVAL_SETS:
        _, source, _ = resolve_eval_set(f"bench:{name}")
        sizes[name] = len(load_prompts(DataConfig(max_prompt_tokens=100_000), tok, path=source))
    assert sizes == {"aime24": 960, "aime24-30": 30, "math500": 500, "gsm8k": 1319}
