"""The presets' datasets: hub ids through the `hf://` loader, local copies through DAPO_DATA_DIR, a clear error
without network (the hub endpoint pointed at a closed loopback port: no test reaches the real hub), `dapo data`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig, load_config
from pipeline.flow.data import NAMED_SETS, DataError, load_rows, rows_to_prompts
from pipeline.tokenizer import build_char_tokenizer
from pipeline.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DAPO, AIME = NAMED_SETS["dapo-math-17k"].source, NAMED_SETS["aime-2024"].source


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No hub: a closed loopback endpoint and an empty hub cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    # huggingface_hub retries a refused connection 5 times with 1-8 s back-off (~23 s): keep the tries, not the waits
    monkeypatch.setattr(huggingface_hub.utils._http.time, "sleep", lambda s: None)
    return tmp_path


def _row(problem: str, answer: str) -> dict:
    return {"prompt": [{"role": "user", "content": problem}], "reward_model": {"ground_truth": answer, "style": "rule"}}


def test_presets_default_to_the_recipes_hub_files():
    cfg = load_config(ROOT / "configs" / "base" / "dapo.yaml")
    assert cfg.data.train_path == "hf://BytedTsinghua-SIA/DAPO-Math-17k/data/dapo-math-17k.parquet?dedup=true"
    assert cfg.data.eval_path == "hf://BytedTsinghua-SIA/AIME-2024/data/aime-2024.parquet"
    assert (cfg.data.prompt_key, cfg.data.answer_key, cfg.data.id_key) == ("prompt", "reward_model.ground_truth", "")


@pytest.mark.skipif(not (SHARED / "aime-2024.parquet").is_file(), reason="../shared/data not present")
def test_presets_load_from_the_shipped_copies(monkeypatch, offline_hub):
    monkeypatch.setenv("DAPO_DATA_DIR", str(SHARED))
    cfg = load_config(ROOT / "configs" / "base" / "dapo.yaml").data
    train, test = load_rows(cfg.train_path, cfg, 0), load_rows(cfg.eval_path, cfg, 0)
    assert (len(train), len(test)) == (17917, 960)  # the dedup copy of DAPO-Math-17k; AIME 30 x 32
    plain = DataConfig(**{**vars(cfg), "template": "none", "max_prompt_tokens": 100_000})
    prompts = rows_to_prompts(test[:2], plain, build_char_tokenizer(), cfg.eval_path)
    assert prompts[0].answer == "540" and prompts[0].text.startswith("Solve the following math problem step by step.")


def test_no_network_names_the_dataset_and_the_offline_way(monkeypatch, offline_hub):
    monkeypatch.setenv("DAPO_DATA_DIR", str(offline_hub / "empty"))
    with pytest.raises(DataError) as e:
        load_rows(DAPO, DataConfig(), 0)
    msg = str(e.value)
    assert msg.startswith(f"{DAPO}: cannot download the dataset BytedTsinghua-SIA/DAPO-Math-17k")
    assert "http://127.0.0.1:1/datasets/BytedTsinghua-SIA/DAPO-Math-17k/resolve/main/data/dapo-math-17k.parquet" in msg
    assert f"set DAPO_DATA_DIR to that directory (now: {offline_hub / 'empty'})" in msg
    assert "dapo-math-17k.parquet or dapo_math_17k_dedup_raw.parquet" in msg


def test_dapo_data_dir_copy_is_used_offline(tmp_path, monkeypatch, offline_hub):
    monkeypatch.setenv("DAPO_DATA_DIR", str(tmp_path))
    pq.write_table(pa.Table.from_pylist([_row("1+1?", "2"), _row("2+3?", "5")]), tmp_path / "aime-2024.parquet")
    cfg = load_config(ROOT / "configs" / "base" / "dapo.yaml").data
    rows = load_rows(AIME, cfg, 0)
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["2", "5"]


def test_dapo_data_lists_the_sets(tmp_path, monkeypatch, offline_hub, capsys):
    monkeypatch.setenv("DAPO_DATA_DIR", str(tmp_path))
    (tmp_path / "aime-2024.parquet").write_bytes(b"x")
    assert main(["data"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert DAPO in lines["dapo-math-17k"] and "no (download, or put dapo-math-17k.parquet" in lines["dapo-math-17k"]
    assert lines["aime-2024"].rstrip().endswith(str(tmp_path / "aime-2024.parquet"))
    assert lines["bench:aime24"].rstrip().endswith(str(tmp_path / "aime-2024.parquet"))
    assert "no (put it in the data directory)" in lines["bench:gsm8k"]
