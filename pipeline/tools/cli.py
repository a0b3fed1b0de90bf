"""`dapo` command line: one config file plus dotted overrides per command.

    dapo train CONFIG [key.path=value ...]     run the pipeline
    dapo config show CONFIG [key.path=value ...]   print the resolved, validated config
    dapo plan ...    propose parallelism for a model and GPU count
    dapo report LOGDIR    render training curves to PNG
    dapo bench [--quick] [--only NAME ...] [--trainer-shape tiny|0.5b|1.5b|7b]  run the benchmark suite
    dapo eval CONFIG [overrides]   evaluate a model on the configured eval set
    dapo ablate CONFIG [--seeds 0,1,2] [--steps N] [overrides]   DAPO's components one at a time (Table 1)
    dapo export RUN_DIR [--step N] [--out DIR]   a run's trainer checkpoint as a Hugging Face model directory
    dapo data   the named datasets: where each comes from, whether it is here

Errors in the config (YAML syntax, encoding, values, missing local files) print one line naming the file or key
path and exit with status 2, before anything starts; so do data and checkpoint errors found at start-up. Other
start-up failures print one line with the root cause (exit 1; the traceback with logging.level=DEBUG). SIGINT or
SIGTERM during start-up stops what had started and exits with status 130 (later: finish the step, save, exit 0).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable

from pipeline.config import ConfigError, check_local_paths, load_config, to_yaml

_DELEGATED = ("plan", "report", "bench", "ablate", "export", "data")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=2e-6")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Sub-tools with their own flags get the rest of the line untouched.
    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], argv[1:])
    parser = argparse.ArgumentParser(
        prog="dapo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    _config_args(sub.add_parser("train", help="run asynchronous DAPO training"))
    cfg_p = sub.add_parser("config", help="inspect configs")
    cfg_sub = cfg_p.add_subparsers(dest="config_cmd", required=True)
    _config_args(cfg_sub.add_parser("show", help="print the resolved config"))
    _config_args(sub.add_parser("eval", help="evaluate model.path on data.eval_path"))
    for name in _DELEGATED:
        sub.add_parser(name, help=f"see `dapo {name} --help`")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.cmd in ("train", "eval"):
            check_local_paths(cfg, train=args.cmd == "train")  # before Ray or any engine starts
    except ConfigError as e:
        print(f"dapo: config error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "config":
        print(to_yaml(cfg), end="")
        return 0
    if args.cmd == "eval":
        from pipeline.runtime.evaluate import eval_main

        return _guarded(lambda: eval_main(cfg))
    from pipeline.runtime.metrics import setup_logging
    from pipeline.runtime.signals import StartupInterrupted
    from pipeline.runtime.train import RunFailed, train

    setup_logging(cfg.logging.level)
    try:
        result = train(cfg)
    except RunFailed as e:
        print(f"dapo: {_compact(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a start-up failure: one short report, the traceback at DEBUG
        return _report(e, "run failed before the first step")
    except StartupInterrupted:  # a signal during start-up: what had started is stopped; nothing was trained
        print("dapo: stopped by a signal during start-up (before the first step); nothing was trained", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM: stopped at once (every process of the run is stopped)
        print(
            "dapo: stopped by a second interrupt without saving this step; continue from the last checkpoint with "
            "checkpoint.resume=auto",
            file=sys.stderr,
        )
        return 130
    print(f"done: {result.steps} steps, weights v{result.version}, logs in {result.run_dir}")
    return 0


def _guarded(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - see _report
        return _report(e, "failed")


def _report(e: BaseException, what: str) -> int:
    """One short report of a failure (exit 2 for a configuration, data or checkpoint problem, 1 otherwise): the
    root cause's message, unwrapped from Ray's errors whose text repeats the remote traceback."""
    cause = _root_cause(e)
    logging.getLogger("dapo").debug("%s", what, exc_info=e)
    name, message = type(cause).__name__, (str(cause).strip().splitlines() or [""])[0]
    if type(cause).__module__.startswith("ray."):  # e.g. ActorDiedError: its text holds the remote traceback
        name, message = _last_raise(str(cause)) or (name, message)
    kind = _kind(cause, name)
    if kind:
        print(f"dapo: {kind} error: {message}", file=sys.stderr)
        return 2
    print(f"dapo: {what}: {name}: {message} (traceback: logging.level=DEBUG)", file=sys.stderr)
    return 1


def _kind(cause: BaseException, name: str) -> str:
    """config | data | checkpoint for our own input errors (also by class name, from a remote traceback), else ""."""
    from pipeline.flow.data import DataError
    from pipeline.runtime.checkpoint import CheckpointError

    for kind, cls in (("config", ConfigError), ("data", DataError), ("checkpoint", CheckpointError)):
        if isinstance(cause, cls) or name == cls.__name__:
            return kind
    return ""


_RAISED = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$")


def _last_raise(text: str) -> tuple[str, str] | None:
    """(class name, message) of the last `pkg.mod.SomeError: message` line of a traceback text, ANSI codes removed."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()
    found = [m.groups() for m in map(_RAISED.match, (ln.strip() for ln in lines)) if m]
    return found[-1] if found else None


def _compact(e: BaseException) -> str:
    """The failure's text with a Ray error it embeds (remote traceback and all) cut to its last raise line."""
    text, cause = str(e), e.__cause__
    if cause is not None and type(cause).__module__.startswith("ray."):
        found = _last_raise(str(cause))
        if found:
            text = text.replace(f"{type(cause).__name__}: {cause}", f"{found[0]}: {found[1]}")
    return text


def _root_cause(e: BaseException) -> BaseException:
    """The exception a Ray task/actor error wraps (its `cause`), else e itself."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if isinstance(inner, BaseException):
            e = inner
            continue
        break
    return e


def _delegate(name: str, rest: list[str]) -> int:
    if name == "plan":
        from pipeline.plan import plan_main

        return plan_main(rest)
    if name == "report":
        from pipeline.tools.report import report_main

        return report_main(rest)
    if name == "export":
        from pipeline.runtime.hf_export import export_main

        return export_main(rest)
    if name == "data":
        from pipeline.tools.datasets import data_main

        return data_main(rest)
    if name == "ablate":
        from pipeline.tools.ablation import ablate_main

        return ablate_main(rest)
    from benchmarks.run_all import bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
