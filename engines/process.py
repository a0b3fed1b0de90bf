"""Launch an inference server (SGLang or the local CPU engine) as a child process and stop it again.

Contract:
- `EngineProcess.start()` runs the command in its own session (so it leads its own process group), with stdout
  and stderr appended to `log_path`; `.pid` and `.url` identify it.
- `wait_healthy(timeout_s)` polls GET {url}/health until 200; if the child exits first or the time runs out it
  raises `EngineStartError` quoting the last ~30 lines of the log.
- `stop(grace_s)` sends SIGTERM (and SIGCONT, so a stopped process can act on it) to the child's process group,
  then SIGKILL after the grace period; it only ever signals the group led by our own child PID, and is a no-op once
  the child has been reaped.
- `health(timeout_s)`: "ok" (GET /health answered 200 within the time), "dead" (the process exited) or "hung" (alive,
  but no 200: frozen, deadlocked, or its engine thread died).
- `launch_engine(cfg, model_dir, port, log_path, extra_args)` builds the command for `cfg.backend` (local | sglang),
  with `extra_args` (flags the run's mode needs) appended, starts it and waits for health (`cfg.startup_timeout_s`).
  API keys never appear in logs, reprs or command lines: the CPU engine gets its key in env DAPO_ENGINE_API_KEY,
  SGLang in a 0600 `--config` file in a fresh 0700 directory, removed once the server is up (it reads the file at
  start-up). The CPU engine's request limits come from EngineConfig (max_n, max_batch, max_request_mb,
  max_weights_request_mb, group_timeout_s).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.contracts.config import EngineConfig

API_KEY_ENV = "DAPO_ENGINE_API_KEY"
REPO_ROOT = Path(__file__).resolve().parent.parent


class EngineStartError(RuntimeError):
    """A server did not come up; the message names its URL and quotes its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: str | Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])


class EngineProcess:
    def __init__(
        self,
        cmd: list[str],
        url: str,
        log_path: str | Path,
        env: dict[str, str] | None = None,
        secret: str | tuple[str, ...] = "",
    ) -> None:
        self.cmd = list(cmd)
        self.url = url.rstrip("/")
        self.log_path = Path(log_path)
        self.env = env
        self._secrets = {secret} if isinstance(secret, str) else set(secret)
        self._secrets.discard("")
        self._proc: subprocess.Popen | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"EngineProcess(url={self.url!r}, pid={self.pid}, cmd={self.display_cmd()!r})"

    def display_cmd(self) -> str:
        """The command line with the API key masked (safe to log)."""
        shown = ["***" if a in self._secrets else a for a in self.cmd]
        return " ".join(shown)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> EngineProcess:
        if self._proc is not None:
            raise RuntimeError(f"{self.url}: already started (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def health(self, timeout_s: float = 5.0) -> str:
        if not self.alive():
            return "dead"
        if _health_ok(self.url, timeout_s):
            return "ok"
        return "hung" if self.alive() else "dead"

    def wait_healthy(self, timeout_s: float = 300.0, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                code = self._proc.returncode if self._proc is not None else None
                raise EngineStartError(
                    f"engine {self.url} exited with code {code} before becoming healthy; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if _health_ok(self.url):
                return
            if time.monotonic() > deadline:
                raise EngineStartError(
                    f"engine {self.url} (pid {self.pid}) not healthy after {timeout_s:.0f}s; "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(poll_s)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM our child's process group, SIGKILL after `grace_s`; returns the exit code."""
        proc = self._proc
        if proc is None or self._stopped:
            return proc.returncode if proc is not None else None
        self._stopped = True
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            self._signal_group(signal.SIGCONT)  # a stopped (SIGSTOP, hung) process only sees SIGTERM once continued
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                proc.wait(timeout=30)
            # Leftover children of the session (a server's own workers) go with the group: done only right after
            # we reaped the leader ourselves, so the group id cannot have been reused.
            self._signal_group(signal.SIGKILL, only_if_leader_alive=False)
        return proc.returncode

    def _signal_group(self, sig: int, only_if_leader_alive: bool = True) -> None:
        pid = self._proc.pid
        if only_if_leader_alive and self._proc.poll() is not None:
            return
        try:
            # start_new_session made our child the leader of a group whose id is its pid.
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _health_ok(url: str, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def engine_api_key(cfg: EngineConfig) -> str:
    return cfg.api_key or os.environ.get(API_KEY_ENV, "")


def local_command(cfg: EngineConfig, model_dir: str, port: int) -> list[str]:
    """`python -m engines.local ...` (the API key travels in the environment, not on the command line)."""
    return [
        sys.executable, "-m", "engines.local",
        "--model-path", str(model_dir),
        "--host", cfg.host,
        "--port", str(port),
        "--max-running-requests", str(cfg.max_running_requests),
        "--threads", str(cfg.threads),
        "--parent-pid", str(os.getpid()),
        "--max-n", str(cfg.max_n),
        "--max-batch", str(cfg.max_batch),
        "--max-request-mb", str(cfg.max_request_mb),
        "--max-weights-request-mb", str(cfg.max_weights_request_mb),
        "--group-timeout-s", str(cfg.group_timeout_s),
        *(["--context-length", str(cfg.context_length)] if cfg.context_length > 0 else []),
        *cfg.extra_args,
    ]  # fmt: skip


def engine_env(env: dict[str, str], devices: str = "") -> dict[str, str]:
    """The server's environment: `env`, with CUDA_VISIBLE_DEVICES = `devices` when given. A colocated multi-GPU
    engine's launching actor holds no GPU of its own (Ray would show it at most its one bundle's GPU), so the
    GPUs its trainer ranks were given are named here."""
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def launch_engine(
    cfg: EngineConfig,
    model_dir: str,
    port: int,
    log_path: str | Path,
    extra_args: list[str] | tuple = (),
    devices: str = "",
) -> EngineProcess:
    """Start one server for `cfg.backend` on `port` and wait until it is healthy. `devices` (e.g. "0,1,2,3"): the
    server's CUDA_VISIBLE_DEVICES, for a colocated engine spanning several trainer ranks' GPUs (see
    `engine_env`); "" leaves what the launching process has."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    url = f"http://{host}:{port}"
    key = engine_api_key(cfg)
    env = engine_env(dict(os.environ), devices)
    secrets_dir, secrets_file = "", None
    if cfg.backend == "local":
        cmd = local_command(cfg, model_dir, port)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        if key:
            env[API_KEY_ENV] = key
        else:
            env.pop(API_KEY_ENV, None)
    elif cfg.backend == "sglang":
        from engines.sglang.launcher import installed_release, sglang_command, write_secrets_file

        if key or cfg.admin_api_key:
            secrets_dir = tempfile.mkdtemp(prefix="dapo-sglang-")  # 0700, ours alone
            secrets_file = write_secrets_file(secrets_dir, key, cfg.admin_api_key)
        cmd = sglang_command(
            cfg, model_dir, port, key, cfg.admin_api_key, installed_release(), secrets_file=secrets_file or ""
        )
    else:
        raise ValueError(f"engine.backend: cannot launch {cfg.backend!r} servers (external servers are given by URL)")
    cmd += list(extra_args)
    try:
        proc = EngineProcess(cmd, url, log_path, env=env, secret=(key, cfg.admin_api_key)).start()
        try:
            proc.wait_healthy(cfg.startup_timeout_s)
        except BaseException:
            proc.stop(grace_s=5)
            raise
    finally:
        if secrets_dir:  # read by the server at start-up; gone before anything else can find it
            shutil.rmtree(secrets_dir, ignore_errors=True)
    return proc
