"""Colocated mode (weight_sync.mode = colocated): engine i shares trainer rank i's GPU share, no process group.

Two pickle-free ways to hand the weights over (weight_sync.colocated_transport; auto = disk where CUDA is
available, else tensor):
- tensor: `/update_weights_from_tensor` with CPU tensors (the CPU engine, tested): `load_format="safetensors"`,
  each engine gets one entry holding the bucket as base64 safetensors bytes (`pipeline.contracts.weight_wire.
  encode_named_tensors`). CUDA tensors are refused with a clear error: SGLang's version of this route takes a base64
  *pickle* of CUDA-IPC handles (torch's ForkingPickler via its MultiprocessingSerializer), and this project never
  puts a pickle on a socket.
- disk: the buckets are written as safetensors files into a fresh checkpoint directory on a memory filesystem
  (weight_sync.disk_dir, default /dev/shm; disk.py) and every engine loads it with `/update_weights_from_disk`
  {model_path, load_format, weight_version, flush_cache}, a route SGLang has (0.5.5 and 0.5.23) and the CPU engine
  serves too. Works on CUDA with real SGLang servers, any engine TP size; costs one write and one read of the model
  through RAM per sync (see the README's benchmark), and the directory holds the model once while a sync runs.

Optionally (weight_sync.release_memory) engines give back their memory while the trainer trains:
/release_memory_occupation and /resume_memory_occupation {tags}; SGLang needs `--enable-memory-saver`, which
`engine_args` adds, as it adds `--update-weights-root weight_sync.disk_dir` to CPU engines (they then load only
from there).

`engine_args` also adds `--disable-radix-cache` to SGLang servers when weight_sync.pause_mode is in_place (any
weight-sync mode): requests paused in place keep their KV cache, so SGLang refuses to flush the prefix cache
around a sync, and new prompts after the update would otherwise reuse prefixes computed with the old weights.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import Config, ConfigError
from pipeline.contracts.weight_wire import SAFETENSORS_FORMAT, encode_named_tensors
from pipeline.runtime.weight_sync.buckets import Bucket

Encoder = Callable[[Bucket], list[list[str]]]


def colocated_encoder(engine_tp: list[int]) -> Encoder:
    """CPU tensors -> safetensors bytes; CUDA tensors -> an error (see the module docstring)."""

    def encode(bucket: Bucket) -> list[list[str]]:
        if bucket.tensors[0].is_cuda:
            raise ConfigError(
                "weight_sync.colocated_transport: tensor sync of CUDA tensors needs SGLang's pickled CUDA-IPC payload, "
                "and this project sends no pickle over a socket; use colocated_transport=disk (or auto)"
            )
        bucket.load_format = SAFETENSORS_FORMAT
        return safetensors_encoder(len(engine_tp))[0](bucket)

    return encode


def safetensors_encoder(num_engines: int) -> tuple[Encoder, str]:
    def encode(bucket: Bucket) -> list[list[str]]:
        entry = encode_named_tensors(dict(zip(bucket.names, bucket.tensors, strict=True)))
        return [[entry] for _ in range(num_engines)]  # the same string: nothing is reference-counted

    return encode, SAFETENSORS_FORMAT


def engine_args(cfg: Config) -> list[str]:
    """Server flags the weight-sync settings need on the engines we launch (none for external engines)."""
    ws, e = cfg.weight_sync, cfg.engine
    args: list[str] = []
    if e.backend == "sglang" and ws.pause_mode == "in_place" and "--disable-radix-cache" not in e.extra_args:
        args.append("--disable-radix-cache")
    if e.backend == "local":  # in every mode: the run's private 0700 staging root (pipeline/runtime/run_security.py)
        return args + ["--update-weights-root", ws.disk_dir]
    if ws.mode != "colocated" or e.backend == "external":
        return args
    if ws.release_memory and "--enable-memory-saver" not in e.extra_args:
        args.append("--enable-memory-saver")
    return args
