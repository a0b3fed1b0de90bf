"""Datasets: read rows from files, a hub or a synthetic task; template and tokenise them into `Prompt`s.

Contract:
- A source is a `.jsonl` / `.parquet` path, `hf://org/name/path/file.parquet` (one file of a Hugging Face dataset
  repository), `hf://org/name[:split]` (needs the `datasets` package and a reachable hub; imported only when such a
  source is used), or `synthetic:<task>[?params]` (pipeline/flow/tasks.py).
- A hub file is first looked for in the data directory ($DAPO_DATA_DIR, default ../shared/data next to the
  repository) under its file name (or, for a named set, its local names: NAMED_SETS), then in the Hugging Face
  cache, then downloaded (huggingface_hub; HF_ENDPOINT is honoured). Without network it fails with a DataError
  naming the dataset, the URL and the offline way (download it elsewhere and set DAPO_DATA_DIR, or a local path).
  `dapo data` (pipeline/tools/datasets.py) lists the named sets, where each comes from and whether it is present.
- A file or hub source may end in `?key=value&...` to override, for that source only, the DataConfig fields
  `prompt_key`, `answer_key`, `id_key`, `template` (so a train and an eval set of different formats share one
  config), e.g. `aime-2024.parquet?answer_key=reward_model.ground_truth&template=chat`.
- A field spec addresses nested values with dots (`reward_model.ground_truth`, `prompt.0.content`) and may end
  in one transform: `|after:SEP` keeps the text after the last SEP, stripped (GSM8K: `answer|after:####`).
- Templates: `none` uses the prompt field as is (a one-message chat list gives its content); `dapo` wraps the raw
  problem in DAPO's template (DAPO_TEMPLATE, byte-identical to DAPO's own eval prompts); `chat` applies the
  tokenizer's chat template with the generation prompt (a plain string becomes one user message).
- `load_prompts` returns one `Prompt` per row, in source order, with `prompt_id` = the `id_key` field (or the row
  index) as a string. Any bad row raises `DataError` naming the source, the row index and the field: a missing
  or empty prompt/answer, a prompt of the wrong type, a duplicate id, a prompt longer than `max_prompt_tokens`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import DataConfig
from pipeline.contracts.records import Prompt
from pipeline.flow.tasks import TaskError, parse_query, synthetic_rows
from pipeline.tokenizer import encode_texts

DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{problem}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)
SOURCE_OVERRIDES = ("prompt_key", "answer_key", "id_key", "template", "dedup")
TEMPLATES = ("none", "dapo", "chat")


class DataError(ValueError):
    """A dataset problem; the message names the source, and the row and field when there is one."""


# ------------------------------------------------------------------------------------------------ sources
def split_source(path: str) -> tuple[str, dict[str, str]]:
    """`file.jsonl?template=dapo` -> ("file.jsonl", {"template": "dapo"}); synthetic sources stay whole."""
    if path.startswith("synthetic:") or "?" not in path:
        return path, {}
    base, _, query = path.partition("?")
    try:
        params = parse_query(path, query)
    except TaskError as e:
        raise DataError(str(e)) from None
    unknown = sorted(set(params) - set(SOURCE_OVERRIDES))
    if unknown:
        raise DataError(f"{path}: unknown source parameter {unknown[0]!r}; allowed: {', '.join(SOURCE_OVERRIDES)}")
    return base, params


def source_config(path: str, cfg: DataConfig) -> tuple[str, DataConfig]:
    """The bare source and `cfg` with that source's overrides applied."""
    base, params = split_source(path)
    if "dedup" in params:
        flag = params["dedup"].lower()
        if flag not in ("true", "false", "1", "0"):
            raise DataError(f"{path}: dedup must be true or false; got {params['dedup']!r}")
        params = {**params, "dedup": flag in ("true", "1")}
    if params.get("template", cfg.template) not in TEMPLATES:
        raise DataError(f"{path}: template must be one of {', '.join(TEMPLATES)}; got {params.get('template')!r}")
    return base, dataclasses.replace(cfg, **params)


def load_rows(path: str, cfg: DataConfig, seed: int, size: int | None = None) -> list[dict]:
    """Raw rows of a source (query overrides are ignored here). `size` overrides `cfg.synthetic_size`."""
    base, _ = split_source(path)
    if base.startswith("synthetic:"):
        try:
            return synthetic_rows(base, size or cfg.synthetic_size, seed)
        except TaskError as e:
            raise DataError(str(e)) from None
    if base.startswith("hf://") and hub_file(base) is None:
        return _load_hf(base)
    p = resolve_hub_file(base) if base.startswith("hf://") else Path(base)
    if not p.is_file():
        raise DataError(f"{base}: dataset file not found")
    if p.suffix == ".jsonl":
        return _load_jsonl(p)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    raise DataError(f"{base}: unsupported dataset format {p.suffix!r}; use .jsonl, .parquet, hf:// or synthetic:")


