"""Per-run secrets and a private staging root: the secure defaults of a training run (issue #22).

Contract: `secure_run(cfg)` is a context manager entered once per run by the driver, after the run directory's
config.yaml is written and before any process (Ray, engines, trainer, rollout) starts; it mutates `cfg`, which the
driver then hands to every actor:
- Engine API key: when the run launches its own engines (engine.backend local | sglang) and neither
  engine.api_key nor env DAPO_ENGINE_API_KEY gives one, `cfg.engine.api_key` becomes a fresh random key
  (`secrets.token_urlsafe(32)`, 256 bits). Every engine requires it (the CPU engine reads it from its environment,
  SGLang from a 0600 `--config` file: engines/process.py; never a command line, so `ps` does not show it), and the
  rollout client, weight-sync sender and evaluators send it (`pipeline.config.engine_api_key`). It is never logged
  (`to_yaml` masks it). External engines keep the key the user configured.
- Private staging root: `<weight_sync.disk_dir>/dapo-run-<host>-<pid>-<random>/`, mode 0700, created fresh
  (`pipeline.runtime.weight_sync.disk.private_run_root`), becomes `cfg.weight_sync.disk_dir`: the CPU engines'
  `--update-weights-root` in every mode (they load weights from nowhere else) and where colocated disk syncs stage
  their checkpoints. Removed when the context exits (a crashed run's root is reaped by the next run). When
  weight_sync.disk_dir is not a directory and the run does not stage weights on disk (not colocated disk), the
  system temporary directory is used instead.
- On exit both fields get back the values they had on entry: the caller's `cfg` holds no removed staging root and no
  spent key, so a second run in the same process from the same `cfg` gets a fresh root under the configured
  directory and a fresh key (it used to fail with colocated disk staging: "weight_sync.disk_dir: ... is not a
  directory").
- `RunSecurity.generated_key` tells whether the key was made here (for tests and the start-up log line).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, engine_api_key
from pipeline.runtime.weight_sync.disk import private_run_root, remove_run_root

log = logging.getLogger(__name__)

LAUNCHED_BACKENDS = ("local", "sglang")


@dataclass
class RunSecurity:
    staging_root: Path
    generated_key: bool


def _stages_on_disk(cfg: Config) -> bool:
    ws = cfg.weight_sync
    return ws.mode == "colocated" and ws.colocated_transport in ("disk", "auto")


@contextlib.contextmanager
def secure_run(cfg: Config) -> Iterator[RunSecurity]:
    given_key, given_dir = cfg.engine.api_key, cfg.weight_sync.disk_dir
    try:
        with _secured(cfg) as security:
            yield security
    finally:
        cfg.engine.api_key, cfg.weight_sync.disk_dir = given_key, given_dir


@contextlib.contextmanager
def _secured(cfg: Config) -> Iterator[RunSecurity]:
    generated = False
    if cfg.engine.backend in LAUNCHED_BACKENDS and not engine_api_key(cfg):
        cfg.engine.api_key = secrets.token_urlsafe(32)
        generated = True
    base = cfg.weight_sync.disk_dir
    if not os.path.isdir(base) and not _stages_on_disk(cfg):
        base = tempfile.gettempdir()
    root = private_run_root(base)
    cfg.weight_sync.disk_dir = str(root)
    log.info(
        "engine API key: %s; weight staging root %s (0700)",
        "random per run" if generated else "configured" if engine_api_key(cfg) else "none (external engines)",
        root,
    )
    try:
        yield RunSecurity(root, generated)
    finally:
        remove_run_root(root)
