"""Weight sync: bucket planning and preparation without engines, then real syncs into two CPU engines (subprocesses)
over gloo, and colocated (safetensors payloads, or a checkpoint staged on /dev/shm), checked by checksums, reported
versions and greedy generations against HF references."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from engines.client import EngineClient, EngineError
from engines.process import free_port, launch_engine
from pipeline.config import ConfigError, EngineConfig, WeightSyncConfig
from pipeline.contracts.weight_wire import (
    flatten_bucket,
    read_safetensors_into,
    safetensors_layout,
    unflatten_bucket,
    weights_checksum,
    write_safetensors,
)
from pipeline.runtime.weight_sync import (
    BucketStream,
    BufferPool,
    Checksums,
    WeightSyncError,
    WeightSyncSender,
    plan_buckets,
    prepare_bucket,
)
from pipeline.runtime.weight_sync.disk import DiskStaging, StagedCheckpoint, check_engines_see, filesystem_type
from pipeline.testing.tiny_models import build_tiny_model, reference_greedy, save_tiny_model

MODEL = dict(init_std=0.3, max_position=256)  # vocab 128, hidden 64, 2 layers: ~90k parameters
PROMPTS = [[5, 6, 7], [40, 41, 42, 43]]
BUCKET_MB = 0.03  # 31,457 bytes: the 32 KiB embedding and MLP matrices go alone, the rest share buckets


def _t(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).to(dtype)


# ----------------------------------------------------------------------------------------- planning, no engines
def test_plan_buckets_sizes_order_and_oversize_tensor():
    named = [("a", _t(10)), ("b", _t(20)), ("c", _t(100)), ("d", _t(5)), ("e", _t(30))]  # 40, 80, 400, 20, 120 B
    plans = list(plan_buckets(named, bucket_bytes=128))
    assert [[n for n, _ in p.items] for p in plans] == [["a", "b"], ["c"], ["d"], ["e"]]
    assert [p.nbytes for p in plans] == [120, 400, 20, 120]
    assert [p.last for p in plans] == [False, False, False, True]
    assert [p.index for p in plans] == [0, 1, 2, 3]
    assert list(plan_buckets([], 128)) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(plan_buckets(named, 0))


def test_plan_buckets_counts_the_wire_dtype_and_keeps_integer_tensors():
    named = [("a", _t(10)), ("b", _t(20)), ("c", _t(100)), ("ids", torch.arange(4)), ("e", _t(30))]
    plans = list(plan_buckets(named, bucket_bytes=128, dtype=torch.bfloat16))
    # bf16: a 20 + b 40 = 60; c 200 alone; ids stays int64 (32 B) + e 60 = 92
    assert [[n for n, _ in p.items] for p in plans] == [["a", "b"], ["c"], ["ids", "e"]]
    assert [p.nbytes for p in plans] == [60, 200, 92]


def test_plan_buckets_splits_where_a_flat_view_would_be_misaligned():
    named = [("h", _t(3, torch.bfloat16)), ("f", _t(2)), ("g", _t(2))]  # 6 B, then fp32 at offset 6
    assert [len(p.items) for p in plan_buckets(named, 1000, align=True)] == [1, 2]
    assert [len(p.items) for p in plan_buckets(named, 1000, align=False)] == [3]


def test_prepared_flat_bucket_has_sglang_layout_and_round_trips():
    named = [("w", torch.randn(3, 4)), ("b", torch.randn(4)), ("i", torch.arange(6))]  # int64 lands at byte 32
    (plan,) = plan_buckets(named, 1 << 20, dtype=torch.bfloat16)
    bucket = prepare_bucket(plan, torch.device("cpu"), torch.bfloat16, flatten=True)
    cast = [named[0][1].bfloat16(), named[1][1].bfloat16(), named[2][1]]
    assert bucket.flat.dtype == torch.uint8 and bucket.flat.numel() == 12 * 2 + 4 * 2 + 6 * 8 == bucket.nbytes
    assert torch.equal(bucket.flat, flatten_bucket(cast))
    assert bucket.dtypes == [torch.bfloat16, torch.bfloat16, torch.int64] and bucket.shapes == [[3, 4], [4], [6]]
    back = unflatten_bucket(bucket.flat.clone(), bucket.names, bucket.dtypes, bucket.shapes)
    assert all(torch.equal(t, c) for (_, t), c in zip(back, cast, strict=True))
    per_tensor = prepare_bucket(plan, torch.device("cpu"), torch.bfloat16, flatten=False)
    assert per_tensor.flat is None and all(torch.equal(t, c) for t, c in zip(per_tensor.tensors, cast, strict=True))


def test_lone_wire_ready_tensor_is_sent_without_a_copy_and_pool_reuses_buffers():
    big, small = torch.randn(64), torch.randn(4)  # 256 B and 16 B
    plans = list(plan_buckets([("big", big), ("s1", small), ("s2", small.clone())], bucket_bytes=64))
    pool = BufferPool(size=1)
    lone = prepare_bucket(plans[0], torch.device("cpu"), pool=pool)
    assert lone.base is None and lone.flat.data_ptr() == big.data_ptr() and lone.flat.numel() == 256
    (bf16_plan,) = plan_buckets([("big", big)], bucket_bytes=64, dtype=torch.bfloat16)
    cast = prepare_bucket(bf16_plan, torch.device("cpu"), torch.bfloat16, pool=pool)  # a cast needs a buffer
    assert cast.base is not None and cast.flat.numel() == 128
    pool.give(cast.base)
    pair = prepare_bucket(plans[1], torch.device("cpu"), pool=pool)  # 32 B: reuses the 128 B buffer
    assert pair.base.data_ptr() == cast.base.data_ptr() and pair.flat.numel() == 32
    pool.give(torch.empty(8, dtype=torch.uint8))  # the pool keeps the largest `size` buffers
    assert [b.numel() for b in pool._free] == [8]
    pool.give(pair.base)
    assert [b.numel() for b in pool._free] == [128]
    assert pool.take(200, torch.device("cpu")).numel() == 200 and len(pool._free) == 1  # too small: fresh one


def test_bucket_of_tensors_back_to_back_in_one_buffer_is_sent_as_a_view():
    flat = torch.arange(20, dtype=torch.float32)
    a, b, c = flat[0:6].view(2, 3), flat[6:10], flat[12:20]  # c leaves a gap of 2 floats after b
    cpu = torch.device("cpu")
    (plan,) = plan_buckets([("a", a), ("b", b)], 1 << 20)
    view = prepare_bucket(plan, cpu, pool=BufferPool())
    assert view.base is None and view.flat.data_ptr() == flat.data_ptr() and view.flat.numel() == 40
    assert torch.equal(view.flat, flatten_bucket([a, b]))
    copies = {
        "gap": [("a", a), ("b", b), ("c", c)],
        "order": [("b", b), ("a", a)],
        "noncontiguous": [("t", flat[:12].view(3, 4).t())],
    }
    for why, named in copies.items():
        (plan,) = plan_buckets(named, 1 << 20)
        bucket = prepare_bucket(plan, cpu)
        assert bucket.base is not None, why
        assert torch.equal(bucket.flat, flatten_bucket([t for _, t in named])), why
    (plan,) = plan_buckets([("a", a), ("b", b)], 1 << 20)
    assert prepare_bucket(plan, cpu, zero_copy=False).base is not None
    (plan,) = plan_buckets([("a", a), ("b", b)], 1 << 20, dtype=torch.bfloat16)
    assert prepare_bucket(plan, cpu, torch.bfloat16).flat.numel() == 20  # a cast always copies


class _FlatEngine:
    """A stand-in for the CPU engine's weight API: parameters "w" and "b" back to back in one buffer (in that order),
    "n" allocated on its own, "h" kept in float32."""

    from engines.local.engine import Engine

    check_tensors = Engine.check_tensors
    load_tensors = Engine.load_tensors

    def __init__(self) -> None:
        self.storage = torch.zeros(10)
        self.params = {
            "w": self.storage[0:6].view(2, 3),
            "b": self.storage[6:10],
            "n": torch.zeros(3),
            "h": torch.zeros(2),
        }
        self.weight_version = "default"


class _FakeWire:
    """Replaces dist.broadcast in the receiver: fills each target with the next payload and records where it went."""

    def __init__(self, payloads: list[torch.Tensor]) -> None:
        self.payloads = list(payloads)
        self.targets: list[tuple[int, int]] = []  # (data_ptr, nbytes) of every receiving tensor

    def __call__(self, tensor, group_src, group):
        src = self.payloads.pop(0)
        assert group_src == 0 and group == "pg" and tensor.nbytes == src.nbytes
        tensor.view(torch.uint8).reshape(-1).copy_(src.contiguous().view(torch.uint8).reshape(-1))
        self.targets.append((tensor.data_ptr(), tensor.nbytes))


def test_receiver_lands_in_place_where_layout_allows_else_reuses_one_buffer(monkeypatch):
    import engines.local.updates as updates

    eng = _FlatEngine()
    rx = updates.WeightReceiver(eng)
    rx.groups["g"] = "pg"

    def update(payloads, names, dtypes, shapes, load_format="flattened_bucket", version=None):
        wire = _FakeWire(payloads)
        monkeypatch.setattr(updates.dist, "broadcast", wire)
        ok, msg = rx.update_from_distributed(names, dtypes, shapes, "g", version, load_format)
        assert not wire.payloads, "every broadcast of the request was received"
        return ok, msg, wire.targets

    w, b = torch.arange(6.0).view(2, 3), torch.arange(10.0, 14.0)
    # Flattened bucket over w, b (back to back): one broadcast straight into the parameters, no buffer.
    ok, _, targets = update([flatten_bucket([w, b])], ["w", "b"], ["float32"] * 2, [[2, 3], [4]], version="v1")
    assert ok and targets == [(eng.storage.data_ptr(), 40)] and rx._buffer is None
    assert torch.equal(eng.params["w"], w) and torch.equal(eng.params["b"], b) and eng.weight_version == "v1"
    # Reversed order: the bytes are not the parameters' layout -> kept receive buffer, then a copy each.
    ok, _, targets = update([flatten_bucket([b + 1, w + 1])], ["b", "w"], ["float32"] * 2, [[4], [2, 3]])
    assert ok and targets == [(rx._buffer.data_ptr(), 40)] and eng.weight_version == "v1"
    assert torch.equal(eng.params["w"], w + 1) and torch.equal(eng.params["b"], b + 1)
    buffer = rx._buffer.data_ptr()
    ok, _, targets = update([flatten_bucket([torch.ones(3), b])], ["n", "b"], ["float32"] * 2, [[3], [4]])
    assert ok and targets == [(buffer, 28)] and torch.equal(eng.params["n"], torch.ones(3))  # buffer reused
    # Per tensor: a float32 tensor lands in its parameter; a bf16 one goes through the buffer and is cast.
    h = torch.tensor([1.5, -2.0])
    ok, _, targets = update([w * 2, h.bfloat16()], ["w", "h"], ["float32", "bfloat16"], [[2, 3], [2]], None, "v2")
    assert ok and targets == [(eng.params["w"].data_ptr(), 24), (rx._buffer.data_ptr(), 4)]
    assert rx._buffer.numel() == 64  # grown: per-tensor slots are 64-byte aligned
    buffer = rx._buffer.data_ptr()
    assert torch.equal(eng.params["w"], w * 2) and torch.equal(eng.params["h"], h) and eng.weight_version == "v2"
    # A bad name: everything still received (into the buffer), nothing changed, the tensor named.
    before = eng.storage.clone()
    ok, msg, targets = update([flatten_bucket([w, torch.ones(2)])], ["w", "nope"], ["float32"] * 2, [[2, 3], [2]])
    assert not ok and "nope: no such parameter" in msg and targets == [(buffer, 32)]
    assert torch.equal(eng.storage, before) and eng.weight_version == "v2"
    ok, msg, _ = update([torch.ones(4)], ["b"], ["float32"], [[2, 2]], None)
    assert not ok and "shape [2, 2]" in msg and torch.equal(eng.storage, before)
    # direct=False forces the copy path; on_received sees what arrived, in order.
    rx.direct, seen = False, []
    rx.on_received = lambda named: seen.extend((n, t.clone()) for n, t in named)
    ok, _, targets = update([flatten_bucket([w, b])], ["w", "b"], ["float32"] * 2, [[2, 3], [4]], version="v3")
    assert ok and targets == [(buffer, 40)] and [n for n, _ in seen] == ["w", "b"] and torch.equal(seen[1][1], b)
    assert torch.equal(eng.params["w"], w) and eng.weight_version == "v3"
    assert rx.destroy_group("missing")[0] is False and rx._buffer is not None


def test_checksums_match_the_engine_hash_per_dtype():
    f = [("x", torch.randn(4, 3)), ("y", torch.randn(7))]
    h = [("z", torch.randn(5).bfloat16())]
    sums = Checksums()
    sums.update([n for n, _ in f[:1]], [t for _, t in f[:1]])
    sums.update(["z", "y"], [h[0][1], f[1][1]])
    digests = sums.hexdigests()
    assert sums.names == {torch.float32: ["x", "y"], torch.bfloat16: ["z"]}
    assert digests[torch.float32] == weights_checksum(f)
    assert digests[torch.bfloat16] == weights_checksum(h)
    assert digests[torch.float32] != weights_checksum(f[::-1])


def test_stream_prefetches_at_most_one_bucket_ahead_and_matches_the_sequential_order():
    named = [(f"t{i}", torch.full((8,), float(i))) for i in range(6)]  # 32 B each, one per 32 B bucket
    prepared: list[int] = []

    def encode(bucket):
        prepared.append(bucket.index)
        return []

    stream = BucketStream(iter(named), 32, torch.device("cpu"), prefetch=1, encode=encode)
    it = iter(stream)
    first = next(it)
    time.sleep(0.3)  # the producer would run ahead here if it were unbounded
    assert first.index == 0 and prepared == [0, 1]
    seen = [first.names]
    stream.release(first)
    for bucket in it:
        seen.append(bucket.names)
        stream.release(bucket)
    stream.close()
    assert seen == [[f"t{i}"] for i in range(6)]
    sequential = [b.names for b in BucketStream(iter(named), 32, torch.device("cpu"), prefetch=0)]
    assert sequential == seen


def test_stream_reraises_source_errors_and_drains_on_close():
    def failing():
        yield "a", torch.zeros(8)
        raise RuntimeError("gather failed on rank 3")

    with pytest.raises(RuntimeError, match="gather failed on rank 3"):
        for _ in BucketStream(failing(), 32, torch.device("cpu"), prefetch=1):
            pass

    done = threading.Event()

    def source():
        for i in range(5):
            yield f"t{i}", torch.zeros(8)
        done.set()  # reached only if the whole source is consumed

    stream = BucketStream(source(), 32, torch.device("cpu"), prefetch=1)
    next(iter(stream))
    stream.close()  # the consumer gives up after one bucket: the source must still be walked to the end
    assert done.wait(5)


def test_safetensors_files_are_the_standard_format_both_ways(tmp_path):
    named = {
        "w": torch.randn(3, 5).bfloat16(),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "scale": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "h": torch.randn(6, dtype=torch.float16),
    }
    path = tmp_path / "a.safetensors"
    assert write_safetensors(path, list(named), list(named.values())) == sum(t.nbytes for t in named.values())
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = st_load_file(path)  # the reference implementation reads what we wrote
    assert set(loaded) == set(named) and all(torch.equal(loaded[n], t) for n, t in named.items())
    save_file({"b": torch.arange(4.0), "a": torch.ones(2, 2).bfloat16()}, tmp_path / "ref.safetensors")
    start, entries = safetensors_layout(tmp_path / "ref.safetensors")  # and we read what it wrote, in file order
    assert sorted((n, d, tuple(s)) for n, d, s, _, _ in entries) == [
        ("a", torch.bfloat16, (2, 2)),
        ("b", torch.float32, (4,)),
    ]
    assert [e[3] for e in entries] == sorted(e[3] for e in entries)
    b, a = sorted(entries, key=lambda e: e[0], reverse=True)
    dest = torch.empty(4)
    with open(tmp_path / "ref.safetensors", "rb") as f:
        read_safetensors_into(f, start, *b[3:], dest)
        with pytest.raises(ValueError, match="8 bytes in the file for a 16-byte tensor"):
            read_safetensors_into(f, start, *a[3:], dest)
    assert torch.equal(dest, torch.arange(4.0))
    with pytest.raises(FileExistsError):  # never overwrites: a staged checkpoint is written once
        write_safetensors(path, ["x"], [torch.ones(1)])
    path.write_bytes(path.read_bytes()[:-8])  # truncated: refused before any offset is trusted
    with pytest.raises(Exception, match="(?i)invalid|incomplete|metadata"):
        safetensors_layout(path)


MOUNTS = """\
/dev/vda / ext4 rw 0 0
tmpfs /dev/shm tmpfs rw 0 0
fs1:/export /mnt/shared nfs4 rw 0 0
/dev/vdb /mnt/shared/local ext4 rw 0 0
"""


def test_disk_staging_must_be_visible_to_engines_on_other_nodes():
    assert filesystem_type("/dev/shm/x", MOUNTS) == "tmpfs" and filesystem_type("/mnt/sharedx", MOUNTS) == "ext4"
    assert filesystem_type("/mnt/shared/a", MOUNTS) == "nfs4"
    assert filesystem_type("/mnt/shared/local/a", MOUNTS) == "ext4"  # the longest mount point wins
    check_engines_see("/dev/shm", "n0", {"http://a:1": "n0", "http://b:2": "n0"}, MOUNTS)  # one node: fine
    check_engines_see("/mnt/shared/w", "n0", {"http://a:1": "n0", "http://b:2": "n1"}, MOUNTS)  # shared: fine
    with pytest.raises(ConfigError, match=r"^weight_sync.disk_dir: /dev/shm \(tmpfs filesystem\).*engines http://b:2 "):
        check_engines_see("/dev/shm", "n0", {"http://a:1": "n0", "http://b:2": "n1"}, MOUNTS)


def test_sender_validates_config_and_lays_out_ranks():
    with pytest.raises(ConfigError, match="weight_sync.dtype"):
        WeightSyncSender(["http://x:1"], WeightSyncConfig(dtype="int8"))
    with pytest.raises(ValueError, match="engine_tp"):
        WeightSyncSender(["http://x:1", "http://y:2"], WeightSyncConfig(), engine_tp=[1])
    s = WeightSyncSender(["http://x:1/", "http://y:2", "http://z:3"], WeightSyncConfig(), engine_tp=[1, 2, 1])
    assert s.urls == ["http://x:1", "http://y:2", "http://z:3"]
    assert s.rank_offsets == [1, 2, 4] and s.world_size == 5


def test_failed_pause_still_walks_the_source_to_the_end():
    """On TP ranks, iterating the HF tensors is a collective: a sync that fails before sending a byte (here the
    pause: nothing listens at the URL) must still consume them, or the stage's other ranks wait forever."""
    done = threading.Event()

    def source():
        yield "a", _t(8)
        yield "b", _t(8)
        done.set()

    url = f"http://127.0.0.1:{free_port()}"
    s = WeightSyncSender([url], WeightSyncConfig(backend="gloo", timeout_s=5))
    try:
        with pytest.raises(WeightSyncError, match=url):
            s.sync(source(), version=1)
    finally:
        s.close()
    assert done.wait(5)