def _load_jsonl(p: Path) -> list[dict]:
    rows = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # named here: a bare UnicodeDecodeError says neither file nor line
                raise DataError(f"{p}: line {lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}: line {lineno}: a row must be a JSON object; got {type(row).__name__}")
            rows.append(row)
    return rows


def _load_hf(source: str) -> list[dict]:
    name, _, split = source[len("hf://") :].partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source}: the `datasets` package is not installed (pip install datasets), and a hub must be reachable; "
            "or download the data and point the path at a .jsonl/.parquet file"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - any hub/offline failure, re-raised with the source named
        raise DataError(f"{source}: cannot load from the hub: {type(e).__name__}: {e}") from e
    return [dict(r) for r in ds]


# ------------------------------------------------------------------------------------------------ named sets, hub files
@dataclasses.dataclass(frozen=True)
class NamedSet:
    source: str  # hf://org/name/path/file
    local_names: tuple[str, ...]  # file names accepted in the data directory, first = the hub file's own
    about: str


NAMED_SETS: dict[str, NamedSet] = {
    "dapo-math-17k": NamedSet(
        "hf://BytedTsinghua-SIA/DAPO-Math-17k/data/dapo-math-17k.parquet",
        ("dapo-math-17k.parquet", "dapo_math_17k_dedup_raw.parquet"),
        "DAPO's training set (the recipe's file; the shipped dedup_raw copy has each problem once)",
    ),
    "aime-2024": NamedSet(
        "hf://BytedTsinghua-SIA/AIME-2024/data/aime-2024.parquet",
        ("aime-2024.parquet",),
        "AIME 2024, 30 problems x 32 copies (avg@1 over it is avg@32), DAPO's template applied",
    ),
}
"""The data sets the presets name (configs/base/dapo.yaml), as the DAPO recipe downloads them."""

_HUB_SUFFIXES = (".parquet", ".jsonl")


