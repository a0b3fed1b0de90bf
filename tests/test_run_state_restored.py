"""A run leaves no state behind in its caller's `Config`: `train(cfg)` enters `secure_run(cfg)`, which sets a random
engine API key and a private staging root in `cfg` for the run's processes; on exit both fields are back to what the
caller gave. Before, a second run in the same process from the same `cfg` (a notebook, a sweep script) inherited the
spent key and the removed root, and with colocated disk staging failed to start ("weight_sync.disk_dir: ... is not a
directory")."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runtime.run_security import secure_run

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
COLOCATED_DISK = ["weight_sync.mode=colocated", "weight_sync.colocated_transport=disk"]


def test_two_runs_from_one_config_each_get_a_fresh_root_and_key(tmp_path):
    cfg = load_config(TINY, [f"weight_sync.disk_dir={tmp_path}", *COLOCATED_DISK])
    seen = []
    for _ in range(2):
        with secure_run(cfg) as sec:
            root = Path(cfg.weight_sync.disk_dir)
            assert root.parent == tmp_path and root.is_dir() and sec.generated_key
            seen.append((root, cfg.engine.api_key))
        assert not root.exists()
        assert (cfg.weight_sync.disk_dir, cfg.engine.api_key) == (str(tmp_path), "")  # as the caller gave them
    (root_a, key_a), (root_b, key_b) = seen
    assert root_a != root_b and key_a != key_b and len(key_b) >= 40


def test_the_callers_values_come_back_after_a_failed_run(tmp_path):
    cfg = load_config(TINY, [f"weight_sync.disk_dir={tmp_path}", "engine.api_key=mine"])
    with pytest.raises(RuntimeError, match="trainer rank died"), secure_run(cfg):
        assert cfg.engine.api_key == "mine" and Path(cfg.weight_sync.disk_dir).parent == tmp_path
        raise RuntimeError("trainer rank died")
    assert (cfg.weight_sync.disk_dir, cfg.engine.api_key) == (str(tmp_path), "mine")