# ----------------------------------------------------------------------------------------- two CPU engines
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("weight_sync")
    model_dir = save_tiny_model(root / "model", seed=0, **MODEL)
    # colocated_transport=disk stages checkpoints here; the engines load from nowhere else
    shm = tempfile.mkdtemp(prefix="dapo-test-", dir="/dev/shm" if os.path.isdir("/dev/shm") else root)
    cfg = EngineConfig(
        backend="local", startup_timeout_s=90, max_running_requests=8, threads=1,
        extra_args=["--update-weights-root", shm],
    )  # fmt: skip
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda i: launch_engine(cfg, str(model_dir), free_port(), root / f"e{i}.log"), (0, 1)))
    yield SimpleNamespace(procs=procs, urls=[p.url for p in procs], shm=shm, model_dir=str(model_dir))
    for p in procs:
        p.stop(grace_s=2)  # one may sit in a group rendezvous that will never complete
    shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture(scope="module")
def sender(engines):
    cfg = WeightSyncConfig(backend="gloo", bucket_mb=BUCKET_MB, checksum=True, timeout_s=30)
    s = WeightSyncSender(engines.urls, cfg)
    yield s
    s.close()


def _state(model) -> list[tuple[str, torch.Tensor]]:
    return [(n, t) for n, t in model.state_dict().items() if n != "lm_head.weight"]  # tied to the embedding


