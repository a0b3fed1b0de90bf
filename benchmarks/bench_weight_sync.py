"""Weight sync: bucketed, pipelined broadcast (the real `WeightSyncSender`) vs one flat broadcast of the same bytes.

Payload: the HF-named bf16 tensors of Qwen2.5-0.5B (hidden 896, 24 layers, 14/2 heads, inter 4864, vocab 151936,
tied head: 494M parameters, 0.99 GB) and Qwen2.5-1.5B (1536, 28 layers, 12/2, 8960: 1.54B, 3.09 GB), random
values, no model object: the tensors are views into one flat buffer, which the flat baseline sends as is.

Receivers: two subprocesses (`--receiver`) that join the sync group exactly as the CPU engine does and receive with
the engine's own code: `engines.local.updates.WeightReceiver` (group set-up, name/shape check, per-bucket receive,
landing in the parameters, version), behind the same HTTP routes, with a stand-in engine whose "parameters" are
views into one preallocated buffer in HF order. To keep the machine's memory in bounds the two receivers map the
SAME /dev/shm file as that buffer (each still receives every byte over gloo). The flat baseline: each receiver
posts one broadcast of the whole payload straight into that buffer while the sender broadcasts its flat buffer on
the same group: same bytes, same processes, same group, same run.

Modes (median of `repeats`, default 3; modes alternate because the machine is shared), bucket sizes 64/256/512 MiB
(512 = weight_sync.bucket_mb's default, the headline):
- bucketed: `WeightSyncSender.sync` (pause to verified version) with the default config (flattened buckets,
  prefetch 1). Both ends take their zero-copy path, because both sides' tensors lie back to back in one buffer: the
  sender sends each bucket as a view of its parameters, the receiver lands it straight in its parameters.
- per_tensor: the same with weight_sync.flatten=false (one broadcast per tensor, each straight into its parameter:
  zero-copy for any parameter layout, at the price of one collective per tensor).
- copy / copy_seq: both ends forced onto the copy path (`sender.zero_copy = False`, `receiver.direct = False`),
  i.e. what tensors that do not lie back to back cost: the sender flattens each bucket into a pooled buffer
  (prefetch 1 / 0), the engine receives into its kept receive buffer and copies each tensor into its parameter.
  The real CPU engine is partly here: its runner fuses q/k/v and gate/up weights into shared tensors, so HF order
  (q.weight, q.bias, k.weight, ...) is not its memory order, and multi-tensor flattened buckets are copied.
- wire_only: the sender's bucket stream and broadcast without the per-bucket HTTP and without the engine's
  receive path (receivers take every bucket into one kept buffer and apply nothing).
- disk: colocated mode's pickle-free path (weight_sync.colocated_transport=disk): a second `WeightSyncSender`
  writes each bucket as a safetensors file of one checkpoint directory in /dev/shm, then both receivers load it
  with the engine's /update_weights_from_disk code (each tensor read straight into its parameter), then the
  directory is removed (on a background thread). Same bytes, same receivers, same run as the flat broadcast.
Two untimed syncs per layout (copy path, then zero-copy) check, per receiver, a sha256 of what arrived (in the
zero-copy path: the parameter memory right after each bucket landed) against the sender's (weight_sync.checksum).

Measured on the shared 2-core CPU VM (gloo over loopback, median of 3, other developers' jobs running), ratio to the
flat broadcast (GB/s of the mode / GB/s of flat):
  layout (flat)                    bucket  bucketed  per_tensor  copy  copy_seq  wire_only
  1.5B (2.84 s = 1.09 GB/s)          64Mi      0.89        0.82  0.57      0.58       1.00
                                    256Mi      0.96        0.79  0.54      0.60       1.04
                                    512Mi      1.04        0.88  0.57      0.60       1.01
  0.5B (0.85 s = 1.17 GB/s)          64Mi      0.85        0.71  0.54      0.54       0.94
                                    256Mi      0.99        0.76  0.51      0.58       1.02
                                    512Mi      1.01        0.73  0.49      0.60       0.94
disk (other runs, `--modes bucketed,disk`, flat 1.38 GB/s for 0.5B and 1.67 / 1.88 GB/s for 1.5B): 0.5B 0.71-0.74
(1.0-1.26 GB/s) at every bucket size; 1.5B 0.50 / 0.51 / 0.61 at 64 / 256 / 512 MiB (0.83-1.02 GB/s), in a second
run 0.51 / 0.48 / 0.49 (0.91-0.95 GB/s). Split of one 1.5B
sync: writing ~2.3 s (tmpfs allocates and zeroes a page per 4 KiB of a new file: 2.1 GB/s for a lone writer here,
4.4 GB/s overwriting an existing file), both loads ~1.2-1.8 s, removal ~0.5 s (now off the critical path).
The CUDA side (device-to-host copy on the trainer, SGLang's loader and host-to-device copy) is not measured here.
Why the copy path stays near 0.55-0.6: on this host the wire is memcpy-bound (loopback TCP: a kernel copy per byte
on each send and each receive, 4 passes for 2 receivers), and the copy path adds 3 more passes (sender flatten,
each receiver's copy into the parameters) on the same 2 busy cores, so overlapping them (prefetch) cannot help:
pipelined/sequential 0.81-1.01. Before this receive path (fresh receive tensor per bucket, then copies), the engine
path measured 0.29-0.47. Peak RSS: sender 4.6 GB (1.5B payload + pooled buckets), receivers 3.6 GB each
including the shared 3.1 GB payload; --quick runs 0.5B at 512 MiB only, 2 repeats (~40 s).

Run: .venv/bin/python -m benchmarks.bench_weight_sync [--quick] [--repeats R] [--modes bucketed,disk] [--layouts 1.5B]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from engines.process import free_port
from pipeline.config import WeightSyncConfig
from pipeline.runtime.weight_sync import WeightSyncSender, plan_buckets

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "0.5B": (896, 24, 14, 2, 4864, 151936),
    "1.5B": (1536, 28, 12, 2, 8960, 151936),
}
DTYPE = torch.bfloat16
MiB = 1 << 20


def qwen2_tensors(layout: str) -> list[tuple[str, list[int]]]:
    """HF names and shapes of a Qwen2 with tied embeddings (no lm_head.weight), in state_dict order."""
    h, layers, heads, kv, inter, vocab = LAYOUTS[layout]
    kvd = kv * (h // heads)
    out = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", [h, h]),
            (p + "self_attn.q_proj.bias", [h]),
            (p + "self_attn.k_proj.weight", [kvd, h]),
            (p + "self_attn.k_proj.bias", [kvd]),
            (p + "self_attn.v_proj.weight", [kvd, h]),
            (p + "self_attn.v_proj.bias", [kvd]),
            (p + "self_attn.o_proj.weight", [h, h]),
            (p + "mlp.gate_proj.weight", [inter, h]),
            (p + "mlp.up_proj.weight", [inter, h]),
            (p + "mlp.down_proj.weight", [h, inter]),
            (p + "input_layernorm.weight", [h]),
            (p + "post_attention_layernorm.weight", [h]),
        ]
    return out + [("model.norm.weight", [h])]


def views(flat: torch.Tensor, layout: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, shape in layout:
        n = torch.Size(shape).numel()
        out[name] = flat[offset : offset + n].view(shape)
        offset += n
    return out


def numel(layout: list[tuple[str, list[int]]]) -> int:
    return sum(torch.Size(s).numel() for _, s in layout)


# ------------------------------------------------------------------------------------------------ receiver
MARKERS = ("model.layers.0.input_layernorm.weight", "model.norm.weight")  # in the first and the last bucket


def serve_receiver(port: int, layout_name: str, shm: str) -> None:
    """An engine stand-in: SGLang's weight routes around the CPU engine's WeightReceiver, parameters in `shm`."""
    import asyncio

    from aiohttp import web

    from engines.local.engine import Engine
    from engines.local.updates import WeightReceiver

    torch.set_num_threads(1)
    layout = qwen2_tensors(layout_name)
    flat = torch.from_file(shm, shared=True, size=numel(layout), dtype=DTYPE)

    class BufferEngine:
        """What WeightReceiver needs from an Engine: the engine's own check/load over preallocated views."""

        check_tensors = Engine.check_tensors
        load_tensors = Engine.load_tensors

        def __init__(self) -> None:
            self.params = views(flat, layout)
            self.weight_version = "default"

    engine = BufferEngine()
    receiver = WeightReceiver(engine)
    received: list[hashlib._Hash] = []  # verification runs only: the hash of what arrived, in order

    def hash_received(named) -> None:
        for name, t in named:
            received[0].update(name.encode() + b"\0")
            received[0].update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    engine_thread = cf.ThreadPoolExecutor(1)  # updates run one at a time, as on the engine thread

    async def body(req: web.Request) -> dict:
        raw = await req.read()
        return json.loads(raw) if raw else {}

    def result(ok: bool, msg: str) -> web.Response:
        return web.json_response({"success": ok, "message": msg}, status=200 if ok else 400)

    async def on_engine(fn):
        return await asyncio.get_running_loop().run_in_executor(engine_thread, fn)

    async def ok(_req):
        return web.json_response({"status": "ok"})

    async def info(_req):
        return web.json_response({"weight_version": engine.weight_version})

    async def init_group(req):
        b = await body(req)
        keys = ("master_address", "master_port", "rank_offset", "world_size", "group_name", "backend")
        args = {k: b[k] for k in keys}
        res = await asyncio.get_running_loop().run_in_executor(None, lambda: receiver.init_group(**args))
        return result(*res)

    async def destroy_group(req):
        b = await body(req)
        return result(*await on_engine(lambda: receiver.destroy_group(b["group_name"])))

    async def update(req):
        b = await body(req)
        args = (b["names"], b["dtypes"], b["shapes"], b["group_name"], b.get("weight_version"), b.get("load_format"))
        return result(*await on_engine(lambda: receiver.update_from_distributed(*args)))

    async def update_from_disk(req):
        b = await body(req)
        args = (b["model_path"], b.get("load_format"), b.get("weight_version"))
        return result(*await on_engine(lambda: receiver.update_from_disk(*args)))

    async def checksum(_req):  # the hash of what the last verification sync delivered
        return web.json_response({"checksum": received[0].hexdigest() if received else ""})

    async def set_direct(req):  # the engine's zero-copy receive on (default) or off (always copy)
        receiver.direct = bool((await body(req)).get("on"))
        return web.json_response({})

    async def verify(req):
        received.clear()
        if (await body(req)).get("on"):
            received.append(hashlib.sha256())
        receiver.on_received = hash_received if received else None
        return web.json_response({})

    async def recv_flat(req):
        b = await body(req)

        def recv() -> None:
            dist.broadcast(flat.view(torch.uint8), group_src=0, group=receiver.groups[b["group_name"]])
            engine.weight_version = str(b["weight_version"])

        await on_engine(recv)
        return web.json_response({"success": True})

    async def recv_buckets(req):  # wire-only mode: receive each bucket into the engine's kept buffer, apply nothing
        b = await body(req)

        def recv() -> None:
            buf = receiver.receive_buffer(max(b["sizes"]))
            for n in b["sizes"]:
                dist.broadcast(buf[:n], group_src=0, group=receiver.groups[b["group_name"]])

        await on_engine(recv)
        return web.json_response({"success": True})

    async def probe(_req):
        marks = [float(engine.params[n].float().mean()) for n in MARKERS]
        rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return web.json_response({"marks": marks, "max_rss_gb": rss_gb})

    app = web.Application(client_max_size=2**30)
    app.router.add_get("/health", ok)
    app.router.add_get("/get_model_info", info)
    app.router.add_get("/model_info", info)
    app.router.add_get("/server_info", lambda _req: web.json_response({"version": "0.5.23"}))  # the protocol spoken
    for path in ("/pause_generation", "/continue_generation", "/flush_cache"):
        app.router.add_post(path, ok)
    for path in ("/begin_weight_update", "/end_weight_update"):  # SGLang 0.5.23's session (not enforced here)
        app.router.add_post(path, lambda _req: web.json_response({"success": True, "message": "Success"}))
    app.router.add_post("/init_weights_update_group", init_group)
    app.router.add_post("/destroy_weights_update_group", destroy_group)
    app.router.add_post("/update_weights_from_distributed", update)
    app.router.add_post("/update_weights_from_disk", update_from_disk)
    app.router.add_post("/weights_checksum", checksum)
    app.router.add_post("/bench/verify", verify)
    app.router.add_post("/bench/direct", set_direct)
    app.router.add_post("/bench/recv_flat", recv_flat)
    app.router.add_post("/bench/recv_buckets", recv_buckets)
    app.router.add_post("/bench/probe", probe)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# ------------------------------------------------------------------------------------------------ sender side
