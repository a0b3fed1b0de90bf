"""The composition root: the one runtime module that names concrete engines and trainer backends.

Contract: the rest of `pipeline/runtime/` reaches `engines/` only through these functions (and `pipeline/contracts/`
for the types and errors they share), so what the pipeline depends on is listed here:
- `engine_client(urls, api_key, **options)`: the HTTP client of the engine API (`engines.client.EngineClient`;
  it implements `contracts.engine_api.GenerateClient` and the weight-update routes).
- `launch_engine(engine_cfg, model_dir, port, log_path, extra_args, devices)` starts an inference server process
  (engine.backend; `devices`: its CUDA_VISIBLE_DEVICES, "" = inherited);
  `free_port(host)` is a port that was free a moment ago.
- `build_backend(cfg, rank, world_size)`: the trainer backend `trainer.backend` names (fsdp | megatron), a
  `contracts.backend.TrainerBackend`.
- `spawn_megatron(fn, world, *args, timeout_s)` / `init_megatron_dist(rank, world, port)`: gloo CPU process groups
  for megatron work outside Ray (the offline HF export).
Engines are imported inside the functions: importing this module loads none of them.
"""

from __future__ import annotations

from typing import Any


def engine_client(urls: list[str], api_key: str = "", **options: Any) -> Any:
    from engines.client import EngineClient

    return EngineClient(urls, api_key=api_key, **options)


def launch_engine(
    engine_cfg: Any, model_dir: str, port: int, log_path: Any, extra_args: Any = (), devices: str = ""
) -> Any:
    from engines.process import launch_engine as launch

    return launch(engine_cfg, model_dir, port, log_path, tuple(extra_args or ()), devices=devices)


def engine_env(env: dict[str, str], devices: str = "") -> dict[str, str]:
    from engines.process import engine_env as make

    return make(env, devices)


def free_port(host: str = "127.0.0.1") -> int:
    from engines.process import free_port as free

    return free(host)


def build_backend(cfg: Any, rank: int, world_size: int) -> Any:
    if cfg.trainer.backend == "megatron":
        from engines.megatron.backend import build_backend as build
    else:
        from engines.fsdp.backend import build_backend as build
    return build(cfg, rank, world_size)


def spawn_megatron(fn: Any, world: int, *args: Any, timeout_s: float) -> None:
    from engines.megatron.launch import spawn

    spawn(fn, world, *args, timeout_s=timeout_s)


def init_megatron_dist(rank: int, world: int, port: int) -> None:
    from engines.megatron.launch import init_dist

    init_dist(rank, world, port)