def _ask(urls, fn):
    async def go():
        client = EngineClient(urls, backoff_s=0.05)
        try:
            return await asyncio.gather(*(fn(client, u) for u in urls))
        finally:
            await client.close()

    return asyncio.run(go())


def _greedy(urls, prompt, n=12):
    params = {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}
    return _ask(urls, lambda c, u: c.generate(prompt, params, url=u))


def _assert_engines_run(urls, model, version):
    for prompt in PROMPTS:
        ref = reference_greedy(model, prompt, 12)
        for out in _greedy(urls, prompt):
            assert out.output_ids == ref, out.url
            assert out.weight_version == str(version)


def test_sync_into_two_engines_in_several_buckets(engines, sender):
    model = build_tiny_model(seed=7, **MODEL)
    state = _state(model)
    old = _greedy(engines.urls, PROMPTS[1])
    sender.connect()
    group = sender.group_name
    sender.connect()  # idempotent
    assert sender.group_name == group and sender.world_size == 3

    stats = sender.sync(iter(state), version=1)

    assert stats.bytes == sum(t.numel() * 4 for _, t in state) == 4 * sum(p.numel() for p in model.parameters())
    assert stats.buckets == len(list(plan_buckets(state, int(BUCKET_MB * 2**20)))) >= 6
    assert stats.version == 1 and stats.gbps == pytest.approx(stats.bytes / stats.seconds / 1e9)
    assert _ask(engines.urls, lambda c, u: c.get_weight_version(u)) == ["1", "1"]
    names = [n for n, _ in state]
    assert _ask(engines.urls, lambda c, u: c.weights_checksum(u, names)) == [weights_checksum(state)] * 2
    _assert_engines_run(engines.urls, model, 1)
    assert old[0].output_ids != reference_greedy(model, PROMPTS[1], 12)  # the sync changed something


