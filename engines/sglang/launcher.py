"""Command lines for SGLang servers and the optional sglang-router (never run on CPU; unit-tested as strings).

Flags checked against sglang 0.5.5 (`srt/server_args.py`) and 0.5.23 (`srt/arg_groups/fields`, CLI name
`--` + field name with dashes, plus `aliases`) by tests/test_sglang_contract.py: `--model-path`, `--tp-size`,
`--mem-fraction-static`, `--max-running-requests`, `--host`, `--port`, `--api-key`, and from EngineConfig:
`--context-length` (engine.context_length > 0), `--enable-deterministic-inference`, `--skip-tokenizer-init`,
`--random-seed` (>= 0), `--weight-version` (non-empty), `--admin-api-key` (0.5.23 only: `release` must name a
release that has it, else ConfigError). Colocated runs with weight_sync.release_memory add
`--enable-memory-saver`, and pause_mode in_place adds `--disable-radix-cache`
(`pipeline.weight_sync.colocated.engine_args`). SGLang takes its keys only on the command line; `EngineProcess`
masks them in anything it prints. `installed_release()` reads the installed sglang's version without importing it.
The router (`python -m sglang_router.launch_router --worker-urls ... --policy ...`) is optional: use
`router_available()` first; our `EngineClient` balances across engines itself when there is no router.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys

from engines.sglang.protocol import protocol_for
from pipeline.config import ConfigError, EngineConfig


def installed_release() -> str:
    """The version of the sglang distribution installed here, or "" when there is none."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return ""


def sglang_command(
    cfg: EngineConfig, model_dir: str, port: int, api_key: str = "", admin_api_key: str = "", release: str = ""
) -> list[str]:
    """`release`: the SGLang version the command is for (flags some releases lack are refused); "" = any."""
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_dir),
        "--tp-size", str(cfg.tp),
        "--mem-fraction-static", str(cfg.mem_fraction),
        "--max-running-requests", str(cfg.max_running_requests),
        "--host", cfg.host,
        "--port", str(port),
    ]  # fmt: skip
    if api_key:
        cmd += ["--api-key", api_key]
    if admin_api_key:
        if release and not protocol_for(release).admin_api_key:
            raise ConfigError(f"engine.admin_api_key: SGLang {release} has no --admin-api-key (0.5.23 has)")
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
