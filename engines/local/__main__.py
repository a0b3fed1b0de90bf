"""`python -m engines.local --model-path DIR [--host 127.0.0.1] [--port P] [--api-key K] ...`: serve a HF causal LM
on CPU under SGLang's HTTP protocol. The API key may also come from env DAPO_ENGINE_API_KEY (kept out of `ps`);
it is never logged. SIGTERM/SIGINT shut the server down cleanly (in-flight requests end as "abort"); with
--parent-pid the server also exits when its launcher is gone.
"""

from __future__ import annotations

import argparse
import logging
import os

API_KEY_ENV = "DAPO_ENGINE_API_KEY"


def _positive(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("max_n", "max_batch", "max_request_mb", "max_weights_request_mb", "group_timeout_s"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engines.local", description=__doc__)
    p.add_argument("--model-path", required=True, help="HF model directory (tokenizer optional, same dir)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help=f"required Bearer key (default: env {API_KEY_ENV})")
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the model (split among lanes)")
    p.add_argument(
        "--lanes",
        type=int,
        default=0,
        help="row groups stepped in parallel, one torch thread each (0: one per thread with the fast runner)",
    )
    p.add_argument("--context-length", type=int, default=0, help="0: the model's max_position_embeddings")
    p.add_argument("--max-prefill-tokens", type=int, default=8192, help="prompt tokens prefilled per iteration")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"))
    p.add_argument("--runner", default="auto", choices=("auto", "slot", "hf"), help="slot: fast Llama-family path")
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--weight-version", default="default")
    p.add_argument(
        "--return-original-logprob",
        action="store_true",
        help="report log_softmax(logits) at temperature 1 instead of the temperature-scaled distribution",
    )
    p.add_argument(
        "--update-weights-root",
        default="",
        help="/update_weights_from_disk loads only directories under this one (default: any directory)",
    )
    p.add_argument(
        "--enable-return-routed-experts",
        action="store_true",
        help="SGLang's flag: MoE models return the routed experts of requests with return_routed_experts",
    )
    p.add_argument("--max-n", type=int, default=256, help="largest sampling_params.n a request may ask for")
    p.add_argument("--max-batch", type=int, default=4096, help="most requests one body may create (prompts x n)")
    p.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body (413 above)")
    p.add_argument(
        "--max-weights-request-mb",
        type=float,
        default=1536.0,
        help="largest /update_weights_from_tensor body (base64 safetensors buckets)",
    )
    p.add_argument(
        "--group-timeout-s",
        type=float,
        default=120.0,
        help="longest wait of /init_weights_update_group for the other ranks",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--parent-pid", type=int, default=0, help="shut down when this process (our launcher) is gone")
    args = p.parse_args(argv)
    _positive(args, p)
    return args


def _exit_with_parent(parent_pid: int) -> None:
    """An orphaned engine (its launcher crashed or was killed) terminates itself instead of lingering."""
    import signal
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("engines.local")

    import torch
    from aiohttp import web
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engines.local.engine import Engine
    from engines.local.server import Limits, LocalServer

    threads = max(1, args.threads)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    except Exception:  # noqa: BLE001 - a tokenizer is optional: input_ids work without one
        tokenizer = None
    engine = Engine(
        model,
        max_running=args.max_running_requests,
        max_len=args.context_length or None,
        max_prefill_tokens=args.max_prefill_tokens,
        seed=args.random_seed,
        runner=args.runner,
        original_logprob=args.return_original_logprob,
        weight_version=args.weight_version,
        lanes=args.lanes or threads,
    )
    torch.set_num_threads(max(1, threads // len(engine.lanes)))  # the generic runner gets one lane, all threads
    engine.start()
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV, "")
    server = LocalServer(
        engine,
        args.model_path,
        tokenizer,
        api_key=api_key,
        weights_root=args.update_weights_root,
        enable_return_routed_experts=args.enable_return_routed_experts,
        limits=Limits(
            max_n=args.max_n,
            max_batch=args.max_batch,
            max_body_bytes=int(args.max_request_mb * 2**20),
            max_weights_body_bytes=int(args.max_weights_request_mb * 2**20),
            group_timeout_s=args.group_timeout_s,
        ),
        host=args.host,
        port=args.port,
        threads=args.threads,
        dtype=args.dtype,
    )
    app = server.app()
    if args.parent_pid:
        _exit_with_parent(args.parent_pid)

    async def _abort_all(_app: web.Application) -> None:
        # On SIGTERM, in-flight requests end as "abort" with their partial output instead of hanging.
        engine.abort(abort_all=True)

    async def _stop_engine(_app: web.Application) -> None:
        engine.stop()

    app.on_shutdown.append(_abort_all)
    app.on_cleanup.append(_stop_engine)
    log.info(
        "serving %s (%s runner, %d lanes x %d torch threads, api key %s) on http://%s:%d",
        args.model_path,
        type(engine.runner).__name__,
        len(engine.lanes),
        torch.get_num_threads(),
        "set" if api_key else "not set",
        args.host,
        args.port,
    )
    web.run_app(app, host=args.host, port=args.port, print=None, handler_cancellation=True, access_log=None)


if __name__ == "__main__":
    main()