def test_per_tensor_broadcast_with_bf16_cast(engines, sender):
    model = build_tiny_model(seed=11, **MODEL)
    sender.cfg = replace(sender.cfg, flatten=False, dtype="bfloat16")
    try:
        stats = sender.sync(_state(model), version=2)
    finally:
        sender.cfg = replace(sender.cfg, flatten=True, dtype="")
    assert stats.bytes == 2 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # what the fp32 engines hold now: the weights rounded to bf16
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    _assert_engines_run(engines.urls, model, 2)


@pytest.mark.parametrize("transport, seed", [("tensor", 13), ("disk", 14)])  # each changes the engines' weights
def test_colocated_mode(engines, monkeypatch, transport, seed):
    model = build_tiny_model(seed=seed, **MODEL)
    cfg = WeightSyncConfig(
        mode="colocated", colocated_transport=transport, disk_dir=engines.shm, bucket_mb=BUCKET_MB, checksum=True,
        timeout_s=30,
    )  # fmt: skip
    staged = _spy_on_staging(monkeypatch)
    s = WeightSyncSender(engines.urls, cfg, model_dir=engines.model_dir)
    try:
        s.connect()
        assert s.group is None and s.transport == transport  # no process group in colocated mode
        stats = s.sync(_state(model), version=3)
    finally:
        s.close()
    assert stats.buckets >= 6
    _assert_engines_run(engines.urls, model, 3)  # the checksums matched too (weight_sync.checksum)
    if transport == "tensor":
        assert staged == []
        return
    ((files, loaded),) = staged  # one checkpoint, loaded by both engines, gone after the sync
    assert {"config.json", "model.safetensors.index.json"} <= set(files)
    assert sum(f.endswith(".safetensors") for f in files) == stats.buckets
    expected = dict(_state(model))
    assert all(torch.equal(loaded[n], t) for n, t in expected.items())
    assert os.listdir(engines.shm) == []


