"""Command lines for SGLang servers and the optional sglang-router (never run on CPU; unit-tested as strings).

Flags checked against sglang 0.5.5 (`srt/server_args.py`) and 0.5.23 (`srt/arg_groups/fields`, CLI name
`--` + field name with dashes, plus `aliases`) by tests/test_sglang_contract.py: `--model-path`, `--tp-size`,
`--mem-fraction-static`, `--max-running-requests`, `--host`, `--port`, `--api-key`, and from EngineConfig:
`--context-length` (engine.context_length > 0), `--enable-deterministic-inference`, `--skip-tokenizer-init`,
`--random-seed` (>= 0), `--weight-version` (non-empty), `--admin-api-key` (0.5.23 only: `release` must name a
release that has it, else ConfigError). Colocated runs with weight_sync.release_memory add
`--enable-memory-saver`, and pause_mode in_place adds `--disable-radix-cache`
(`pipeline.runtime.weight_sync.colocated.engine_args`). SGLang (0.5.5 and 0.5.23) reads no API key from the environment,
but `--config FILE` (a YAML of flags without their dashes, merged into its arguments inside the process) reads
`api-key` and `admin-api-key`: `write_secrets_file(dir, api_key, admin_api_key)` writes them to a 0600 file and
`sglang_command(..., secrets_file=path)` passes `--config path` instead of the keys, so they never appear in argv
(`ps`, /proc/<pid>/cmdline). Without a secrets file the keys go on the command line (masked by `EngineProcess` in
anything it prints). `installed_release()` reads the installed sglang's version without importing it.
The router (`python -m sglang_router.launch_router --worker-urls ... --policy ...`) is optional: use
`router_available()` first; our `EngineClient` balances across engines itself when there is no router.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

from engines.sglang.protocol import protocol_for
from pipeline.contracts.config import ConfigError, EngineConfig


def installed_release() -> str:
    """The version of the sglang distribution installed here, or "" when there is none."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return ""


def write_secrets_file(directory: str | Path, api_key: str = "", admin_api_key: str = "") -> Path:
    """A new 0600 YAML file in `directory` holding the keys for SGLang's `--config` (JSON strings are YAML)."""
    path = Path(directory) / "sglang-secrets.yaml"
    # dashed keys: SGLang turns each key into `--<key>` as written (0.5.5 does not map api_key to --api-key)
    lines = [f"{k}: {json.dumps(v)}" for k, v in (("api-key", api_key), ("admin-api-key", admin_api_key)) if v]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def sglang_command(
    cfg: EngineConfig,
    model_dir: str,
    port: int,
    api_key: str = "",
    admin_api_key: str = "",
    release: str = "",
    secrets_file: str | Path = "",
) -> list[str]:
    """`release`: the SGLang version the command is for (flags some releases lack are refused); "" = any.
    `secrets_file` (from `write_secrets_file`, holding the same keys): pass the keys as `--config FILE`, not argv."""
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_dir),
        "--tp-size", str(cfg.tp),
        "--mem-fraction-static", str(cfg.mem_fraction),
        "--max-running-requests", str(cfg.max_running_requests),
        "--host", cfg.host,
        "--port", str(port),
    ]  # fmt: skip
    if admin_api_key and release and not protocol_for(release).admin_api_key:
        raise ConfigError(f"engine.admin_api_key: SGLang {release} has no --admin-api-key (0.5.23 has)")
    if secrets_file:
        cmd += ["--config", str(secrets_file)]
    else:
        if api_key:
            cmd += ["--api-key", api_key]
        if admin_api_key:
            cmd += ["--admin-api-key", admin_api_key]
    if cfg.context_length > 0:
        cmd += ["--context-length", str(cfg.context_length)]
    if cfg.deterministic_inference:
        cmd.append("--enable-deterministic-inference")
    if cfg.skip_tokenizer_init:
        cmd.append("--skip-tokenizer-init")
    if cfg.random_seed >= 0:
        cmd += ["--random-seed", str(cfg.random_seed)]
    if cfg.weight_version:
        cmd += ["--weight-version", cfg.weight_version]
    return cmd + list(cfg.extra_args)


def router_available() -> bool:
    return importlib.util.find_spec("sglang_router") is not None


def router_command(worker_urls: list[str], host: str, port: int, policy: str = "cache_aware") -> list[str]:
    if not worker_urls:
        raise ValueError("router_command: at least one worker URL is needed")
    return [
        sys.executable, "-m", "sglang_router.launch_router",
        "--worker-urls", *worker_urls,
        "--policy", policy,
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