def _post(url: str, path: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"receiver {url} not healthy after {timeout_s}s")


class Bench:
    def __init__(self, layout_name: str, tmp: str) -> None:
        self.layout = qwen2_tensors(layout_name)
        self.n = numel(self.layout)
        self.nbytes = self.n * DTYPE.itemsize
        self.flat = torch.empty(self.n, dtype=DTYPE)
        chunk = torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)).to(DTYPE)
        for start in range(0, self.n, chunk.numel()):  # tile one random chunk: fast, and every byte is written
            part = self.flat[start : start + chunk.numel()]
            part.copy_(chunk[: part.numel()])
        self.params = views(self.flat, self.layout)
        self.shm = os.path.join("/dev/shm", f"dapo_bench_ws_{os.getpid()}_{layout_name}")
        with open(self.shm, "wb") as f:
            f.truncate(self.nbytes)
        self.procs, self.urls = [], []
        for i in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "benchmarks.bench_weight_sync", "--receiver", "--port", str(port)]
            cmd += ["--layout", layout_name, "--shm", self.shm]
            log = open(os.path.join(tmp, f"receiver{i}.log"), "wb")  # noqa: SIM115 - lives as long as the process
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env))
            self.urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(self.urls, self.procs, strict=True):
            _wait_healthy(url, proc)
        cfg = WeightSyncConfig(backend="gloo", timeout_s=600)
        self.sender = WeightSyncSender(self.urls, cfg)
        self.sender.connect()
        disk = WeightSyncConfig(mode="colocated", colocated_transport="disk", timeout_s=600)  # disk_dir: /dev/shm
        self.disk_sender = WeightSyncSender(self.urls, disk)
        self.version = 0
        self.direct = True
        self.pool = cf.ThreadPoolExecutor(len(self.urls))

    def close(self) -> None:
        try:
            self.sender.close()
            self.disk_sender.close()
        finally:
            for proc in self.procs:
                proc.terminate()
            for proc in self.procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            os.unlink(self.shm)
            self.pool.shutdown()

    def _mark(self) -> float:
        self.version += 1
        value = float(self.version % 64)  # exact in bf16
        for name in MARKERS:
            self.params[name].fill_(value)
        return value

    def _check(self, value: float) -> list[float]:
        probes = [_post(u, "/bench/probe", {}) for u in self.urls]
        for url, p in zip(self.urls, probes, strict=True):
            if p["marks"] != [value] * len(MARKERS):
                raise RuntimeError(f"{url}: markers {p['marks']} after sync {self.version}, expected {value}")
        return [p["max_rss_gb"] for p in probes]

    def _set_copy(self, copy: bool) -> None:
        """copy=True: both ends take the copy path (sender flattens into pooled buffers, engines receive into their
        kept buffer and copy into the parameters), as for tensors that do not lie back to back in memory."""
        self.sender.zero_copy = not copy
        if copy == self.direct:
            for u in self.urls:
                _post(u, "/bench/direct", {"on": not copy})
            self.direct = not copy

    def _synced(self, sender: WeightSyncSender, **changes) -> tuple[float, int]:
        """One sync of the payload by `sender`, its config changed by `changes`, checked: (seconds, buckets)."""
        sender.cfg = replace(sender.cfg, **changes)
        value = self._mark()
        stats = sender.sync(list(self.params.items()), self.version)
        if stats.bytes != self.nbytes:
            raise RuntimeError(f"sent {stats.bytes} bytes, expected {self.nbytes}")
        self._check(value)
        return stats.seconds, stats.buckets

    def bucketed(
        self, bucket_mb: float, prefetch: int = 1, copy: bool = False, flatten: bool = True, checksum: bool = False
    ) -> tuple[float, int]:
        self._set_copy(copy)
        changes = dict(bucket_mb=bucket_mb, prefetch=prefetch, checksum=checksum, flatten=flatten)
        return self._synced(self.sender, **changes)

    def disk(self, bucket_mb: float) -> tuple[float, int]:
        """Colocated through /dev/shm: the sender writes each bucket as a safetensors file of one staged checkpoint,
        then every receiver loads the directory with the engine's /update_weights_from_disk code."""
        self._set_copy(False)
        return self._synced(self.disk_sender, bucket_mb=bucket_mb)

    def flat_broadcast(self) -> float:
        value = self._mark()
        t0 = time.perf_counter()
        body = {"group_name": self.sender.group_name, "weight_version": self.version}
        futures = [self.pool.submit(_post, u, "/bench/recv_flat", body) for u in self.urls]
        dist.broadcast(self.flat.view(torch.uint8), group_src=0, group=self.sender.group)
        for f in futures:
            f.result()
        seconds = time.perf_counter() - t0
        self._check(value)
        return seconds

    def wire_only(self, bucket_mb: float, prefetch: int) -> tuple[float, int]:
        """The sender's bucket stream (planning, preparation, prefetch) and broadcast, minus the per-bucket HTTP
        and the engine's receive path: receivers take every bucket into their kept buffer and apply nothing."""
        self._set_copy(False)
        self.sender.cfg = replace(self.sender.cfg, bucket_mb=bucket_mb, prefetch=prefetch, checksum=False, flatten=True)
        sizes = [p.nbytes for p in plan_buckets(self.params.items(), int(bucket_mb * MiB))]
        body = {"group_name": self.sender.group_name, "sizes": sizes}
        t0 = time.perf_counter()
        futures = [self.pool.submit(_post, u, "/bench/recv_buckets", body) for u in self.urls]
        stream = self.sender._stream(list(self.params.items()), None)
        deadline = time.monotonic() + self.sender.cfg.timeout_s
        try:
            for bucket in stream:
                self.sender._broadcast(bucket, deadline)
                stream.release(bucket)
        finally:
            stream.close()
        for f in futures:
            f.result()
        return time.perf_counter() - t0, len(sizes)

    def verify(self, bucket_mb: float, copy: bool) -> None:
        """One untimed sync whose bytes every receiver hashes as they arrive (weight_sync.checksum compares). In the
        zero-copy path what is hashed is the parameter memory right after the bucket landed."""
        for u in self.urls:
            _post(u, "/bench/verify", {"on": True})
        try:
            self.bucketed(bucket_mb, copy=copy, checksum=True)
        finally:
            for u in self.urls:
                _post(u, "/bench/verify", {"on": False})


