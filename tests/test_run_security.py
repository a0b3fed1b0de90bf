"""Secure defaults of a run (issue #22): a random per-run engine API key that never reaches a command line, a
private 0700 staging root as the engines' only weight-load root in every mode, SGLang's keys in a 0600 --config
file (held against SGLang's own config-file merger).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from engines.process import API_KEY_ENV, EngineProcess, free_port, launch_engine
from engines.sglang.launcher import sglang_command, write_secrets_file
from pipeline.config import ConfigError, EngineConfig, load_config, to_yaml
from pipeline.runtime.run_security import secure_run
from pipeline.runtime.weight_sync.colocated import engine_args
from pipeline.runtime.weight_sync.disk import DiskStaging, private_run_root, reap_orphans
from pipeline.testing.tiny_models import save_tiny_model
from tests import sglang_source as src

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
MODEL = dict(vocab_size=128, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)


def test_secure_run_makes_a_key_and_a_private_root(tmp_path):
    cfg = load_config(TINY, [f"weight_sync.disk_dir={tmp_path}"])
    assert cfg.engine.backend == "local" and cfg.engine.api_key == ""  # today: engines start without a key
    with secure_run(cfg) as sec:
        root = Path(cfg.weight_sync.disk_dir)
        assert sec.generated_key and len(cfg.engine.api_key) >= 40
        assert root.parent == tmp_path and root.name.startswith("dapo-run-")
        assert stat.S_IMODE(root.stat().st_mode) == 0o700 and root.stat().st_uid == os.getuid()
        assert "***" in to_yaml(cfg) and cfg.engine.api_key not in to_yaml(cfg)
        # the CPU engines load weights only from there, also outside colocated mode (today: no root at all)
        assert cfg.weight_sync.mode == "disaggregated"
        assert engine_args(cfg) == ["--update-weights-root", str(root)]
    assert not root.exists()
    other = load_config(TINY, [f"weight_sync.disk_dir={tmp_path}"])
    with secure_run(other):
        assert other.engine.api_key != cfg.engine.api_key  # per run


def test_configured_or_external_keys_are_kept(tmp_path, monkeypatch):
    cfg = load_config(TINY, [f"weight_sync.disk_dir={tmp_path}", "engine.api_key=mine"])
    with secure_run(cfg) as sec:
        assert cfg.engine.api_key == "mine" and not sec.generated_key
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    cfg = load_config(TINY, [f"weight_sync.disk_dir={tmp_path}"])
    with secure_run(cfg) as sec:
        assert cfg.engine.api_key == "" and not sec.generated_key  # engine_api_key() reads the env
    monkeypatch.delenv(API_KEY_ENV)
    cfg = load_config(TINY, [f"weight_sync.disk_dir={tmp_path}", "engine.backend=external", "engine.urls=[http://x:1]"])
    with secure_run(cfg) as sec:
        assert cfg.engine.api_key == "" and not sec.generated_key


def test_staging_root_is_fresh_private_and_reaped(tmp_path):
    a, b = private_run_root(tmp_path), private_run_root(tmp_path)
    assert a != b and all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in (a, b))
    dead = tmp_path / a.name.replace(f"-{os.getpid()}-", "-999999999-")  # a run root of a process that is gone
    dead.mkdir()
    assert dead in reap_orphans(tmp_path) and a.exists()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by everyone, not sticky: staged files could be swapped
    with pytest.raises(ConfigError, match="weight_sync.disk_dir.*writable by other users"):
        DiskStaging(str(shared))
    shared.chmod(0o1777)  # sticky, like /dev/shm: others cannot touch our 0700 directories
    DiskStaging(str(shared)).close()


def test_local_engine_key_in_env_not_argv(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", **MODEL)
    cfg = load_config(TINY, [f"weight_sync.disk_dir={tmp_path}"])
    with secure_run(cfg):
        e = EngineConfig(backend="local", api_key=cfg.engine.api_key, startup_timeout_s=90)
        proc = launch_engine(e, str(model_dir), free_port(), tmp_path / "engine.log", engine_args(cfg))
        try:
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            assert cfg.engine.api_key.encode() not in b" ".join(argv)
            assert b"--update-weights-root" in argv and cfg.weight_sync.disk_dir.encode() in argv
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{proc.url}/get_model_info", timeout=10)
            assert err.value.code == 401
            req = urllib.request.Request(
                f"{proc.url}/get_model_info", headers={"Authorization": f"Bearer {cfg.engine.api_key}"}
            )
            assert urllib.request.urlopen(req, timeout=10).status == 200
            assert cfg.engine.api_key not in (tmp_path / "engine.log").read_text()
        finally:
            proc.stop()


def test_sglang_keys_travel_in_a_private_config_file(tmp_path, monkeypatch):
    seen = {}

    def fake_start(self):
        path = Path(self.cmd[self.cmd.index("--config") + 1])
        seen.update(cmd=list(self.cmd), path=path, mode=stat.S_IMODE(path.stat().st_mode), text=path.read_text())
        seen["dir_mode"] = stat.S_IMODE(path.parent.stat().st_mode)
        return self

    monkeypatch.setattr(EngineProcess, "start", fake_start)
    monkeypatch.setattr(EngineProcess, "wait_healthy", lambda self, timeout_s: None)
    monkeypatch.setattr("engines.sglang.launcher.installed_release", lambda: "0.5.23")
    cfg = EngineConfig(backend="sglang", api_key="k-123", admin_api_key="adm-456")
    launch_engine(cfg, "/m", 1234, tmp_path / "log")
    assert "k-123" not in seen["cmd"] and "adm-456" not in seen["cmd"]  # today: --api-key k-123 in argv
    assert "--api-key" not in seen["cmd"] and seen["mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert 'api-key: "k-123"' in seen["text"] and 'admin-api-key: "adm-456"' in seen["text"]
    assert not seen["path"].exists() and not seen["path"].parent.exists()  # removed once the server is up


def _sglang_config_merger(version: str):
    """SGLang's own ConfigArgumentMerger, loaded from the cached wheel (it imports only stdlib and yaml)."""
    src.source(version)  # downloads the wheel (or skips)
    wheels = sorted((src.CACHE / version).glob("sglang-*.whl"))
    if not wheels:
        pytest.skip(f"no cached sglang=={version} wheel")
    with zipfile.ZipFile(wheels[0]) as zf:
        names = [n for n in zf.namelist() if n.endswith("server_args_config_parser.py")]
        if not names:
            pytest.skip(f"sglang {version} has no server_args_config_parser.py")
        code = zf.read(names[0]).decode()
    ns: dict = {"__name__": "sglang_config_parser"}
    exec(compile(code, names[0], "exec"), ns)  # noqa: S102 - SGLang's source, read for its facts
    return ns["ConfigArgumentMerger"]


