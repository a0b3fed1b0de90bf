"""Weight sync from the trainer's source rank(s) to the inference engines (docs/DESIGN.md, Contracts).

`WeightSyncSender` (sender.py) drives SGLang's protocol: pause, a dedicated process group (NCCL on GPU, gloo on
CPU), bucketed broadcasts with per-bucket metadata over HTTP, continue, verified `weight_version`. Buckets are
planned and prepared ahead of the wire in buckets.py. Colocated mode has no group: safetensors payloads in
/update_weights_from_tensor (colocated.py; CPU engine), or a checkpoint staged on a memory filesystem and loaded
with /update_weights_from_disk (disk.py; SGLang on CUDA).
"""

from pipeline.runtime.weight_sync.buckets import (
    Bucket,
    BucketPlan,
    BucketStream,
    BufferPool,
    Checksums,
    plan_buckets,
    prepare_bucket,
)
from pipeline.runtime.weight_sync.sender import SyncStats, WeightSyncError, WeightSyncSender

__all__ = [
    "Bucket",
    "BucketPlan",
    "BucketStream",
    "BufferPool",
    "Checksums",
    "SyncStats",
    "WeightSyncError",
    "WeightSyncSender",
    "plan_buckets",
    "prepare_bucket",
]