MODES = {  # name: how one timed run of `bucket_mb` goes
    "bucketed": lambda b, mb: b.bucketed(mb),
    "per_tensor": lambda b, mb: b.bucketed(mb, flatten=False),
    "copy": lambda b, mb: b.bucketed(mb, copy=True),
    "copy_seq": lambda b, mb: b.bucketed(mb, prefetch=0, copy=True),
    "wire_only": lambda b, mb: b.wire_only(mb, prefetch=1),
    "disk": lambda b, mb: b.disk(mb),
}


def bench_layout(layout: str, bucket_sizes: list[float], repeats: int, modes: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(layout, tmp)
        try:
            # Untimed, checked syncs; the copy one first, at the largest size, so the kept buffers exist before
            # timing (as after an engine's first sync).
            b.verify(max(bucket_sizes), copy=True)
            b.verify(max(bucket_sizes), copy=False)
            if "disk" in modes:
                b.disk(max(bucket_sizes))  # untimed too: the receivers' first file reads are slower
            flat, runs, nbuckets = [], {(mb, m): [] for mb in bucket_sizes for m in modes}, {}
            for _ in range(repeats):  # modes alternate: the machine is shared, the median damps the noise
                flat.append(b.flat_broadcast())
                for mb in bucket_sizes:
                    for mode in modes:
                        seconds, nbuckets[mb] = MODES[mode](b, mb)
                        runs[(mb, mode)].append(seconds)
            rss = b._check(float(b.version % 64))
        finally:
            b.close()
    gb, flat_s = b.nbytes / 1e9, statistics.median(flat)
    rows = []
    for mb in bucket_sizes:
        med = {m: statistics.median(runs[(mb, m)]) for m in modes}
        row = {"bucket_mb": mb, "buckets": nbuckets[mb]}
        for m, sec in med.items():
            row[f"{m}_s"], row[f"{m}_gbps"] = sec, gb / sec
            row[f"{m}_vs_flat_ratio"] = flat_s / sec
        if "copy" in med and "copy_seq" in med:
            row["pipelined_vs_sequential_ratio"] = med["copy_seq"] / med["copy"]
        rows.append(row)
    return {
        "layout": layout,
        "modes": modes,
        "params": b.n,
        "gbytes": gb,
        "flat_s": flat_s,
        "flat_gbps": gb / flat_s,
        "flat_runs_s": flat,
        "rows": rows,
        "sender_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "receiver_max_rss_gb": rss,
    }


def _print(res: dict) -> None:
    print(
        f"\n{res['layout']}: {res['params'] / 1e6:.0f}M params, {res['gbytes']:.2f} GB bf16 -> 2 receivers (gloo); "
        f"flat broadcast {res['flat_s']:.2f} s = {res['flat_gbps']:.2f} GB/s (median)"
    )
    modes = res["modes"]
    print(f"{'bucket':>6} {'n':>3} | " + " | ".join(f"{m:>16}" for m in modes)
          + " | ratio to flat: " + " ".join(f"{m:>10}" for m in modes) + f" {'pipe/seq':>8}")  # fmt: skip
    for r in res["rows"]:
        cells = " | ".join(f"{r[m + '_s']:5.2f}s {r[m + '_gbps']:4.2f}GB/s" for m in modes)
        ratios = " ".join(f"{r[m + '_vs_flat_ratio']:>10.2f}" for m in modes)
        pipe = r.get("pipelined_vs_sequential_ratio", float("nan"))
        print(f"{r['bucket_mb']:>4.0f}Mi {r['buckets']:>3} | {cells} |                 {ratios} {pipe:>8.2f}")
    print(
        f"peak RSS: sender {res['sender_max_rss_gb']:.2f} GB, receivers "
        + ", ".join(f"{x:.2f}" for x in res["receiver_max_rss_gb"])
        + " GB (each receiver's RSS includes the shared /dev/shm payload)"
    )


def run(
    quick: bool = False, repeats: int | None = None, modes: list[str] | None = None, layouts: list[str] | None = None
) -> dict:
    torch.set_num_threads(1)
    default_mb = WeightSyncConfig().bucket_mb
    layouts = layouts or (["0.5B"] if quick else ["0.5B", "1.5B"])
    sizes = [default_mb] if quick else sorted({64.0, 256.0, default_mb})
    repeats = repeats or (2 if quick else 3)
    modes = modes or list(MODES)
    results = {}
    for layout in layouts:
        results[layout] = res = bench_layout(layout, sizes, repeats, modes)
        _print(res)
    row = next(r for r in results[layouts[-1]]["rows"] if r["bucket_mb"] == default_mb)
    out = {"results": results, "default_bucket_mb": default_mb}
    for key, value in row.items():
        if key.endswith("_ratio"):
            out[key] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--modes", default="", help=f"comma-separated subset of {','.join(MODES)} (default: all)")
    p.add_argument("--layouts", default="", help=f"comma-separated subset of {','.join(LAYOUTS)}")
    p.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--layout", default="0.5B", help=argparse.SUPPRESS)
    p.add_argument("--shm", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.receiver:
        serve_receiver(args.port, args.layout, args.shm)
        return
    modes = [m for m in args.modes.split(",") if m] or None
    bad = [m for m in modes or () if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad[0]!r}")
    out = run(args.quick, args.repeats, modes, [x for x in args.layouts.split(",") if x] or None)
    ratios = ", ".join(f"{k.removesuffix('_ratio')} {v:.2f}" for k, v in out.items() if k.endswith("_ratio"))
    print(f"\nlargest model, default bucket ({out['default_bucket_mb']:.0f} MiB): {ratios} (bucketed target >= 0.8)")


if __name__ == "__main__":
    main()
