"""Synthetic reasoning tasks with verifiable answers, generated on the fly from a seed (no files, no downloads).

Contract:
- A source `synthetic:<task>[?key=value&...]` names a registered task and its parameters;
  `synthetic_rows(spec, n, seed)` returns `n` rows `{id, prompt, answer, solution}`, the same for the same
  (spec, n, seed). `prompt` is the raw problem, `answer` the reference answer as a string, `solution` a short
  worked response ending in DAPO's answer line `Answer: <answer>` (the supervised warm start trains on it).
- Parameters common to every task: `split` (`train` | `test`; a problem belongs to exactly one split, decided
  by a hash of its text, so train and test sets never share a problem whatever the seeds) and `n` (row count,
  overriding the caller's default).
- `arith` (the default task of the tiny CPU run): a chain of `ops` additions/subtractions of numbers with
  `digits` digits, evaluated left to right, e.g. `Compute 8+5-4+2.` with solution
  `8+5=13\\n13-4=9\\n9+2=11\\nAnswer: 11`. Parameters: `digits` (1..6, default 1), `ops` (1..4, default 3),
  `opset` (characters from `+-`, default `+-`; `-` never takes the running value below 0), `slip` (0..1, default 0:
  the probability that each worked step of the reference *solution* writes a result off by one, the chain then
  continuing from the wrong value; `answer` stays the true result). `slip` models a noisy demonstrator: a warm start
  on such solutions imitates its slips, and RL with the verifiable reward has to unlearn them. The defaults are tuned
  so that the tiny model after its short warm start solves ~35-50% of held-out problems at temperature 1: each
  step is easy, errors compound over the steps. Solutions are at most 33 characters (34 tokens with eos) for the
  defaults; in general under ops*(3*digits+6)+digits+9.
- `answer_matches(response, answer)` is the task's own exact checker (the last `Answer:` line must equal the
  reference); training scores with the configured reward function, this is for tests and diagnostics.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

SPLITS = ("train", "test")
_TEST_SHARE = 10  # one problem in this many belongs to the test split


class TaskError(ValueError):
    """A bad `synthetic:` source; the message names the source and the parameter."""


@dataclass(frozen=True)
class ArithTask:
    digits: int = 1
    ops: int = 3
    opset: str = "+-"
    slip: float = 0.0

    def check(self, source: str) -> None:
        if not 1 <= self.digits <= 6:
            raise TaskError(f"{source}: digits must be in 1..6; got {self.digits}")
        if not 1 <= self.ops <= 4:
            raise TaskError(f"{source}: ops must be in 1..4; got {self.ops}")
        if not self.opset or set(self.opset) - set("+-"):
            raise TaskError(f"{source}: opset must be made of '+' and '-'; got {self.opset!r}")
        if not 0.0 <= self.slip <= 1.0:
            raise TaskError(f"{source}: slip must be in [0, 1]; got {self.slip}")

    def _number(self, rng: random.Random, upper: int | None = None) -> int:
        low = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        high = 10**self.digits - 1
        if upper is not None:
            high = min(high, upper)
        return rng.randint(low, max(low, high))

    def sample(self, rng: random.Random, slip_rng: random.Random | None = None) -> dict[str, str]:
        """One problem: prompt, answer and the step-by-step solution (with slips drawn from `slip_rng`)."""
        value = self._number(rng)
        expr, steps, written = str(value), [], value
        for _ in range(self.ops):
            op = rng.choice(self.opset)
            if op == "-" and value < (0 if self.digits == 1 else 10 ** (self.digits - 1)):
                op = "+"  # nothing of `digits` digits can be subtracted without going below 0
            b = self._number(rng, upper=value if op == "-" else None)
            new = value + b if op == "+" else value - b
            # The solution follows its own (possibly slipped) running value `written`; the problem does not.
            result = written + b if op == "+" else written - b
            if slip_rng is not None and self.slip > 0 and slip_rng.random() < self.slip:
                result += 1 if result == 0 or slip_rng.random() < 0.5 else -1
            steps.append(f"{written}{op}{b}={result}")
            expr += f"{op}{b}"
            value, written = new, result
        solution = "\n".join(steps) + f"\nAnswer: {written}"
        return {"prompt": f"Compute {expr}.", "answer": str(value), "solution": solution}


TASKS: dict[str, Callable[..., ArithTask]] = {"arith": ArithTask}


def split_of(problem: str) -> str:
    """`test` for a fixed ~1/10 of all problems (by hash of the text), `train` for the rest."""
    h = int.from_bytes(hashlib.blake2b(problem.encode(), digest_size=8).digest(), "big")
    return "test" if h % _TEST_SHARE == 0 else "train"


def parse_query(source: str, query: str) -> dict[str, str]:
    """`a=1&b=x` -> {"a": "1", "b": "x"}; `+` stays a plus (unlike form encoding), `%XX` escapes are decoded."""
    params: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise TaskError(f"{source}: malformed parameter {part!r}; expected key=value")
        params[unquote(key)] = unquote(value)
    return params


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`synthetic:arith?digits=3&ops=1` -> ("arith", {"digits": "3", "ops": "1"})."""
    if not spec.startswith("synthetic:"):
        raise TaskError(f"{spec}: a synthetic source starts with 'synthetic:'")
    name, _, query = spec[len("synthetic:") :].partition("?")
    params = parse_query(spec, query)
    if name not in TASKS:
        raise TaskError(f"{spec}: unknown synthetic task {name!r}; known: {', '.join(sorted(TASKS))}")
    return name, params