@pytest.mark.parametrize("version", ["0.5.5", "0.5.23"])
def test_sglang_reads_keys_from_its_config_file(tmp_path, version):
    """SGLang has no API-key environment variable; its `--config` YAML file is merged into its arguments in the
    process, so the key is in neither argv nor the environment."""
    server_args = (src.source(version) / "srt" / "server_args.py").read_text()
    assert '"--config"' in server_args and "API_KEY" not in server_args
    merger_cls = _sglang_config_merger(version)
    parser = argparse.ArgumentParser()
    for flag in ("--model-path", "--port", "--api-key", "--admin-api-key"):
        parser.add_argument(flag)
    parser.add_argument("--config")
    path = write_secrets_file(tmp_path, "k-1", "adm-2")
    cmd = sglang_command(EngineConfig(backend="sglang"), "/m", 7, "k-1", "adm-2", secrets_file=path)
    argv = cmd[cmd.index("sglang.launch_server") + 1 :]
    merged = (
        merger_cls(parser).merge_config_with_args(argv)
        if version != "0.5.5"
        else merger_cls(boolean_actions=[]).merge_config_with_args(argv)
    )
    args, _ = parser.parse_known_args(merged)
    assert (args.api_key, args.admin_api_key) == ("k-1", "adm-2")
    assert "k-1" not in cmd and sys.executable in cmd


def test_admin_key_masked_in_yaml():
    cfg = load_config(TINY, ["engine.admin_api_key=adm-secret"])
    assert "adm-secret" not in to_yaml(cfg)


def test_engine_limits_come_from_config():
    from engines.process import local_command

    cfg = load_config(TINY, ["engine.max_n=8", "engine.max_batch=64", "engine.max_request_mb=4",
                             "engine.group_timeout_s=30", "rollout.n_samples_per_prompt=8"])  # fmt: skip
    cmd = local_command(cfg.engine, "/m", 1)
    for flag, value in (("--max-n", "8"), ("--max-batch", "64"), ("--max-request-mb", "4.0"),
                        ("--max-weights-request-mb", "1536.0"), ("--group-timeout-s", "30.0")):  # fmt: skip
        assert cmd[cmd.index(flag) + 1] == value
    with pytest.raises(ConfigError, match="engine.max_weights_request_mb: 100.0 is below one weight_sync.bucket_mb"):
        load_config(TINY, ["weight_sync.mode=colocated", "weight_sync.colocated_transport=tensor",
                           "engine.max_weights_request_mb=100", "weight_sync.bucket_mb=512"])  # fmt: skip
    with pytest.raises(ConfigError, match="engine.max_n: 4 < rollout.n_samples_per_prompt 8"):
        load_config(TINY, ["engine.max_n=4", "rollout.n_samples_per_prompt=8"])
    with pytest.raises(ConfigError, match="engine.group_timeout_s"):
        load_config(TINY, ["engine.group_timeout_s=0"])


def test_run_root_made_on_another_node_is_private_and_removed(tmp_path):
    # the driver named the root on its node; on the trainer's node (here: a base where it does not exist yet) the
    # staging makes it itself, 0700, and removes it when the sender is done
    root = tmp_path / "dapo-run-otherhost-123-abc"
    staging = DiskStaging(str(root))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    staging.open(1)
    staging.close()
    assert root.exists()  # between syncs
    staging.close(final=True)
    assert not root.exists()
    planted = tmp_path / "dapo-run-otherhost-456-def"
    planted.mkdir()
    planted.chmod(0o777)  # made first by someone who read the name off an engine's command line
    with pytest.raises(ConfigError, match="not a private .0700. directory of ours"):
        DiskStaging(str(planted))
