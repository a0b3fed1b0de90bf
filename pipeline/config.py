"""Typed configuration: the schema of pipeline.contracts.config loaded as OmegaConf structured configs, validated.

Contract:
- `load_config(path, overrides)` merges, in order, the dataclass defaults, the YAML preset (and any preset it
  names under `base:`, resolved relative to it), and dotted command-line overrides (`trainer.lr=2e-6`).
- Unknown keys, wrong types, out-of-range values (every numeric field with a range: `_RANGES`, `_POSITIVE`; every
  float finite) and impossible combinations raise `ConfigError` whose message starts with the offending key path
  (`trainer.parallel.tp: ...`). A YAML file that is not UTF-8, not valid YAML or not a mapping raises one that starts
  with the file and line. The reward functions (`algorithm.reward_fn`, `eval.reward_fn`) are imported here, so a
  missing module is found before any process starts.
- `check_local_paths(cfg)` (the CLI and train() call it; presets carry placeholder paths, so validate() does not)
  checks that the local data files, model directory and tokenizer path exist.
- The result is a plain `Config` dataclass tree (no OmegaConf objects leak past this module).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.contracts.config import (
    AlgorithmConfig,
    CheckpointConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    EngineConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    OverlongConfig,
    ParallelConfig,
    RolloutConfig,
    TinyModelConfig,
    TrainerConfig,
    WandbConfig,
    WeightSyncConfig,
)

# The schema lives in pipeline.contracts.config (the engines read it from there); it is re-exported here, so
# `from pipeline.config import TrainerConfig` names the same classes.
__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "Layout",
    "LoggingConfig",
    "ModelConfig",
    "OverlongConfig",
    "ParallelConfig",
    "RELEASE_TAGS",
    "ROUTED_EXPERTS_FLAG",
    "RolloutConfig",
    "TinyModelConfig",
    "TrainerConfig",
    "WandbConfig",
    "WeightSyncConfig",
    "check_local_paths",
    "engine_api_key",
    "layout",
    "load_config",
    "load_reward_fn",
    "model_context_length",
    "to_yaml",
    "validate",
]


# --------------------------------------------------------------------------------------------------- loading
_CHOICES: dict[str, tuple[str, ...]] = {
    "engine.backend": ("local", "sglang", "external"),
    "rollout.partial_rollout": ("wait", "abort", "resume"),
    "algorithm.advantage": ("grpo", "drgrpo", "rloo", "reinforce_pp"),
    "algorithm.policy_loss": ("ppo", "gspo", "cispo"),
    "algorithm.loss_agg": ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "algorithm.off_policy": ("behaviour", "decoupled"),
    "algorithm.routing_replay": ("off", "rollout"),
    "algorithm.is_correction": ("none", "tis", "mis"),
    "data.template": ("none", "dapo", "chat"),
    "model.dtype": ("float32", "bfloat16"),
    "trainer.backend": ("fsdp", "megatron"),
    "weight_sync.mode": ("disaggregated", "colocated"),
    "weight_sync.colocated_transport": ("auto", "tensor", "disk"),
    "cluster.placement_strategy": ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"),
    "weight_sync.backend": ("auto", "nccl", "gloo"),
    "weight_sync.pause_mode": ("abort", "retract", "in_place"),
}

_POSITIVE: tuple[str, ...] = (
    "cluster.placement_timeout_s",
    "rollout.n_samples_per_prompt",
    "rollout.max_new_tokens",
    "rollout.max_inflight_per_engine",
    "rollout.max_gen_rounds",
    "engine.num_engines",
    "engine.tp",
    "engine.max_running_requests",
    "engine.max_n",
    "engine.max_batch",
    "engine.max_request_mb",
    "engine.max_weights_request_mb",
    "engine.group_timeout_s",
    "cluster.zmq_max_message_mb",
    "trainer.world_size",
    "trainer.total_steps",
    "trainer.batch_size",
    "trainer.num_minibatches",
    "trainer.micro_batch_size",
    "trainer.logprob_chunk_tokens",
    "trainer.parallel.tp",
    "trainer.parallel.pp",
    "trainer.parallel.vpp",
    "trainer.parallel.cp",
    "trainer.parallel.ep",
    "trainer.parallel.etp",
    "weight_sync.every",
    "data.max_prompt_tokens",
)


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _fail(path: str, msg: str) -> None:
    raise ConfigError(f"{path}: {msg}")


@dataclass(frozen=True)
class Layout:
    """The run's layout, derived once from the config by `layout(cfg)`: the loop, the rollout, the buffer factory,
    the cluster and the simulator read these fields instead of re-deriving them from the config.
    - `colocated`: engines share the trainer ranks' devices (weight_sync.mode=colocated with launched engines; external
      engines are placed by whoever runs them).
    - `releases_memory`: colocated engines give their memory back while the trainer trains.
    - `stream_parts`: in how many parts the loop takes a step's batch from the buffer (> 1: each mini-batch trains as
      soon as its groups are in; not with the decoupled objective, nor while engines release their memory).
    - `max_staleness`, `sync_every`, `batch_size`, `dynamic_sampling`: the bound the rollout admits under and the
      buffer checks, the steps between weight syncs, the groups per step, whether the rollout filters groups.
    - `buffer_capacity`: rollout.buffer_capacity, else (max_staleness + 2) x batch; never below what a sync period
      under the bound may produce, (max_staleness + 1) x sync_every x batch (the buffer raises it with a warning).
    - `dp`: trainer data-parallel size (filled in by config validation).
    - `engine_span`: trainer ranks (GPUs) one colocated engine spans: engine.tp for colocated SGLang engines of
      tp > 1 (engine j on ranks j*tp .. j*tp+tp-1, one node), else 1 (engine i beside rank i).
    """

    colocated: bool
    releases_memory: bool
    stream_parts: int
    batch_size: int
    max_staleness: int
    sync_every: int
    dynamic_sampling: bool
    buffer_capacity: int
    dp: int
    engine_span: int = 1


def layout(cfg: Config) -> Layout:
    r, t, ws = cfg.rollout, cfg.trainer, cfg.weight_sync
    releases = ws.colocated and bool(ws.release_memory)
    colocated = ws.colocated and cfg.engine.backend != "external"
    span = cfg.engine.tp if colocated and cfg.engine.backend == "sglang" and cfg.engine.tp > 1 else 1
    streamed = t.stream_minibatches and cfg.algorithm.off_policy != "decoupled" and not releases
    return Layout(
        colocated=colocated,
        releases_memory=releases,
        stream_parts=t.num_minibatches if streamed else 1,
        batch_size=t.batch_size,
        max_staleness=r.max_staleness,
        sync_every=ws.every,
        dynamic_sampling=cfg.algorithm.dynamic_sampling,
        buffer_capacity=r.buffer_capacity or (r.max_staleness + 2) * t.batch_size,
        dp=t.parallel.dp,
        engine_span=span,
    )


ROUTED_EXPERTS_FLAG = "--enable-return-routed-experts"  # SGLang's server flag (engines/local mirrors it)


def _check_engine_limits(cfg: Config) -> None:
    """The CPU engine's request limits must admit what the run itself sends (else every such request is a 400)."""
    e, ws = cfg.engine, cfg.weight_sync
    if e.backend != "local":
        return
    for path, n in (
        ("rollout.n_samples_per_prompt", cfg.rollout.n_samples_per_prompt),
        ("eval.n_samples", cfg.eval.n_samples),
    ):
        if n > e.max_n:
            _fail("engine.max_n", f"{e.max_n} < {path} {n}: the CPU engine would refuse those requests")
    if (
        ws.mode == "colocated"
        and ws.colocated_transport != "disk"
        and ws.bucket_mb * 4 / 3 + 1 > e.max_weights_request_mb
    ):
        _fail(
            "engine.max_weights_request_mb",
            f"{e.max_weights_request_mb} is below one weight_sync.bucket_mb={ws.bucket_mb} bucket in base64 "
            f"(~{ws.bucket_mb * 4 / 3:.0f} MiB): raise it or lower the bucket",
        )


