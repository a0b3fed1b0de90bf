"""Payloads of `/update_weights_from_tensor` (weight_sync.mode = colocated): one list of strings per engine.

Contract:
- The format follows where the trainer's tensors are (`colocated_encoder`), not what the machine has.
- CPU tensors (the CPU engine, tested): `load_format="safetensors"`, each engine gets one entry holding the
  bucket as base64 safetensors bytes (`engines.local.dist.encode_named_tensors`); no pickle anywhere.
- CUDA tensors (SGLang, NOT tested here: no GPU in CI): SGLang's own format, `load_format="flattened_bucket"`,
  each engine gets one entry per TP rank, each a separate `MultiprocessingSerializer.serialize(
  {"flattened_tensor": uint8 buffer, "metadata": [FlattenedTensorMetadata]}, output_str=True)`, i.e. base64 of a
  torch ForkingPickler pickle whose tensor is a CUDA-IPC handle (with `monkey_patch_torch_reductions()` applied so
  the handle names the GPU by UUID). Facts from sglang's `Engine.update_weights_from_tensor` (one payload per TP
  rank so each rank drops its own IPC reference) and slime's colocated update (flattened buckets, gathered per
  engine). The bucket's CUDA buffer must stay alive until every engine has answered; the sender holds it.
  This is the one place a pickle crosses a socket: it is SGLang's protocol, the payload holds handles rather
  than data, and colocated engines are on the same node (loopback). It needs `sglang` importable in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

from engines.local.dist import SAFETENSORS_FORMAT, encode_named_tensors
from pipeline.weight_sync.buckets import Bucket

FLATTENED_BUCKET = "flattened_bucket"
Encoder = Callable[[Bucket], list[list[str]]]


def colocated_encoder(engine_tp: list[int]) -> Encoder:
    """Chooses per bucket, by where its tensors are: CUDA -> SGLang IPC handles, CPU -> safetensors bytes."""
    ipc: list[Encoder] = []

    def encode(bucket: Bucket) -> list[list[str]]:
        if bucket.tensors[0].is_cuda:
            if not ipc:
                ipc.append(sglang_ipc_encoder(engine_tp)[0])
            bucket.load_format = FLATTENED_BUCKET
            return ipc[0](bucket)
        bucket.load_format = SAFETENSORS_FORMAT
        return safetensors_encoder(len(engine_tp))[0](bucket)

    return encode


def safetensors_encoder(num_engines: int) -> tuple[Encoder, str]:
    def encode(bucket: Bucket) -> list[list[str]]:
        entry = encode_named_tensors(dict(zip(bucket.names, bucket.tensors, strict=True)))
        return [[entry] for _ in range(num_engines)]  # the same string: nothing is reference-counted

    return encode, SAFETENSORS_FORMAT


def sglang_ipc_encoder(engine_tp: list[int]) -> tuple[Encoder, str]:
    """SGLang's CUDA-IPC payload (see the module docstring). Raises ImportError naming what is missing."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError as e:
        raise ImportError(
            "weight_sync.mode=colocated with CUDA tensors sends SGLang's CUDA-IPC payload, which needs sglang "
            f"installed in the trainer's environment ({e})"
        ) from None
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except ImportError:  # older layout
        from sglang.srt.model_executor.model_runner import FlattenedTensorBucket
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:  # older layout
        from sglang.srt.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()

    def encode(bucket: Bucket) -> list[list[str]]:
        named = list(zip(bucket.names, bucket.tensors, strict=True))
        fb = FlattenedTensorBucket(named_tensors=named)
        data = {"flattened_tensor": fb.get_flattened_tensor(), "metadata": fb.get_metadata()}
        bucket.flat = data["flattened_tensor"]  # keep the IPC-shared buffer alive until the engines answered
        return [[MultiprocessingSerializer.serialize(data, output_str=True) for _ in range(tp)] for tp in engine_tp]

    return encode, FLATTENED_BUCKET
