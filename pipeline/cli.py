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

Errors in the config print one line naming the key path and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config, to_yaml

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
    except ConfigError as e:
        print(f"dapo: config error: {e}", file=sys.stderr)
        return 2
    if args.cmd == "config":
        print(to_yaml(cfg), end="")
        return 0
    if args.cmd == "eval":
        from pipeline.evaluate import eval_main

        return eval_main(cfg)
    from pipeline.train import RunFailed, setup_logging, train

    setup_logging(cfg.logging.level)
    try:
        result = train(cfg)
    except RunFailed as e:
        print(f"dapo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM: stopped at once (every process of the run is stopped)
        print(
            "dapo: stopped by a second interrupt without saving this step; continue from the last checkpoint with "
            "checkpoint.resume=auto",
            file=sys.stderr,
        )
        return 130
    print(f"done: {result.steps} steps, weights v{result.version}, logs in {result.run_dir}")
    return 0


def _delegate(name: str, rest: list[str]) -> int:
    if name == "plan":
        from pipeline.plan import plan_main

        return plan_main(rest)
    if name == "report":
        from pipeline.report import report_main

        return report_main(rest)
    if name == "export":
        from pipeline.hf_export import export_main

        return export_main(rest)
    if name == "data":
        from pipeline.data import data_main

        return data_main(rest)
    if name == "ablate":
        from pipeline.ablation import ablate_main

        return ablate_main(rest)
    from benchmarks.run_all import bench_main

    return bench_main(rest)


if __name__ == "__main__":
    sys.exit(main())