def validate(cfg: Config) -> Config:
    """Cross-field rules. Fills derived values (trainer.parallel.dp). Returns cfg."""
    if str(cfg.algorithm.routing_replay) in ("False", "false"):  # YAML 1.1 reads a bare `off` as false
        cfg.algorithm.routing_replay = "off"
    _validate_finite(cfg)
    _validate_ranges(cfg)
    for path, choices in _CHOICES.items():
        if _get(cfg, path) not in choices:
            _fail(path, f"must be one of {', '.join(choices)}; got {_get(cfg, path)!r}")
    for path in _POSITIVE:
        if _get(cfg, path) < 1:
            _fail(path, f"must be >= 1; got {_get(cfg, path)}")
    _check_engine_limits(cfg)
    if cfg.rollout.max_staleness < 0:
        _fail("rollout.max_staleness", f"must be >= 0; got {cfg.rollout.max_staleness}")
    if not 0 <= cfg.rollout.over_admission <= 8:
        _fail("rollout.over_admission", f"must be in [0, 8] (x trainer.batch_size); got {cfg.rollout.over_admission}")

    a = cfg.algorithm
    if not 0 <= a.eps_low < 1:
        _fail("algorithm.eps_low", f"must be in [0, 1); got {a.eps_low}")
    if a.eps_high < a.eps_low:
        _fail("algorithm.eps_high", f"must be >= algorithm.eps_low ({a.eps_low}); got {a.eps_high}")
    if a.dual_clip_c and a.dual_clip_c <= 1.0:
        _fail("algorithm.dual_clip_c", f"must be 0 (off) or > 1; got {a.dual_clip_c}")
    if ":" not in a.reward_fn:
        _fail("algorithm.reward_fn", f"must be 'module:function'; got {a.reward_fn!r}")
    if a.overlong.cache_len < 0 or a.overlong.cache_len >= cfg.rollout.max_new_tokens and a.overlong.soft_punish:
        _fail(
            "algorithm.overlong.cache_len",
            f"must be in [0, rollout.max_new_tokens={cfg.rollout.max_new_tokens}); got {a.overlong.cache_len}",
        )

    if a.routing_replay == "rollout" and ROUTED_EXPERTS_FLAG not in cfg.engine.extra_args:
        # derived: the engines (SGLang and the CPU engine) return routed experts only when started with it
        cfg.engine.extra_args = [*cfg.engine.extra_args, ROUTED_EXPERTS_FLAG]

    t, p = cfg.trainer, cfg.trainer.parallel
    model_parallel = p.tp * p.pp * p.cp
    if t.world_size % model_parallel:
        _fail("trainer.parallel", f"tp*pp*cp = {model_parallel} does not divide trainer.world_size = {t.world_size}")
    if p.dp == 0:
        p.dp = t.world_size // model_parallel
    if model_parallel * p.dp != t.world_size:
        _fail(
            "trainer.parallel.dp",
            f"tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp} = {model_parallel * p.dp} != trainer.world_size = {t.world_size}",
        )
    if t.backend == "fsdp" and model_parallel != 1:
        _fail("trainer.parallel", "the fsdp backend supports data parallelism only (tp = pp = cp = 1); use megatron")
    if (p.tp * p.cp * p.dp) % (p.ep * p.etp):
        _fail(
            "trainer.parallel.ep",
            f"ep*etp = {p.ep}*{p.etp} must divide the ranks of a pipeline stage, tp*cp*dp = {p.tp}*{p.cp}*{p.dp}",
        )
    if p.cp > 1 and t.backend == "megatron" and t.gpus_per_rank > 0:
        # On GPUs context parallelism is transformer-engine's attention; our SDPACoreAttention runs it on CPU only.
        if importlib.util.find_spec("transformer_engine") is None:
            _fail(
                "trainer.parallel.cp",
                f"context parallelism (cp = {p.cp}) on GPUs needs transformer-engine's attention, and "
                "transformer_engine is not installed; install it on the GPU machines or set cp = 1",
            )
    if p.vpp > 1 and p.pp == 1:
        _fail("trainer.parallel.vpp", "virtual pipeline stages need trainer.parallel.pp > 1")
    samples = t.batch_size * cfg.rollout.n_samples_per_prompt
    if t.batch_size % t.num_minibatches:
        _fail("trainer.num_minibatches", f"must divide trainer.batch_size = {t.batch_size}")
    per_rank = samples // t.num_minibatches
    if per_rank % p.dp:
        _fail("trainer.parallel.dp", f"must divide the samples of a mini-batch ({per_rank})")
    if (per_rank // p.dp) % t.micro_batch_size and t.max_tokens_per_micro_batch == 0:
        _fail(
            "trainer.micro_batch_size",
            f"must divide the samples per rank and mini-batch ({per_rank // p.dp} = batch_size*G/num_minibatches/dp)",
        )
    if layout(cfg).colocated:
        if cfg.engine.num_engines > t.world_size:
            _fail(
                "engine.num_engines",
                f"colocated: each engine shares a trainer rank's devices, so at most trainer.world_size = "
                f"{t.world_size} engines; got {cfg.engine.num_engines}",
            )
        if layout(cfg).engine_span > 1:
            _validate_colocated_span(cfg)
    for path in ("weight_sync.bucket_mb", "weight_sync.timeout_s", "engine.health_timeout_s"):
        if _get(cfg, path) <= 0:
            _fail(path, f"must be > 0; got {_get(cfg, path)}")
    _validate_colocated(cfg)
    _validate_context_length(cfg)
    if cfg.engine.backend == "external" and not cfg.engine.urls:
        _fail("engine.urls", "the external backend needs at least one URL")
    if not cfg.model.path and not cfg.model.tokenizer.startswith("builtin:"):
        _fail("model.tokenizer", "a model built from config (empty model.path) needs a builtin: tokenizer")
    _validate_reward_fns(cfg)
    return cfg


# Per-field ranges: key path -> (check, what it must be). Floats are also checked finite (_validate_finite).
_RANGES: dict[str, tuple[Any, str]] = {
    "model.tiny.hidden_size": (lambda v: v >= 1, ">= 1"),
    "model.tiny.intermediate_size": (lambda v: v >= 1, ">= 1"),
    "model.tiny.num_hidden_layers": (lambda v: v >= 1, ">= 1"),
    "model.tiny.num_attention_heads": (lambda v: v >= 1, ">= 1"),
    "model.tiny.num_key_value_heads": (lambda v: v >= 1, ">= 1"),
    "model.tiny.max_position_embeddings": (lambda v: v >= 1, ">= 1"),
    "model.tiny.rope_theta": (lambda v: v > 0, "> 0"),
    "model.warm_start_steps": (lambda v: v >= 0, ">= 0"),
    "data.synthetic_size": (lambda v: v >= 1, ">= 1"),
    "engine.gpus_per_engine": (lambda v: v >= 0, ">= 0"),
    "engine.base_port": (lambda v: 0 <= v <= 65535, "in [0, 65535]"),
    "engine.mem_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "engine.startup_timeout_s": (lambda v: v > 0, "> 0"),
    "engine.request_timeout_s": (lambda v: v > 0, "> 0"),
    "engine.max_retries": (lambda v: v >= 0, ">= 0"),
    "engine.threads": (lambda v: v >= 1, ">= 1"),
    "engine.max_restarts": (lambda v: v >= 0, ">= 0"),
    "engine.random_seed": (lambda v: v >= -1, ">= -1 (-1: random)"),
    "rollout.temperature": (lambda v: v > 0, "> 0 (logprobs are taken at this temperature)"),
    "rollout.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "rollout.top_k": (lambda v: v == -1 or v >= 1, "-1 (off) or >= 1"),
    "rollout.buffer_capacity": (lambda v: v >= 0, ">= 0 (0: derived)"),
    "algorithm.eps_high": (lambda v: v >= 0, ">= 0"),
    "algorithm.is_cap": (lambda v: v > 0, "> 0"),
    "algorithm.log_ratio_clamp": (lambda v: v > 0, "> 0"),
    "algorithm.kl_coef": (lambda v: v >= 0, ">= 0"),
    "algorithm.entropy_coef": (lambda v: v >= 0, ">= 0"),
    "algorithm.overlong.factor": (lambda v: v >= 0, ">= 0"),
    "algorithm.reward_timeout_s": (lambda v: v > 0, "> 0"),
    "algorithm.reward_workers": (lambda v: v >= 1, ">= 1"),
    "trainer.gpus_per_rank": (lambda v: v >= 0, ">= 0"),
    "trainer.max_tokens_per_micro_batch": (lambda v: v >= 0, ">= 0 (0: off)"),
    "trainer.lr": (lambda v: v > 0, "> 0"),
    "trainer.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "trainer.weight_decay": (lambda v: v >= 0, ">= 0"),
    "trainer.grad_clip": (lambda v: v > 0, "> 0"),
    "trainer.threads": (lambda v: v >= 1, ">= 1"),
    "trainer.parallel.dp": (lambda v: v >= 0, ">= 0 (0: derived)"),
    "weight_sync.prefetch": (lambda v: v >= 0, ">= 0"),
    "weight_sync.master_port": (lambda v: 0 <= v <= 65535, "in [0, 65535]"),
    "weight_sync.dtype": (lambda v: v in ("", "bfloat16", "float16", "float32"), "empty, bfloat16, float16 or float32"),
    "cluster.num_cpus": (lambda v: v >= 0, ">= 0 (0: all)"),
    "cluster.num_gpus": (lambda v: v >= 0, ">= 0"),
    "logging.level": (
        lambda v: v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        "DEBUG, INFO, WARNING, ERROR or CRITICAL",
    ),
    "checkpoint.every": (lambda v: v >= 0, ">= 0 (0: only at the end and on signals)"),
    "checkpoint.keep_last": (lambda v: v >= 1, ">= 1"),
    "eval.every": (lambda v: v >= 0, ">= 0 (0: off)"),
    "eval.n_samples": (lambda v: v >= 1, ">= 1"),
    "eval.max_prompts": (lambda v: v >= 0, ">= 0 (0: all)"),
    "eval.temperature": (lambda v: v >= 0, ">= 0 (0: greedy)"),
}


def _validate_ranges(cfg: Config) -> None:
    for path, (ok, what) in _RANGES.items():
        value = _get(cfg, path)
        if not ok(value):
            _fail(path, f"must be {what}; got {value!r}")
    betas = cfg.trainer.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        _fail("trainer.betas", f"must be a pair [beta1, beta2], each in [0, 1); got {list(betas)}")
    tiny = cfg.model.tiny
    if not cfg.model.path and tiny.num_attention_heads % tiny.num_key_value_heads:
        _fail(
            "model.tiny.num_key_value_heads", f"must divide model.tiny.num_attention_heads = {tiny.num_attention_heads}"
        )


def _validate_finite(node: Any, prefix: str = "") -> None:
    """Every float in the tree is finite: NaN passes every `<` check, so the range checks alone would let it in."""
    for f in dataclasses.fields(node):
        value, path = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate_finite(value, f"{path}.")
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            _fail(path, f"must be a finite number; got {value!r}")


# Configs saved before the package layout (a run directory being resumed) name the module by its old path
# (written as two literals so that a rename of the path never rewrites this key).
_MOVED = {"pipeline.flow.rewards": "pipeline.flow.rewards"}


def load_reward_fn(fn_path: str, key: str = "algorithm.reward_fn") -> Any:
    """Import `module:function`; ValueError naming `key` when that is impossible."""
    module_name, sep, attr = fn_path.partition(":")
    module_name = _MOVED.get(module_name, module_name)
    if not sep or not module_name or not attr:
        raise ValueError(f"{key}: must be 'module:function'; got {fn_path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ValueError(f"{key}: cannot import module {module_name!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{key}: module {module_name!r} has no function {attr!r}")
    return fn


def _validate_reward_fns(cfg: Config) -> None:
    """Import the reward functions now, so that a missing module is found before any process starts."""
    for key in ("algorithm.reward_fn", "eval.reward_fn"):
        spec = _get(cfg, key)
        if spec:
            try:
                load_reward_fn(spec, key)
            except ValueError as e:
                raise ConfigError(str(e)) from None


def model_context_length(cfg: Config) -> tuple[int, str]:
    """(the engines' context length, the key it comes from), or (0, "") where unknown: a model path that is not a
    local directory with a config.json, or a model built from config for engines other than the CPU engine (base
    presets validate with the tiny model as a placeholder for the real one)."""
    if cfg.engine.context_length > 0:
        return cfg.engine.context_length, "engine.context_length"
    if not cfg.model.path:
        if cfg.engine.backend != "local":
            return 0, ""
        return cfg.model.tiny.max_position_embeddings, "model.tiny.max_position_embeddings"
    config_json = Path(cfg.model.path) / "config.json"
    try:
        hf = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return 0, ""
    hf = hf.get("text_config", hf) if isinstance(hf.get("text_config"), dict) else hf
    n = hf.get("max_position_embeddings")
    return (int(n), f"max_position_embeddings of {config_json}") if isinstance(n, int) and n > 0 else (0, "")


def _validate_context_length(cfg: Config) -> None:
    if cfg.engine.context_length < 0:
        _fail("engine.context_length", f"must be >= 0 (0: the model's); got {cfg.engine.context_length}")
    ctx, source = model_context_length(cfg)
    need = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    if ctx and need > ctx:
        _fail(
            "rollout.max_new_tokens",
            f"data.max_prompt_tokens + rollout.max_new_tokens = {cfg.data.max_prompt_tokens} + "
            f"{cfg.rollout.max_new_tokens} = {need} exceeds the context length {ctx} ({source}); the engines would "
            "refuse such requests: lower them or raise engine.context_length (up to what the model supports)",
        )


RELEASE_TAGS = ("kv_cache", "weights", "cuda_graph")  # SGLang's GPU memory types (sglang/srt/constants.py)


def _validate_colocated_span(cfg: Config) -> None:
    """Colocated SGLang engines of tp = k > 1: engine j runs on trainer ranks j*k .. j*k+k-1 (one node), on their
    GPUs (pipeline/runtime/cluster.py `placement_specs`, `engine_devices`)."""
    e, t, ws, k = cfg.engine, cfg.trainer, cfg.weight_sync, cfg.engine.tp
    if e.gpus_per_engine != k:
        _fail(
            "engine.gpus_per_engine",
            f"colocated with engine.tp = {k}: an engine spans the GPUs of {k} trainer ranks, so gpus_per_engine "
            f"must be {k}; got {e.gpus_per_engine:g}",
        )
    if t.world_size % k:
        _fail("engine.tp", f"colocated: engine.tp = {k} must divide trainer.world_size = {t.world_size}")
    if e.num_engines > t.world_size // k:
        _fail(
            "engine.num_engines",
            f"colocated: engines of tp = {k} on trainer.world_size = {t.world_size} GPUs: at most "
            f"{t.world_size // k}; got {e.num_engines}",
        )
    per_node = cfg.cluster.gpus_per_node
    if per_node and (k > per_node or per_node % k):
        _fail(
            "engine.tp",
            f"colocated: an engine's {k} GPUs are on one node, so engine.tp must divide cluster.gpus_per_node = "
            f"{per_node}",
        )
    if not 0 < t.gpus_per_rank <= 1:
        _fail(
            "trainer.gpus_per_rank",
            f"colocated with engine.tp = {k}: each rank holds (a share of) one GPU that its engine shares; must be "
            f"in (0, 1], got {t.gpus_per_rank:g}",
        )
    if not ws.release_memory and e.mem_fraction + t.gpus_per_rank > 1:
        _fail(
            "engine.mem_fraction",
            f"colocated with engine.tp = {k} and no weight_sync.release_memory, the engine keeps its memory while "
            f"the trainer trains: mem_fraction {e.mem_fraction:g} + trainer.gpus_per_rank {t.gpus_per_rank:g} > 1 "
            "GPU; set weight_sync.release_memory or lower them",
        )


def _validate_colocated(cfg: Config) -> None:
    ws, e = cfg.weight_sync, cfg.engine
    if ws.colocated_transport == "tensor" and ws.mode == "colocated" and e.backend == "sglang":
        _fail(
            "weight_sync.colocated_transport",
            "tensor sends safetensors bytes that only the CPU engine reads (SGLang expects a pickle); use disk or auto",
        )
    if not ws.disk_dir:
        _fail("weight_sync.disk_dir", "must not be empty")
    bad = [t for t in ws.release_memory if t not in RELEASE_TAGS]
    if bad:
        _fail("weight_sync.release_memory", f"unknown tag {bad[0]!r}; tags are {', '.join(RELEASE_TAGS)}")
    if ws.release_memory and ws.mode != "colocated":
        _fail("weight_sync.release_memory", "only with weight_sync.mode=colocated (engines and trainer share GPUs)")
    backup = "--enable-weights-cpu-backup" in e.extra_args
    if "weights" in ws.release_memory and ws.every != 1 and not backup:
        _fail(
            "weight_sync.release_memory",
            f"releasing weights loses them (SGLang restores them only with --enable-weights-cpu-backup in "
            f"engine.extra_args), so every training step must be followed by a sync: weight_sync.every must be 1, "
            f"got {ws.every}",
        )


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: base: cycle through {' -> '.join(map(str, seen))}")
    node = _parse_yaml(path)
    base = node.pop("base", None) if OmegaConf.is_dict(node) else None
    if base:
        parent = _load_yaml((path.parent / base).resolve(), (*seen, path))
        return OmegaConf.merge(parent, node)
    return node


def _parse_yaml(path: Path) -> Any:
    """The file as an OmegaConf mapping; ConfigError naming the file (and line) for bad bytes, bad YAML, or a top
    level that is not a mapping."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    try:
        node = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML ({problem})") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...); got a list")
    return node


def check_local_paths(cfg: Config, train: bool = True) -> None:
    """The local files a run reads exist: data.train_path and data.eval_path (each source that is a file, not
    `synthetic:`, `hf://` or `bench:`), model.path (a Hugging Face model directory) and model.tokenizer when it
    is a local path. Separate from validate() because presets carry placeholder paths (`dapo config show` works on
    them); the CLI and train() call it before anything starts. `train=False` (`dapo eval`): not data.train_path."""
    for key in ("data.train_path", "data.eval_path") if train else ("data.eval_path",):
        for source in filter(None, (s.strip() for s in _get(cfg, key).split(","))):
            if source.startswith(("synthetic:", "hf://", "bench:")):
                continue
            file = Path(source.partition("?")[0]).expanduser()
            if not file.is_file():
                _fail(key, f"dataset file not found: {file}" + ("" if file.is_absolute() else f" (from {os.getcwd()})"))
    if cfg.model.path:
        model = Path(cfg.model.path).expanduser()
        if not model.is_dir():
            _fail("model.path", f"{cfg.model.path!r} is not a directory")
        if not (model / "config.json").is_file():
            _fail("model.path", f"{cfg.model.path!r} has no config.json (expected a Hugging Face model directory)")
    tok = cfg.model.tokenizer
    if not tok.startswith("builtin:") and _looks_local(tok) and not Path(tok).expanduser().exists():
        _fail("model.tokenizer", f"{tok!r}: no such file or directory")


def _looks_local(spec: str) -> bool:
    """A path rather than a hub id (`name` or `org/name`): absolute, ~ or ./-relative, or deeper than org/name."""
    return spec.startswith(("/", "~", "./", "../")) or spec.count("/") > 1


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML preset (with `base:` chain) <- dotted overrides; then validate()."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml(Path(path).resolve()))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"{bad[0]}: an override must look like key.path=value")
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]}: required, but not set")
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None
    return validate(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, with secrets masked."""
    d = dataclasses.asdict(cfg)
    for key in ("api_key", "admin_api_key"):
        if d["engine"][key]:
            d["engine"][key] = "***"
    return OmegaConf.to_yaml(OmegaConf.create(d))


def engine_api_key(cfg: Config) -> str:
    """The engines' API key: config first, then the DAPO_ENGINE_API_KEY environment variable."""
    return cfg.engine.api_key or os.environ.get("DAPO_ENGINE_API_KEY", "")
