"""The trained policy as a Hugging Face checkpoint: `runs/<run>/hf/step_N/`, during a run and offline (`dapo export`).

Contract:
- A checkpoint directory holds config.json (its `dtype` set to the written dtype), generation_config.json, the
  tokenizer files, safetensors shards `model-0000i-of-0000n.safetensors` and `model.safetensors.index.json`
  (weight_map + total_size), i.e. what `AutoModelForCausalLM.from_pretrained`, SGLang and vLLM load.
- The tensors come from `backend.named_hf_weights()`, the HF-named path the weight sync uses, whatever the layout
  (TP/EP gathered inside it; with PP each stage's source rank yields its own layers). `write_rank_shards` runs on
  EVERY rank (the iteration runs collectives); a rank whose iterator yields tensors writes them as its own shard
  files into the shared temporary directory and returns its part of the weight map. `finalize` (one process: the
  driver, or the offline exporter) merges the parts, names the shards, copies config and tokenizer, writes the index
  LAST and renames the temporary directory into place: a crash or an exception at any point leaves no directory
  under the final name (a stale `.step_N.*` temporary is removed by the next save).
- Tied embeddings (`tie_word_embeddings`): no `lm_head.weight` is written (HF ties it on load).
- dtype: `checkpoint.hf_dtype`, empty = `model.dtype`. The tensors are the weights the engines serve (the master
  weights rounded to `model.dtype`); `float32` widens those (exactly the master weights when `model.dtype` is
  float32; offline exports from an fsdp checkpoint always read the float32 master).
- `save_run_hf(cfg, run_dir, step, trainers, model_dir)`: the in-run save (Ray trainer actors expose
  `write_hf_shards(tmp_dir)`), keeping the newest `checkpoint.keep_last` directories.
- `export_run(run_dir, out, step=None)`: offline, from `runs/<run>/checkpoints/step_*/trainer` (DCP for fsdp: read
  in this process without a process group; megatron dist-checkpoint: the layout's world size of gloo CPU processes,
  each building its rank of the backend and loading its shard through the backend's own `load`, so every layout the
  trainer can resume is exported by the code that resumes it; the processes are started with
  engines/megatron/launch.py's `spawn`, the repository's one gloo launcher) with the run's resolved `config.yaml`.
- An existing output directory is replaced only when it is an earlier export (it has the index) or empty.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config

log = logging.getLogger("dapo")

HF_SUBDIR = "hf"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 2 * 1024**3  # safetensors shard size target (one tensor larger than this gets a shard of its own)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.index\.json$")


class ExportError(RuntimeError):
    """An export that cannot proceed; the message names the run, checkpoint or file."""


def export_dtype(cfg: Config) -> torch.dtype:
    name = cfg.checkpoint.hf_dtype or cfg.model.dtype
    if name not in _DTYPES:
        raise ExportError(f"checkpoint.hf_dtype: must be one of {', '.join(_DTYPES)} (or empty); got {name!r}")
    return _DTYPES[name]


def is_tied(model_dir: str | os.PathLike) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return bool(config.get("tie_word_embeddings", False))


# ------------------------------------------------------------------------------------------------ per rank
def write_rank_shards(
    named: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    prefix: str,
    dtype: torch.dtype,
    tied: bool,
    shard_bytes: int = SHARD_BYTES,
) -> dict[str, str]:
    """Iterate `named` to the end; write what it yields as `<prefix>-<i>.safetensors` shards. Returns name -> file."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            fname = f"{prefix}-{len(set(weight_map.values())):05d}.safetensors"
            save_file(pending, str(out_dir / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(pending, fname))
            pending, size = {}, 0

    for name, tensor in named:
        if tied and name == "lm_head.weight":
            continue  # HF re-ties the head to the embedding on load
        if name in pending or name in weight_map:
            raise ExportError(f"{name}: yielded twice by named_hf_weights")
        t = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).contiguous().clone()
        if size and size + t.numel() * t.element_size() > shard_bytes:
            flush()
        pending[name] = t
        size += t.numel() * t.element_size()
    flush()
    return weight_map


def write_backend_shards(backend: Any, model_dir: str, out_dir: str, dtype: torch.dtype) -> dict[str, str]:
    """`write_rank_shards` of one trainer rank's backend (call it on every rank of the trainer together)."""
    return write_rank_shards(backend.named_hf_weights(), out_dir, f"rank{backend.rank:05d}", dtype, is_tied(model_dir))


