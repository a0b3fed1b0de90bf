"""Command lines for SGLang servers and the optional sglang-router (never run on CPU; unit-tested as strings).

Flags checked against sglang 0.5.5 (`srt/server_args.py`) and 0.5.23 (`srt/arg_groups/fields`): `--model-path`,
`--tp-size` (alias `--tensor-parallel-size`), `--mem-fraction-static`, `--max-running-requests`, `--host`,
`--port`, `--api-key`; colocated runs with weight_sync.release_memory add `--enable-memory-saver` (both versions;
`pipeline.weight_sync.colocated.engine_args`). SGLang takes its API key only on the command line; `EngineProcess`
masks it in anything it prints. The router (`python -m sglang_router.launch_router --worker-urls ... --policy ...`) is optional: use
`router_available()` first; our `EngineClient` balances across engines itself when there is no router.
"""

from __future__ import annotations

import importlib.util
import sys

from pipeline.config import EngineConfig


def sglang_command(cfg: EngineConfig, model_dir: str, port: int, api_key: str = "") -> list[str]:
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
