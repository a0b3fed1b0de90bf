"""Payloads of `/update_weights_from_tensor` (weight_sync.mode = colocated): one list of strings per engine.

Contract:
- CPU tensors (the CPU engine, tested): `load_format="safetensors"`, each engine gets one entry holding the
  bucket as base64 safetensors bytes (`engines.local.dist.encode_named_tensors`); no pickle anywhere.
- CUDA tensors are refused with a clear error. SGLang's colocated route takes a base64 *pickle* of CUDA-IPC
  handles (torch's ForkingPickler via its MultiprocessingSerializer), and this project never puts a pickle on a
  socket. On GPUs use weight_sync.mode=disaggregated (NCCL broadcast), which needs no pickle. A pickle-free IPC
  hand-over (handles as plain fields) would need an engine-side route SGLang does not have.
"""

from __future__ import annotations

from collections.abc import Callable

from engines.local.dist import SAFETENSORS_FORMAT, encode_named_tensors
from pipeline.config import ConfigError
from pipeline.weight_sync.buckets import Bucket

Encoder = Callable[[Bucket], list[list[str]]]


def colocated_encoder(engine_tp: list[int]) -> Encoder:
    """CPU tensors -> safetensors bytes; CUDA tensors -> an error (see the module docstring)."""

    def encode(bucket: Bucket) -> list[list[str]]:
        if bucket.tensors[0].is_cuda:
            raise ConfigError(
                "weight_sync.mode: colocated sync of CUDA tensors needs SGLang's pickled CUDA-IPC payload, and this "
                "project sends no pickle over a socket; use weight_sync.mode=disaggregated (NCCL broadcast)"
            )
        bucket.load_format = SAFETENSORS_FORMAT
        return safetensors_encoder(len(engine_tp))[0](bucket)

    return encode


def safetensors_encoder(num_engines: int) -> tuple[Encoder, str]:
    def encode(bucket: Bucket) -> list[list[str]]:
        entry = encode_named_tensors(dict(zip(bucket.names, bucket.tensors, strict=True)))
        return [[entry] for _ in range(num_engines)]  # the same string: nothing is reference-counted

    return encode, SAFETENSORS_FORMAT