# ------------------------------------------------------------------------------------------------ one process
def finalize(
    tmp: Path, final: Path, parts: list[dict[str, str]], model_dir: str, dtype: torch.dtype, tokenizer: str = ""
) -> Path:
    """Merge the ranks' weight maps, name the shards, add config/tokenizer, write the index last, rename into place.
    `tokenizer` (model.tokenizer) is saved with the model when the start model's directory holds none."""
    weight_map: dict[str, str] = {}
    for part in parts:
        for name, fname in part.items():
            if name in weight_map:
                raise ExportError(f"{name}: written by two ranks ({weight_map[name]} and {fname})")
            weight_map[name] = fname
    if not weight_map:
        raise ExportError("no rank wrote any tensor (is a weight-sync source among the trainer ranks?)")
    files = sorted(set(weight_map.values()))
    renamed = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        os.replace(tmp / old, tmp / new)
    weight_map = {n: renamed[f] for n, f in sorted(weight_map.items())}
    _copy_model_files(Path(model_dir), tmp, dtype)
    if tokenizer and not (tmp / "tokenizer_config.json").is_file():
        from pipeline.tokenizer import load_tokenizer, save_tokenizer

        save_tokenizer(load_tokenizer(tokenizer), tmp)
    total = sum(_tensor_bytes(tmp / f) for f in renamed.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))  # last: the directory is complete
    check_replaceable(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def check_replaceable(final: Path) -> None:
    """Only an earlier export (or an empty directory) is ever replaced: never a directory of other files."""
    if final.exists() and not (final.is_dir() and ((final / INDEX).is_file() or not any(final.iterdir()))):
        raise ExportError(f"{final}: exists and is not a Hugging Face export (no {INDEX}): choose another --out")


def _tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            sl = f.get_slice(k)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            total += numel * _DTYPE_BYTES[sl.get_dtype()]
    return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _copy_model_files(model_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """config.json (dtype updated), generation_config.json and every tokenizer/auxiliary file of the start model."""
    for src in model_dir.iterdir():
        if src.is_file() and not _WEIGHT_FILES.match(src.name) and src.name != "config.json":
            shutil.copy2(src, out / src.name)
    config = json.loads((model_dir / "config.json").read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if not (out / "generation_config.json").is_file():
        from transformers import GenerationConfig, PretrainedConfig

        GenerationConfig.from_model_config(PretrainedConfig.from_dict(config)).save_pretrained(out)


def fresh_tmp(final: Path) -> Path:
    """An empty temporary directory beside `final` (hidden, so nothing lists it as a checkpoint)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def hf_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / HF_SUBDIR


def hf_steps(run_dir: str | os.PathLike) -> list[Path]:
    """Complete `hf/step_N` directories of a run, oldest first."""
    done = [p for p in hf_root(run_dir).glob("step_*") if p.name[5:].isdigit() and (p / INDEX).is_file()]
    return sorted(done, key=lambda p: int(p.name[5:]))


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    done = hf_steps(run_dir)
    for old in done[: max(len(done) - max(keep_last, 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def hf_due(cfg: Config, step: int, last: bool) -> bool:
    """checkpoint.hf_every: every k steps and at the end (0: at the end only; < 0: never)."""
    every = cfg.checkpoint.hf_every
    return every >= 0 and (last or (every > 0 and step % every == 0))


# ------------------------------------------------------------------------------------------------ in a run
def save_run_hf(cfg: Config, run_dir: str | os.PathLike, step: int, trainers: list, model_dir: str) -> Path:
    """Every trainer actor writes its shards (`write_hf_shards`), then this process finalizes `hf/step_<step>`."""
    import ray

    final = hf_root(run_dir) / f"step_{step}"
    tmp = fresh_tmp(final)
    try:
        parts = ray.get([a.write_hf_shards.remote(str(tmp)) for a in trainers])
        finalize(tmp, final, parts, model_dir, export_dtype(cfg), cfg.model.tokenizer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(run_dir, cfg.checkpoint.keep_last)
    log.info("Hugging Face checkpoint: %s", final)
    return final


# ------------------------------------------------------------------------------------------------ offline
def run_config_path(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir}: no config.yaml (the resolved config every run writes): not a run directory?")
    return path


def run_model_dir(cfg: Config, run_dir: str | os.PathLike) -> str:
    """The HF directory the run started from (its config and tokenizer go with the export)."""
    from pipeline.modeling import INIT_DIR

    path = Path(cfg.model.path) if cfg.model.path else Path(run_dir) / INIT_DIR
    if not (path / "config.json").is_file():
        raise ExportError(f"{path}: the run's start model (model.path, or the run's {INIT_DIR}) has no config.json")
    return str(path)


def trainer_checkpoint(run_dir: str | os.PathLike, step: int | None) -> tuple[int, Path]:
    """(step, its trainer directory): `step`, or the latest complete checkpoint."""
    from pipeline.runtime import checkpoint

    if step is None:
        path = checkpoint.latest_checkpoint(run_dir)
        if path is None:
            raise ExportError(f"{run_dir}: no complete checkpoint under {checkpoint.checkpoint_root(run_dir)}")
    else:
        path = checkpoint.checkpoint_root(run_dir) / f"step_{step:08d}"
        if not (path / "state.json").is_file():
            have = [p.name for p in sorted(checkpoint.checkpoint_root(run_dir).glob("step_*"))]
            raise ExportError(f"--step {step}: no complete checkpoint at {path} (have: {', '.join(have) or 'none'})")
    checkpoint.verify(path)  # against its manifest: a corrupt or planted file is named before DCP unpickles anything
    state = json.loads((path / "state.json").read_text())
    return int(state["step"]), path / "trainer"


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, step: int | None = None) -> Path:
    """`dapo export`: the HF checkpoint of a run's trainer checkpoint (see the module docstring). Default `out`:
    `<run>/hf/step_<step>`."""
    from pipeline.config import load_config

    cfg_path = run_config_path(run_dir)
    cfg = load_config(cfg_path)
    model_dir = run_model_dir(cfg, run_dir)
    step, trainer_dir = trainer_checkpoint(run_dir, step)
    final = Path(out) if out else hf_root(run_dir) / f"step_{step}"
    check_replaceable(final)
    dtype = export_dtype(cfg)
    tmp = fresh_tmp(final)
    try:
        if cfg.trainer.backend == "megatron":
            parts = _megatron_parts(cfg, cfg_path, model_dir, trainer_dir, tmp)
        else:
            parts = [_fsdp_part(model_dir, trainer_dir, tmp, dtype)]
        finalize(tmp, final, parts, model_dir, dtype, cfg.model.tokenizer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fsdp_part(model_dir: str, trainer_dir: Path, out: Path, dtype: torch.dtype) -> dict[str, str]:
    """The fsdp backend's DCP checkpoint (any number of ranks) read into one float32 model, in this process."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    if not (trainer_dir / "dcp" / ".metadata").is_file():
        raise ExportError(f"{trainer_dir / 'dcp'}: no DCP checkpoint (trainer.backend=fsdp)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(trainer_dir / "dcp"), no_dist=True)
    return write_rank_shards(state["model"].items(), out, "rank00000", dtype, is_tied(model_dir))


def _megatron_parts(cfg: Config, cfg_path: Path, model_dir: str, trainer_dir: Path, out: Path) -> list[dict[str, str]]:
    """The layout's world size of gloo CPU processes; each builds its rank of the megatron backend, loads its shard
    with the backend's own `load` and writes what its `named_hf_weights` yields."""
    from pipeline.runtime.wiring import spawn_megatron

    if not (trainer_dir / "megatron").is_dir():
        raise ExportError(f"{trainer_dir / 'megatron'}: no megatron dist-checkpoint (trainer.backend=megatron)")
    parts_dir = out / ".parts"
    parts_dir.mkdir()
    world = cfg.trainer.world_size
    spawn_megatron(_megatron_rank, world, str(cfg_path), model_dir, str(trainer_dir), str(out), timeout_s=1800.0)
    parts = [json.loads((parts_dir / f"{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(parts_dir)
    return parts


def _megatron_rank(rank: int, world: int, port: int, cfg_path: str, model_dir: str, trainer_dir: str, out: str) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes on gloo, whatever the machine has
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.runtime.wiring import build_backend, init_megatron_dist

    init_megatron_dist(rank, world, port)
    cfg = load_config(cfg_path)
    backend = build_backend(cfg, rank, world)
    backend.setup(model_dir)
    backend.load(trainer_dir)
    part = write_backend_shards(backend, model_dir, out, export_dtype(cfg))
    (Path(out) / ".parts" / f"{rank}.json").write_text(json.dumps(part))
    dist.barrier()
    dist.destroy_process_group()


def export_main(argv: list[str]) -> int:
    """`dapo export RUN_DIR [--step N] [--out DIR]`."""
    import argparse
    import sys

    from pipeline.config import ConfigError
    from pipeline.runtime.checkpoint import CheckpointError

    p = argparse.ArgumentParser(prog="dapo export", description="a run's trainer checkpoint as a Hugging Face model")
    p.add_argument("run_dir", help="the run directory (runs/<run>: config.yaml, checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/hf/step_N)")
    args = p.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.step)
    except (ExportError, ConfigError, CheckpointError) as e:
        print(f"dapo export: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