def hub_file(source: str) -> tuple[str, str] | None:
    """`hf://org/name/dir/file.parquet` -> ("org/name", "dir/file.parquet"); None for a whole-dataset id."""
    parts = source[len("hf://") :].split("/")
    if len(parts) < 3 or not parts[-1].endswith(_HUB_SUFFIXES):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def data_dir() -> Path:
    """$DAPO_DATA_DIR, default ../shared/data next to the repository (the offline copies)."""
    env = os.environ.get("DAPO_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"  # <repo>/../shared/data


def local_names(source: str) -> tuple[str, ...]:
    for s in NAMED_SETS.values():
        if s.source == source:
            return s.local_names
    repo_file = hub_file(source)
    return (Path(repo_file[1]).name,) if repo_file else ()


def local_copy(source: str) -> Path | None:
    """The copy of a hub file in the data directory, if there is one."""
    for name in local_names(source):
        if (data_dir() / name).is_file():
            return data_dir() / name
    return None


def hub_cached(source: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    repo, filename = hub_file(source) or ("", "")
    hit = try_to_load_from_cache(repo, filename, repo_type="dataset") if repo else None
    return Path(hit) if isinstance(hit, str) else None


def resolve_hub_file(source: str) -> Path:
    """A local path for `hf://org/name/file`: the data directory's copy, else the hub's (cached or downloaded)."""
    found = local_copy(source)
    if found is not None:
        return found
    repo, filename = hub_file(source)  # type: ignore[misc]
    from huggingface_hub import hf_hub_download

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", endpoint=endpoint, etag_timeout=10))
    except Exception as e:  # noqa: BLE001 - no network, no such file, hub refusal: one clear message
        url = f"{endpoint or 'https://huggingface.co'}/datasets/{repo}/resolve/main/{filename}"
        names = " or ".join(local_names(source))
        raise DataError(
            f"{source}: cannot download the dataset {repo} ({filename}) from the Hugging Face hub: "
            f"{type(e).__name__}: {str(e).splitlines()[0].rstrip('.') if str(e) else ''}. Offline: fetch {url} on a machine with "
            f"network, put it in a directory as {names} and set DAPO_DATA_DIR to that directory (now: {data_dir()}), "
            "or point data.train_path / data.eval_path at the local file"
        ) from None


# ------------------------------------------------------------------------------------------------ fields
def get_field(row: dict, spec: str) -> Any:
    """The value at a field spec (see the module docstring); KeyError names the part that is missing."""
    path, _, transform = spec.partition("|")
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list | tuple) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(part)
    if transform:
        value = _transform(value, transform)
    return value


def _transform(value: Any, transform: str) -> Any:
    name, _, arg = transform.partition(":")
    if name == "after":
        if not isinstance(value, str) or arg not in value:
            raise KeyError(f"|after:{arg} (no {arg!r} in the value)")
        return value.rsplit(arg, 1)[1].strip()
    raise KeyError(f"|{transform} (unknown transform; known: after:SEP)")


def _row_error(source: str, i: int, msg: str) -> DataError:
    return DataError(f"{source}: row {i}: {msg}")


def _field(source: str, i: int, row: dict, spec: str, what: str) -> Any:
    try:
        value = get_field(row, spec)
    except KeyError as e:
        keys = ", ".join(sorted(row)) if isinstance(row, dict) else ""
        raise _row_error(source, i, f"missing {what} field {spec!r} (at {e.args[0]!r}; row has: {keys})") from None
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _row_error(source, i, f"empty {what} field {spec!r}")
    return value


# ------------------------------------------------------------------------------------------------ templates
def format_prompt(raw: Any, template: str, tokenizer: Any) -> str:
    """Prompt text for a raw prompt field; ValueError (no row context) when the type does not fit the template."""
    if template == "chat":
        messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else _messages(raw)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(raw, str):
        return DAPO_TEMPLATE.format(problem=raw) if template == "dapo" else raw
    messages = _messages(raw)
    if template == "dapo":
        raise ValueError("template 'dapo' wraps a raw problem string, not a chat message list; point prompt_key "
                         "at the raw problem (e.g. extra_info.raw_problem) or use template=chat")  # fmt: skip
    if len(messages) != 1:
        raise ValueError(f"template 'none' takes a string or a one-message list; got {len(messages)} messages "
                         "(use template=chat)")  # fmt: skip
    return messages[0]["content"]


def _messages(raw: Any) -> list[dict]:
    ok = (
        isinstance(raw, list | tuple)
        and raw
        and all(isinstance(m, dict) and "content" in m and "role" in m for m in raw)
    )
    if not ok:
        raise ValueError(f"prompt must be a string or a list of {{role, content}} messages; got {type(raw).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in raw]


# ------------------------------------------------------------------------------------------------ prompts
def rows_to_prompts(rows: list[dict], cfg: DataConfig, tokenizer: Any, source: str) -> list[Prompt]:
    """Template, tokenise and check rows (see the module docstring). `cfg` carries the source's overrides."""
    texts, answers, ids, kept = [], [], [], []
    first_row: dict[str, int] = {}
    seen: set[str] = set()
    for i, row in enumerate(rows):
        raw = _field(source, i, row, cfg.prompt_key, "prompt")
        if cfg.dedup:  # before templating and tokenising: the hub's DAPO-Math-17k holds each problem ~100 times
            key = json.dumps(raw, sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
        kept.append(i)
        try:
            texts.append(format_prompt(raw, cfg.template, tokenizer))
        except ValueError as e:
            raise _row_error(source, i, f"field {cfg.prompt_key!r}: {e}") from None
        answers.append(str(_field(source, i, row, cfg.answer_key, "answer")).strip())
        pid = str(_field(source, i, row, cfg.id_key, "id")) if cfg.id_key else str(i)
        if pid in first_row:
            raise _row_error(source, i, f"duplicate id {pid!r} in field {cfg.id_key!r} (first in row {first_row[pid]})")
        first_row[pid] = i
        ids.append(pid)
    encoded = encode_texts(tokenizer, texts) if texts else []
    prompts = []
    for i, pid, text, answer, tokens in zip(kept, ids, texts, answers, encoded, strict=True):
        if len(tokens) > cfg.max_prompt_tokens:
            raise _row_error(
                source, i, f"prompt has {len(tokens)} tokens > data.max_prompt_tokens = {cfg.max_prompt_tokens}"
            )
        if not tokens:
            raise _row_error(source, i, f"field {cfg.prompt_key!r} tokenises to nothing")
        prompts.append(Prompt(prompt_id=pid, prompt_ids=list(tokens), answer=answer, text=text))
    return prompts


def load_prompts(cfg: DataConfig, tokenizer: Any, path: str | None = None, seed: int = 0) -> list[Prompt]:
    """Prompts of `path` (default `cfg.train_path`), templated and tokenised; `seed` drives synthetic sources."""
    path = cfg.train_path if path is None else path
    if not path:
        raise DataError("data.train_path: no dataset given")
    base, scfg = source_config(path, cfg)
    rows = load_rows(path, scfg, seed)
    if not rows:
        raise DataError(f"{base}: the dataset has no rows")
    return rows_to_prompts(rows, scfg, tokenizer, base)