def _coerce(spec: str, key: str, value: str, default: object) -> object:
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise TaskError(f"{spec}: parameter {key} must be a number; got {value!r}") from None
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise TaskError(f"{spec}: parameter {key} must be an integer; got {value!r}") from None
    return value


def make_task(spec: str) -> tuple[ArithTask, str, int | None]:
    """The task object, its split and the explicit row count (`n`, or None) of a `synthetic:` source."""
    name, params = parse_spec(spec)
    split = params.pop("split", "train")
    if split not in SPLITS:
        raise TaskError(f"{spec}: split must be one of {', '.join(SPLITS)}; got {split!r}")
    n = int(_coerce(spec, "n", params.pop("n"), 0)) if "n" in params else None
    factory = TASKS[name]
    defaults = factory()
    kwargs = {}
    for key, value in params.items():
        if not hasattr(defaults, key):
            raise TaskError(f"{spec}: unknown parameter {key!r} for task {name!r}")
        kwargs[key] = _coerce(spec, key, value, getattr(defaults, key))
    task = factory(**kwargs)
    task.check(spec)
    return task, split, n


def synthetic_rows(spec: str, n: int, seed: int) -> list[dict[str, str]]:
    """`n` rows (or the spec's own `n`) of the task's split; deterministic in (spec, n, seed)."""
    task, split, n_spec = make_task(spec)
    n = n_spec if n_spec is not None else n
    if n < 1:
        raise TaskError(f"{spec}: needs at least one row; got n={n}")
    # A string seed is hashed with SHA-512 by `random`, so the stream is stable across processes and versions.
    # The problem stream is keyed by the problem-shaping fields only (this string predates `slip`; keep it stable).
    shape = f"ArithTask(digits={task.digits}, ops={task.ops}, opset={task.opset!r})"
    rng = random.Random(f"{shape}|{split}|{seed}")
    # Slips come from their own stream: the problems of a source are the same whatever its `slip`.
    slip_rng = random.Random(f"slip|{split}|{seed}")
    rows, tries = [], 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise TaskError(f"{spec}: the {split} split of this task is too small for {n} rows")
        row = task.sample(rng, slip_rng)
        if split_of(row["prompt"]) == split:
            rows.append({"id": f"{split}-{seed}-{len(rows)}", **row})
    return rows


_ANSWER_RE = re.compile(r"Answer\s*:\s*([^\n]*)")


def extract_answer(response: str) -> str | None:
    """The text after the last `Answer:` (stripped, trailing period dropped), or None."""
    found = _ANSWER_RE.findall(response)
    if not found:
        return None
    return found[-1].strip().rstrip(".").strip()


def answer_matches(response: str, answer: str) -> bool:
    """Exact check of the task's answer line."""
    return extract_answer(response) == str(answer).strip()