def _spy_on_staging(monkeypatch) -> list:
    """Records, for every checkpoint staged for the engines: its files, and its weights as a plain HF load reads
    them (so the directory is a loadable HF checkpoint)."""
    seen = []
    finish = StagedCheckpoint.finish

    def spy(self):
        finish(self)
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        seen.append((sorted(os.listdir(self.path)), {n: t.clone() for n, t in model.state_dict().items()}))

    monkeypatch.setattr(StagedCheckpoint, "finish", spy)
    return seen


def test_disk_load_refuses_bad_paths_naming_the_engine(engines, tmp_path):
    url = engines.urls[0]
    inside = tempfile.mkdtemp(dir=engines.shm)  # allowed, but holds no weights
    (tmp_path / "model.safetensors").write_bytes(b"")
    cases = {
        os.path.join(engines.shm, "missing"): "does not exist",
        inside: "no *.safetensors files",
        str(tmp_path): "outside the directory this engine loads from",
        os.path.join(engines.shm, "..", os.path.basename(tmp_path)): "outside the directory",
    }
    try:
        for path, words in cases.items():
            with pytest.raises(EngineError) as err:
                _ask([url], lambda c, u, path=path: c.update_weights_from_disk(u, path, weight_version="bad"))
            assert url in str(err.value) and words in str(err.value), str(err.value)
        # A sender staging outside the engines' directory: its sync fails naming both engines, and cleans up.
        cfg = WeightSyncConfig(mode="colocated", colocated_transport="disk", disk_dir=str(tmp_path), timeout_s=30)
        s = WeightSyncSender(engines.urls, cfg)
        try:
            with pytest.raises(WeightSyncError) as err:
                s.sync(_state(build_tiny_model(seed=15, **MODEL)), version=9)
        finally:
            s.close()
        assert set(err.value.urls) == set(engines.urls) and all(u in str(err.value) for u in engines.urls)
        assert "outside the directory" in str(err.value)
        assert os.listdir(tmp_path) == ["model.safetensors"]
    finally:
        os.rmdir(inside)
    assert _ask(engines.urls, lambda c, u: c.get_weight_version(u)) == ["3", "3"]  # nothing changed
    with pytest.raises(ConfigError, match="weight_sync.disk_dir"):
        WeightSyncSender(engines.urls, replace(cfg, disk_dir=str(tmp_path / "nope")))


