"""DAPO math scorer on tricky answers, the Math-Verify scorer, and the RewardRunner's failure handling."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pipeline.flow.rewards import (
    RewardResult,
    RewardRunner,
    dapo_math_reward,
    math_verify_reward,
    normalize_final_answer,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "response,answer,acc,pred",
    [
        ("So we get 34.\nAnswer: 34", "34", True, "34"),
        ("Answer: 34.", "34", True, "34"),  # our choice: a sentence-final period is dropped
        ("Answer: 034", "34", False, "034"),  # as in DAPO's verifier: string compare, leading zero matters
        ("Answer: \\frac{1}{2}", "0.5", False, "\\frac{1}{2}"),  # string scorer: no numeric equivalence
        ("Answer: \\boxed{34}", "34", True, "34"),
        ("Answer: x = 34", "34", True, "34"),
        ("Answer: 1,000", "1000", True, "1000"),
        ("Answer: 1000", "1,000", True, "1000"),
        ("Answer: 12\nthen I rechecked.\nAnswer: 34", "34", True, "34"),  # the last Answer: wins
        ("Answer: 34\nAnswer: 12", "34", False, "12"),
        ("", "34", False, ""),
        ("no final line at all, 34", "34", False, ""),
        ("answer:  $34$ meters<|im_end|>", "34", True, "34"),  # case, $, units, chat end token
        ("ANSWER: 90^\\circ</s>", "90", True, "90"),
        ("Answer: \\text{(B)}", "(B)", True, "(B)"),
        ("Answer: $\\frac12$", "\\frac{1}{2}", True, "\\frac{1}{2}"),
        ("Answer:", "34", False, ""),
        ("Answer: $ $", "", False, ""),  # empty after normalisation is never right
    ],
)
def test_dapo_math_reward(response, answer, acc, pred):
    out = dapo_math_reward(response, answer)
    assert out == {"score": 1.0 if acc else -1.0, "acc": acc, "pred": pred}


def test_dapo_only_reads_the_last_300_characters():
    assert dapo_math_reward("Answer: 34\n" + "x" * 300, "34")["acc"] is False
    assert dapo_math_reward("x" * 5000 + "\nAnswer: 34", "34")["acc"] is True


def test_normalize_final_answer():
    assert normalize_final_answer("\\text{5 inches}") == "5"
    assert normalize_final_answer("y = \\sqrt2") == "\\sqrt{2}"
    assert normalize_final_answer("12,345,678") == "12345678"
    assert normalize_final_answer("1,2") == "12"  # digits-and-commas only, as in the reference
    assert normalize_final_answer("(1, 2)") == "(1,2)"


@pytest.mark.parametrize(
    "response,answer,acc",
    [
        ("Answer: \\frac{1}{2}", "0.5", True),
        ("Answer: 034", "34", True),
        ("The sum is \\boxed{1000}.", "1,000", True),
        ("Answer: x = 34", "34", True),
        ("Answer: 35", "34", False),
        ("", "34", False),
        ("Answer: 12\nAnswer: 34<|im_end|>", "34", True),
    ],
)
def test_math_verify_reward(response, answer, acc):
    out = math_verify_reward(response, answer)
    assert out["acc"] is acc and out["score"] == (1.0 if acc else -1.0)


def test_math_verify_works_off_the_main_thread():
    # math_verify's own signal-based timeouts would raise ValueError in a worker thread.
    out: list[dict] = []
    t = threading.Thread(target=lambda: out.append(math_verify_reward("Answer: 1/2", "\\frac{1}{2}")))
    t.start()
    t.join(60)
    assert out and out[0]["acc"] is True


# --------------------------------------------------------------------------------------------------- runner
RELEASE = threading.Event()


def float_fn(response: str, answer: str) -> float:
    return 0.5 if response == answer else -0.25


def dict_fn(response: str, answer: str) -> dict:
    return {"score": 2.0} if response == "a" else {"score": 1.0, "acc": False}


def raising_fn(response: str, answer: str) -> float:
    return 1 / 0


def bad_fn(response: str, answer: str):
    return {"nan": 1.0} if response == "a" else float("nan")


def hanging_fn(response: str, answer: str) -> float:
    if response == "hang":
        RELEASE.wait(30)
    return 1.0


def test_runner_loads_and_converts():
    r = RewardRunner("tests.test_rewards:float_fn", timeout_s=5, workers=2)
    assert r.score("x", "x") == RewardResult(0.5, True, "")
    assert r.score("x", "y") == RewardResult(-0.25, False, "")
    d = RewardRunner("tests.test_rewards:dict_fn", timeout_s=5, workers=1)
    assert d.score("a", "") == RewardResult(2.0, True, "")  # acc defaults to score > 0
    assert d.score("b", "") == RewardResult(1.0, False, "")  # an explicit acc wins
    assert r.metrics() == {"reward/calls": 2.0, "reward/failed": 0.0, "reward/hung_threads": 0.0}
    default = RewardRunner("pipeline.flow.rewards:dapo_math_reward", timeout_s=5, workers=1)
    assert default.score("Answer: 7", "7") == RewardResult(1.0, True, "")


@pytest.mark.parametrize(
    "path,match",
    [("nope_module_xyz:f", "cannot import"), ("tests.test_rewards:missing", "no function"), ("no_colon", "module:")],
)
def test_runner_bad_path_names_the_key(path, match):
    with pytest.raises(ValueError, match=f"algorithm.reward_fn: .*{match}"):
        RewardRunner(path, timeout_s=1, workers=1)


def test_runner_failures_are_wrong_answers_and_counted():
    r = RewardRunner("tests.test_rewards:raising_fn", timeout_s=5, workers=1)
    assert r.score("a", "b") == RewardResult(-1.0, False, "ZeroDivisionError")
    b = RewardRunner("tests.test_rewards:bad_fn", timeout_s=5, workers=1)
    assert b.score("a", "") == RewardResult(-1.0, False, "bad_return")  # dict without "score"
    assert b.score("b", "") == RewardResult(-1.0, False, "bad_return")  # NaN
    assert b.metrics()["reward/failed_bad_return"] == 2.0
    assert r.metrics() == {
        "reward/calls": 1.0,
        "reward/failed": 1.0,
        "reward/failed_ZeroDivisionError": 1.0,
        "reward/hung_threads": 0.0,
    }


def test_runner_timeout_abandons_the_hung_thread():
    RELEASE.clear()
    r = RewardRunner("tests.test_rewards:hanging_fn", timeout_s=0.2, workers=1)
    try:
        t0 = time.monotonic()
        assert r.score("hang", "") == RewardResult(-1.0, False, "timeout")
        assert time.monotonic() - t0 < 5
        # The single worker is stuck, yet the pool was refilled: the next call is served.
        assert r.score("ok", "") == RewardResult(1.0, True, "")
        assert r.metrics()["reward/failed_timeout"] == 1.0
        assert r.metrics()["reward/hung_threads"] == 1.0
    finally:
        RELEASE.set()
    deadline = time.monotonic() + 5
    while r.metrics()["reward/hung_threads"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.metrics()["reward/hung_threads"] == 0.0  # the released thread retired
    r.close()


def test_runner_async():
    RELEASE.clear()
    r = RewardRunner("tests.test_rewards:hanging_fn", timeout_s=0.2, workers=2)

    async def main():
        return await asyncio.gather(r.score_async("hang", ""), r.score_async("ok", ""), r.score_async("ok", ""))

    try:
        results = asyncio.run(main())
    finally:
        RELEASE.set()
    assert results == [RewardResult(-1.0, False, "timeout"), RewardResult(1.0, True, ""), RewardResult(1.0, True, "")]
    r.close()


def test_hung_reward_does_not_block_interpreter_exit(tmp_path):
    (tmp_path / "forever.py").write_text("import time\ndef fn(response, answer):\n    time.sleep(3600)\n")
    code = textwrap.dedent(
        """
        from pipeline.flow.rewards import RewardRunner
        r = RewardRunner("forever:fn", timeout_s=0.1, workers=1)
        print(r.score("a", "b").failed)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "timeout"
    assert time.monotonic() - t0 < 30
