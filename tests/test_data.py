"""Datasets: the shipped files load with the right counts and templates; bad rows are named; synthetic tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig
from pipeline.flow.data import DAPO_TEMPLATE, DataError, get_field, load_prompts, load_rows
from pipeline.flow.tasks import TaskError, answer_matches, extract_answer, split_of, synthetic_rows
from pipeline.tokenizer import build_char_tokenizer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data directory {DATA} is absent")


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def cfg(**kw) -> DataConfig:
    return DataConfig(train_path="unused", **{"max_prompt_tokens": 100_000, **kw})


# ------------------------------------------------------------------------------------------------ synthetic task
def _eval_left_to_right(expr: str) -> int:
    tokens = re.findall(r"\d+|[+-]", expr)
    value = int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2], strict=True):
        value = value + int(num) if op == "+" else value - int(num)
    return value


@pytest.mark.parametrize(
    "spec", ["synthetic:arith", "synthetic:arith?digits=2&ops=2", "synthetic:arith?digits=3&ops=1&opset=-"]
)
def test_synthetic_answers_are_correct(spec):
    rows = synthetic_rows(spec, 300, seed=3)
    assert len(rows) == 300
    for r in rows:
        expr = re.fullmatch(r"Compute ([0-9+-]+)\.", r["prompt"]).group(1)
        assert int(r["answer"]) == _eval_left_to_right(expr) >= 0
        lines = r["solution"].split("\n")
        assert lines[-1] == f"Answer: {r['answer']}"
        running = expr
        for line in lines[:-1]:  # every step is right and continues from the previous result
            lhs, rhs = line.split("=")
            assert _eval_left_to_right(lhs) == int(rhs)
        assert lines[0].split("=")[0] == re.match(r"\d+[+-]\d+", running).group(0)
        assert answer_matches(r["solution"], r["answer"])
    if "opset=-" in spec:
        assert all("+" not in r["prompt"] for r in rows)


def test_synthetic_default_shape():
    rows = synthetic_rows("synthetic:arith", 2000, seed=0)
    assert all(len(re.findall(r"[+-]", r["prompt"])) == 3 for r in rows)  # ops=3
    assert all(re.fullmatch(r"Compute \d[+-]\d[+-]\d[+-]\d\.", r["prompt"]) for r in rows)  # one digit each
    assert max(len(r["prompt"]) for r in rows) < 40
    assert max(len(r["solution"]) for r in rows) + 1 <= 34  # + eos: fits max_new_tokens >= 34


def test_synthetic_slips_change_solutions_only():
    clean = synthetic_rows("synthetic:arith", 2000, seed=4)
    noisy = synthetic_rows("synthetic:arith?slip=0.3", 2000, seed=4)
    assert [(r["prompt"], r["answer"]) for r in noisy] == [(r["prompt"], r["answer"]) for r in clean]
    steps = slipped = 0
    for r in noisy:
        lines = r["solution"].split("\n")
        written = None
        for line in lines[:-1]:
            lhs, rhs = line.split("=")
            a, op, b = re.fullmatch(r"(-?\d+)([+-])(\d+)", lhs).groups()  # a slip may take a step below 0
            assert written is None or int(a) == written  # each step continues from the written (maybe wrong) value
            off = int(rhs) - (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert off in (-1, 0, 1)
            steps, slipped, written = steps + 1, slipped + (off != 0), int(rhs)
        assert lines[-1] == f"Answer: {written}"  # the answer line follows the solution, not the truth
        assert answer_matches(r["solution"], r["answer"]) == (written == int(r["answer"]))
    assert steps == 6000 and 0.27 < slipped / steps < 0.33
    always = synthetic_rows("synthetic:arith?slip=1", 50, seed=4)
    assert not any(answer_matches(r["solution"], r["answer"]) for r in always)  # 3 slips of +-1 never sum to 0
    first_steps = [r["solution"].split("\n")[0].split("=") for r in always]
    assert all(_eval_left_to_right(lhs) != int(rhs) for lhs, rhs in first_steps)  # ... and every step is off
    with pytest.raises(TaskError, match=r"slip must be in \[0, 1\]; got 2.0"):
        synthetic_rows("synthetic:arith?slip=2", 1, 0)
    with pytest.raises(TaskError, match="parameter slip must be a number; got 'x'"):
        synthetic_rows("synthetic:arith?slip=x", 1, 0)


def test_synthetic_is_seeded_and_split():
    a = synthetic_rows("synthetic:arith", 50, seed=1)
    assert a == synthetic_rows("synthetic:arith", 50, seed=1)
    assert a != synthetic_rows("synthetic:arith", 50, seed=2)
    test = synthetic_rows("synthetic:arith?split=test&n=200", 10, seed=1)
    assert len(test) == 200  # n in the spec wins over the caller's size
    train = synthetic_rows("synthetic:arith", 2000, seed=1)
    assert {r["prompt"] for r in test}.isdisjoint(r["prompt"] for r in train)
    assert all(split_of(r["prompt"]) == "test" for r in test)


def test_synthetic_bad_specs():
    with pytest.raises(TaskError, match="unknown synthetic task 'nope'"):
        synthetic_rows("synthetic:nope", 1, 0)
    with pytest.raises(TaskError, match=r"synthetic:arith\?digits=9: digits must be in 1..6; got 9"):
        synthetic_rows("synthetic:arith?digits=9", 1, 0)
    with pytest.raises(TaskError, match="unknown parameter 'width'"):
        synthetic_rows("synthetic:arith?width=2", 1, 0)
    with pytest.raises(TaskError, match="parameter ops must be an integer; got 'x'"):
        synthetic_rows("synthetic:arith?ops=x", 1, 0)
    with pytest.raises(TaskError, match="split must be one of train, test"):
        synthetic_rows("synthetic:arith?split=dev", 1, 0)


def test_answer_extraction():
    assert extract_answer("3+4=7\nAnswer: 7") == "7"
    assert extract_answer("Answer: 3\nthen\nAnswer:  12. ") == "12"  # the last one, stripped, period dropped
    assert extract_answer("no answer line") is None
    assert answer_matches("x\nAnswer: 7", "7") and not answer_matches("Answer: 17", "7")


# ------------------------------------------------------------------------------------------------ fields, sources
def test_get_field_specs():
    row = {"a": {"b": [{"c": "x"}, {"c": "y"}]}, "sol": "steps\n#### 1,234 "}
    assert get_field(row, "a.b.1.c") == "y"
    assert get_field(row, "a.b.-1.c") == "y"
    assert get_field(row, "sol|after:####") == "1,234"
    for spec, missing in (("a.z", "z"), ("a.b.2.c", "2"), ("sol|after:@@", "|after:@@")):
        with pytest.raises(KeyError, match=re.escape(missing)):
            get_field(row, spec)


def test_synthetic_prompts(tok):
    prompts = load_prompts(cfg(template="none", max_prompt_tokens=64), tok, path="synthetic:arith?n=20", seed=5)
    rows = synthetic_rows("synthetic:arith?n=20", 0, seed=5)
    assert [p.prompt_id for p in prompts] == [str(i) for i in range(20)]
    assert [p.text for p in prompts] == [r["prompt"] for r in rows]
    assert [p.answer for p in prompts] == [r["answer"] for r in rows]
    assert prompts[0].prompt_ids == tok.encode(rows[0]["prompt"])
    dapo = load_prompts(cfg(template="dapo"), tok, path="synthetic:arith?n=2", seed=5)
    assert dapo[0].text == DAPO_TEMPLATE.format(problem=rows[0]["prompt"])


# ------------------------------------------------------------------------------------------------ shipped files
@needs_data
def test_dapo_en_dedup_jsonl(tmp_path, tok):
    path = str(DATA / "derived" / "dapo_math_17k_en_dedup.jsonl")
    prompts = load_prompts(cfg(id_key="id"), tok, path=path)
    assert len(prompts) == 14_038
    first = json.loads(open(path).readline())
    assert (prompts[0].prompt_id, prompts[0].answer, prompts[0].text) == (str(first["id"]), "34", first["prompt"])
    assert prompts[-1].prompt_ids == tok.encode(json.loads(open(path).readlines()[-1])["prompt"])
    # The dapo template around the raw problem reproduces every shipped (already templated) prompt exactly.
    rows = load_rows(path, cfg(), 0)
    assert all(DAPO_TEMPLATE.format(problem=r["problem"]) == r["prompt"] for r in rows)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(rows[i]) + "\n" for i in (0, 1, 777, 14_037)))
    templated = load_prompts(cfg(prompt_key="problem", template="dapo"), tok, path=f"{few}?id_key=id")
    assert [p.text for p in templated] == [rows[i]["prompt"] for i in (0, 1, 777, 14_037)]
    assert [p.prompt_id for p in templated] == ["0", "1", str(rows[777]["id"]), str(rows[14_037]["id"])]


@needs_data
def test_aime_2024_parquet(tok):
    path = str(DATA / "aime-2024.parquet")
    table = pq.read_table(path)
    assert {"prompt", "reward_model", "extra_info"} <= set(table.column_names)
    with pytest.raises(DataError, match=r"aime-2024.parquet: row 0: missing answer field 'answer' .*reward_model"):
        load_prompts(cfg(), tok, path=path)
    prompts = load_prompts(cfg(), tok, path=path + "?answer_key=reward_model.ground_truth")
    assert len(prompts) == 960 and len({p.text for p in prompts}) == 30  # 30 problems x 32 copies (avg@32)
    assert prompts[0].answer == "540"
    rows = table.slice(0, 3).to_pylist()
    for p, r in zip(prompts, rows, strict=False):  # its prompts are DAPO's template around the raw problem
        assert p.text == DAPO_TEMPLATE.format(problem=r["extra_info"]["raw_problem"]) == r["prompt"][0]["content"]
    chat = load_prompts(cfg(template="chat"), tok, path=path + "?answer_key=reward_model.ground_truth")
    assert chat[0].text == f"<|im_start|>user\n{prompts[0].text}<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(DataError, match=r"row 0: field 'prompt': template 'dapo' wraps a raw problem string"):
        load_prompts(cfg(template="dapo", answer_key="reward_model.ground_truth"), tok, path=path)


@needs_data
def test_small_eval_files(tok):
    aime = load_prompts(
        cfg(prompt_key="problem", id_key="id", template="dapo"), tok, path=str(DATA / "aime24_test.jsonl")
    )
    derived = load_prompts(cfg(id_key="id"), tok, path=str(DATA / "derived" / "aime24_dapo_prompt.jsonl"))
    assert len(aime) == 30 and aime[0].answer == "204" and aime[0].prompt_id == "60"
    assert [p.text for p in aime] == [p.text for p in derived]
    math500 = load_prompts(cfg(prompt_key="problem", id_key="unique_id"), tok, path=str(DATA / "math500_test.jsonl"))
    assert len(math500) == 500 and math500[0].prompt_id == "test/precalculus/807.json"
    assert math500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    gsm = load_prompts(
        cfg(prompt_key="question", answer_key="answer|after:####"), tok, path=str(DATA / "gsm8k_test.jsonl")
    )
    assert len(gsm) == 1319 and [p.answer for p in gsm[:3]] == ["18", "3", "70000"]
    assert all(p.answer.replace(",", "").lstrip("-").replace(".", "").isdigit() for p in gsm)


@needs_data
def test_raw_dapo_parquet_rows():
    rows = load_rows(str(DATA / "dapo_math_17k_dedup_raw.parquet"), cfg(), 0)
    assert len(rows) == 17_917 and get_field(rows[0], "reward_model.ground_truth") == "34"


# ------------------------------------------------------------------------------------------------ bad input
def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_bad_rows_name_file_row_and_field(tmp_path, tok):
    good = {"prompt": "1+1?", "answer": "2", "id": "a"}
    path = _jsonl(tmp_path / "d.jsonl", [good, {**good, "id": "b"}, {"prompt": "2+2?", "id": "c"}])
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(path)}: row 2: missing answer field 'answer' \(at 'answer'; row has: id, prompt\)",
    ):
        load_prompts(cfg(), tok, path=path)
    path = _jsonl(tmp_path / "e.jsonl", [good, {**good, "answer": "  "}])
    with pytest.raises(DataError, match=r"e.jsonl: row 1: empty answer field 'answer'"):
        load_prompts(cfg(), tok, path=path)
    path = _jsonl(tmp_path / "f.jsonl", [good, good])
    with pytest.raises(DataError, match=r"f.jsonl: row 1: duplicate id 'a' in field 'id' \(first in row 0\)"):
        load_prompts(cfg(id_key="id"), tok, path=path)
    assert [p.prompt_id for p in load_prompts(cfg(), tok, path=path)] == ["0", "1"]  # no id_key: the row index
    path = _jsonl(tmp_path / "g.jsonl", [good, {**good, "prompt": "x" * 65}])
    with pytest.raises(DataError, match=r"g.jsonl: row 1: prompt has 65 tokens > data.max_prompt_tokens = 64"):
        load_prompts(DataConfig(train_path=path, max_prompt_tokens=64), tok)
    path = _jsonl(tmp_path / "h.jsonl", [good, "", '{"prompt": "1+1?", "answer": 2,}'])
    with pytest.raises(DataError, match=r"h.jsonl: line 3: invalid JSON"):
        load_prompts(cfg(), tok, path=path)
    path = _jsonl(tmp_path / "i.jsonl", [{"prompt": 7, "answer": "7"}])
    with pytest.raises(DataError, match=r"i.jsonl: row 0: field 'prompt': prompt must be a string or a list"):
        load_prompts(cfg(), tok, path=path)
    path = _jsonl(tmp_path / "j.jsonl", [{"prompt": "1+1?", "answer": 2}])
    assert load_prompts(cfg(), tok, path=path)[0].answer == "2"  # numbers become strings


def test_bad_sources(tmp_path, tok):
    with pytest.raises(DataError, match=r"nowhere.jsonl: dataset file not found"):
        load_prompts(cfg(), tok, path=str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"d.csv: unsupported dataset format '.csv'"):
        load_prompts(cfg(), tok, path=str(tmp_path / "d.csv"))
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError, match=r"unknown source parameter 'shuffle'"):
        load_prompts(cfg(), tok, path=path + "?shuffle=1")
    with pytest.raises(DataError, match=r"template must be one of none, dapo, chat; got 'raw'"):
        load_prompts(cfg(), tok, path=path + "?template=raw")
    with pytest.raises(DataError, match=r"digits must be in 1..6"):
        load_prompts(cfg(), tok, path="synthetic:arith?digits=0")
    with pytest.raises(DataError, match=r"^data.train_path: no dataset given"):
        load_prompts(DataConfig(train_path=""), tok)


def test_hf_source_without_datasets(tok):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match=r"hf://org/name:test: the `datasets` package is not installed"):
            load_prompts(cfg(), tok, path="hf://org/name:test")
    else:
        pytest.skip("datasets is installed; the not-installed error cannot be observed")


def test_dedup_keeps_the_first_row_of_each_prompt(tmp_path, tok):
    rows = [
        {"prompt": "Compute 1+1.", "answer": "2"},
        {"prompt": "Compute 2+2.", "answer": "4"},
        {"prompt": "Compute 1+1.", "answer": "2"},  # repeated, as the hub's DAPO-Math-17k repeats its problems
        {"prompt": "Compute 3+3.", "answer": "6"},
    ]
    path = tmp_path / "rep.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    everything = load_prompts(DataConfig(train_path=str(path)), tok)
    assert [p.prompt_id for p in everything] == ["0", "1", "2", "3"]
    once = load_prompts(DataConfig(train_path=f"{path}?dedup=true"), tok)
    assert [(p.prompt_id, p.answer) for p in once] == [("0", "2"), ("1", "4"), ("3", "6")]  # original row ids
    with pytest.raises(DataError, match="dedup must be true or false"):
        load_prompts(DataConfig(train_path=f"{path}?dedup=maybe"), tok)