def test_staging_removes_what_dead_processes_left(tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive = int(child.stdout), os.getppid()
    host = DiskStaging(str(tmp_path)).open(0).path.name.split("-")[2]
    for pid in (dead, alive):
        (tmp_path / f"dapo-wsync-{host}-{pid}-s0-v1-x").mkdir()
    (tmp_path / f"dapo-wsync-otherhost-{dead}-s0-v1-x").mkdir()  # another node's, on a shared filesystem
    staging = DiskStaging(str(tmp_path), stage=1)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert f"dapo-wsync-{host}-{dead}-s0-v1-x" not in left
    assert f"dapo-wsync-{host}-{alive}-s0-v1-x" in left and f"dapo-wsync-otherhost-{dead}-s0-v1-x" in left
    ours = [n for n in left if n.startswith(f"dapo-wsync-{host}-{os.getpid()}-")]
    assert len(ours) == 1  # the first DiskStaging's checkpoint (never closed) belongs to a live process: kept
    staged = staging.open(2)
    assert staged.path.name.startswith(f"dapo-wsync-{host}-{os.getpid()}-s1-v2-")
    staged.write(["x"], [torch.ones(1 << 20)])
    staged.remove_later()  # as after a sync: the next one waits until it is gone
    again = staging.open(3)
    assert not staged.path.exists() and again.path.exists()
    staging.close()
    assert not again.path.exists()


def test_two_sources_one_per_pipeline_stage(engines):
    model = build_tiny_model(seed=17, **MODEL)
    state = _state(model)
    half = len(state) // 2
    cfg = WeightSyncConfig(backend="gloo", bucket_mb=BUCKET_MB, checksum=True, timeout_s=30)
    stages = [WeightSyncSender(engines.urls, cfg, stage=0), WeightSyncSender(engines.urls, cfg, stage=1)]
    try:
        for s in stages:
            s.connect()
        assert stages[0].group_name.startswith("dapo_wsync_s0_") and stages[1].group_name.startswith("dapo_wsync_s1_")
        stages[0].pause()
        stages[0].sync(state[:half], version=4, pause=False)
        stages[1].sync(state[half:], version=4, pause=False)
        stages[0].resume(4)
    finally:
        for s in stages:
            s.close()
    _assert_engines_run(engines.urls, model, 4)


def test_refused_tensor_names_the_engine_and_its_message(engines, sender):
    with pytest.raises(WeightSyncError) as err:
        sender.sync([("model.nope.weight", torch.ones(3))], version=5)
    assert set(err.value.urls) == set(engines.urls)
    assert engines.urls[0] in str(err.value) and "model.nope.weight" in str(err.value)
    assert _ask(engines.urls, lambda c, u: c.get_weight_version(u)) == ["4", "4"]  # nothing changed


# ----------------------------------------------------------------- SGLang 0.5.23's session and version rules
# The CPU engines answer as SGLang 0.5.23 does (same status codes and messages, held against SGLang's source in
# tests/test_sglang_contract.py): distributed/tensor updates outside a session -> 400 without joining the
# broadcast; begin while a session is open -> 400; end without one -> 400.
def _session_calls(urls, what):
    return _ask(urls, lambda c, u: getattr(c, what)(u))


def test_sync_without_session_fails_in_seconds_naming_the_engines_message(engines, monkeypatch):
    """The engines refuse every bucket sent outside a session and never join its broadcast: the sender must see
    their answers while it broadcasts and fail at once, not after weight_sync.timeout_s."""
    cfg = WeightSyncConfig(backend="gloo", bucket_mb=BUCKET_MB, timeout_s=60)
    s = WeightSyncSender(engines.urls, cfg)
    monkeypatch.setattr(s, "_begin_session", lambda deadline: [])  # a client that forgets the session
    try:
        s.pause()
        s.connect()
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError) as err:
            s.sync(_state(build_tiny_model(seed=29, **MODEL)), version=30, pause=False)
        elapsed = time.monotonic() - t0
    finally:
        s.close()
        _ask(engines.urls, lambda c, u: c.continue_generation())
    assert elapsed < 8, elapsed  # seconds, not the 60 s collective timeout
    msg = "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
    assert msg in str(err.value) and all(u in str(err.value) for u in engines.urls)
    assert s.group is None  # abandoned mid-broadcast: rebuilt by the next sync


def test_begin_refused_while_a_session_is_open_fails_before_any_bucket(engines, sender, monkeypatch):
    other = engines.urls[1]
    _ask([other], lambda c, u: c.begin_weight_update(u))  # someone else's session, left open
    posted = []
    real = sender.client.update_weights_from_distributed
    monkeypatch.setattr(
        sender.client, "update_weights_from_distributed", lambda *a, **k: posted.append(a) or real(*a, **k)
    )
    t0 = time.monotonic()
    try:
        with pytest.raises(WeightSyncError) as err:
            sender.sync(_state(build_tiny_model(seed=31, **MODEL)), version=31)
        elapsed = time.monotonic() - t0
        # the sender closed the session it opened on the other engine, and left the foreign one alone
        with pytest.raises(EngineError, match="no weight-update session is open"):
            _ask([engines.urls[0]], lambda c, u: c.end_weight_update(u))
    finally:
        _ask([other], lambda c, u: c.end_weight_update(u))
    assert elapsed < 5 and posted == []
    assert other in str(err.value) and "a weight-update session is already open" in str(err.value)
    model = build_tiny_model(seed=37, **MODEL)  # with the session closed, the same sender syncs again
    sender.sync(_state(model), version=32)
    _assert_engines_run(engines.urls, model, 32)


def test_release_without_flat_buckets_gets_per_tensor_broadcasts(engines, sender, monkeypatch):
    """An engine whose release has no load_format (0.5.5) would read a flat buffer as per-tensor broadcasts: the
    sender speaks per-tensor to it whatever weight_sync.flatten says."""
    from engines.sglang.protocol import PROTOCOLS

    no_flat = replace(PROTOCOLS["0.5.23"], flat_buckets=False)

    async def proto(url):
        return no_flat

    monkeypatch.setattr(sender.client, "protocol", proto)
    sent = []
    real = sender.client.update_weights_from_distributed
    monkeypatch.setattr(
        sender.client,
        "update_weights_from_distributed",
        lambda *a, **k: sent.append(k.get("load_format")) or real(*a, **k),
    )
    assert sender.cfg.flatten
    model = build_tiny_model(seed=41, **MODEL)
    sender.sync(_state(model), version=33)
    assert sent and set(sent) == {None}
    _assert_engines_run(engines.urls, model, 33)


def test_hung_engine_is_named_within_the_timeout(engines):
    hung = engines.procs[1]
    cfg = WeightSyncConfig(backend="gloo", bucket_mb=BUCKET_MB, timeout_s=4)
    s = WeightSyncSender(engines.urls, cfg)
    s.connect()
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError) as err:
            s.sync(_state(build_tiny_model(seed=19, **MODEL)), version=6, pause=False)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(hung.pid, signal.SIGCONT)
        s.close()
    assert err.value.urls == [hung.url] and hung.url in str(err.value)
    assert "no answer within" in str(err.value)
    assert elapsed < cfg.timeout_s + 2
    assert s.group is None  # dropped: its state is unknown after a timeout


def test_killed_engine_is_named_within_the_timeout(engines, sender):
    dead = engines.procs[1]
    dead.stop(grace_s=0)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError) as err:
        sender.sync(_state(build_tiny_model(seed=23, **MODEL)), version=7)
    assert time.monotonic() - t0 < sender.cfg.timeout_s
    assert err.value.urls == [dead.url] and dead.url in str(err.value)
    with pytest.raises(WeightSyncError) as again:  # rebuilding the group names it too
        sender.reconnect()
    assert dead.url in str(again.value)
