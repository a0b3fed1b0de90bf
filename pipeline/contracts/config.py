"""The run's configuration schema: typed dataclasses, one section per part of the system.

Contract: this is the one configuration type both sides share. The pipeline builds it (`pipeline.config.load_config`
merges defaults, the YAML preset and overrides through OmegaConf, then `validate()` checks ranges and combinations and
derives the run's layout); the engines and trainer backends only read the sections they are handed. Field defaults
and docstrings are the reference for every key; the few `__post_init__` checks are those that need nothing but the
field itself. `ConfigError` is the one error type of configuration problems: its message starts with the key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration problem; the message names the key path."""


# --------------------------------------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Architecture of a Qwen2-style model built from config (used when `model.path` is empty)."""

    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 256
    """SwiGLU inner width."""
    num_hidden_layers: int = 2
    """Transformer layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (GQA)."""
    max_position_embeddings: int = 1024
    """Longest sequence (prompt + response) the model supports."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_word_embeddings: bool = True
    """Share the input embedding and the LM head."""


@dataclass
class ModelConfig:
    path: str = ""
    """A Hugging Face checkpoint directory. Empty: build `tiny` from config with the built-in tokenizer."""
    tokenizer: str = "builtin:char"
    """Tokenizer: `builtin:char` (a local character-level tokenizer, vocab < 128) or a path/HF id."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Architecture when no checkpoint path is given."""
    init_seed: int = 0
    """Seed for the random initialisation of a model built from config."""
    warm_start_steps: int = 0
    """Supervised warm-start steps on the training set's reference solutions before RL (0: none). Cached."""
    dtype: str = "float32"
    """Compute dtype of the trainer (float32 or bfloat16) and the dtype its weight syncs send. With bfloat16 the
    master weights, gradients and AdamW state stay float32 (mixed precision, both backends)."""


# --------------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    train_path: str = MISSING
    """Training prompts: a .jsonl/.parquet path, `hf://org/name[:split]`, or `synthetic:<task>`
    (e.g. `synthetic:arith`)."""
    eval_path: str = ""
    """Held-out prompts in the same formats; empty disables evaluation."""
    prompt_key: str = "prompt"
    """Row field holding the prompt text (or a chat message list)."""
    answer_key: str = "answer"
    """Row field holding the reference answer."""
    id_key: str = ""
    """Row field with a stable id; empty: the row index."""
    template: str = "none"
    """Prompt template applied to the prompt field: none | dapo (wrap the raw problem) | chat (tokenizer chat
    template)."""
    max_prompt_tokens: int = 512
    """Prompts longer than this are rejected at load time, naming the row."""
    shuffle: bool = True
    """Shuffle each epoch (seeded by `trainer.seed`)."""
    synthetic_size: int = 4096
    """Rows generated for a `synthetic:` source."""
    dedup: bool = False
    """Keep only the first row of each distinct prompt (before templating and tokenising). Set per source as
    `path?dedup=true`: the hub's DAPO-Math-17k file holds each of its ~17.9k problems ~100 times, while an avg@k eval
    file (AIME 2024, 30 x 32) must keep its copies."""


# --------------------------------------------------------------------------------------------------- engines
@dataclass
class EngineConfig:
    backend: str = "local"
    """Inference engine: local (CPU engine speaking SGLang's HTTP protocol) | sglang (launch SGLang servers) |
    external."""
    num_engines: int = 1
    """Engine servers to run (data parallel across engines)."""
    tp: int = 1
    """Tensor parallelism inside one engine (SGLang `--tp`)."""
    gpus_per_engine: float = 0.0
    """GPUs reserved per engine actor (0 on CPU)."""
    urls: list[str] = field(default_factory=list)
    """`external` backend: URLs of already running SGLang-compatible servers."""
    host: str = "127.0.0.1"
    """Bind address of the servers we launch (loopback unless configured)."""
    base_port: int = 0
    """First port; 0 picks free ports."""
    api_key: str = ""
    """API key required by the servers and sent by the client (or env DAPO_ENGINE_API_KEY). Never logged. Empty
    (and no env) with engines the run launches (local, sglang): each run makes a random key
    (pipeline/runtime/run_security.py) and hands it to the servers through the environment (CPU engine) or a 0600
    config file (SGLang `--config`), never on the command line."""
    mem_fraction: float = 0.7
    """SGLang `--mem-fraction-static`."""
    max_running_requests: int = 64
    """Largest running batch of one engine (continuous batching)."""
    startup_timeout_s: float = 300.0
    """Seconds to wait for /health before failing with the server's log tail."""
    request_timeout_s: float = 600.0
    """Per-request HTTP timeout."""
    max_retries: int = 3
    """Retries with backoff on connection errors before an engine is declared dead."""
    extra_args: list[str] = field(default_factory=list)
    """Extra command-line arguments for the server."""
    threads: int = 1
    """CPU threads per local engine (torch.set_num_threads)."""
    max_restarts: int = 3
    """A crashed or hung engine is restarted (and given the current weights) up to this many times, then dropped."""
    health_timeout_s: float = 30.0
    """An engine whose process is alive but whose GET /health gives no 200 within this many seconds is hung: it is
    killed and restarted like a crashed one (checked between batches and after a failed weight sync)."""
    context_length: int = 0
    """Longest prompt + response an engine serves (SGLang `--context-length`); 0: the model's max_position_embeddings.
    data.max_prompt_tokens + rollout.max_new_tokens must fit (SGLang answers 400 to a request that does not)."""
    admin_api_key: str = ""
    """SGLang >= 0.5.23 `--admin-api-key`: required on the control routes (weights, pause, flush, abort), where the
    plain API key is then refused; sent by the client on exactly those routes. Never logged."""
    deterministic_inference: bool = False
    """SGLang `--enable-deterministic-inference` (batch-invariant kernels: same output whatever the batch)."""
    skip_tokenizer_init: bool = False
    """SGLang `--skip-tokenizer-init` (token ids in and out; then SGLang stops only at the model's EOS ids)."""
    random_seed: int = -1
    """SGLang `--random-seed`; -1: SGLang's default (random)."""
    max_n: int = 256
    """CPU engine `--max-n`: largest `sampling_params.n` one request may ask for (400 above). SGLang has no such
    limit."""
    max_batch: int = 4096
    """CPU engine `--max-batch`: most generation requests one body may create (prompts x n; 400 above)."""
    max_request_mb: float = 32.0
    """CPU engine `--max-request-mb`: largest request body in MiB (413 above, refused before it is read)."""
    max_weights_request_mb: float = 1536.0
    """CPU engine `--max-weights-request-mb`: largest /update_weights_from_tensor body in MiB (colocated tensor sync
    sends one weight_sync.bucket_mb bucket per request, base64: ~1.34 x the bucket)."""
    group_timeout_s: float = 120.0
    """CPU engine `--group-timeout-s`: longest wait of /init_weights_update_group for the other ranks (a dead master
    then fails the join instead of hanging the route); it is also the group's timeout for each broadcast (one
    bucket), so keep it above the time one bucket takes to prepare and send."""
    weight_version: str = ""
    """SGLang `--weight-version`: the version the engines report before the first sync; empty: SGLang's default."""


# --------------------------------------------------------------------------------------------------- rollout
@dataclass
class RolloutConfig:
    n_samples_per_prompt: int = 16
    """G: responses per prompt (a group)."""
    max_new_tokens: int = 20480
    """Longest response (L_max)."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = -1
    """Top-k sampling (-1: off)."""
    max_inflight_per_engine: int = 64
    """Requests in flight per engine; the manager keeps every engine at this level."""
    max_staleness: int = 1
    """s: a sample made by a policy more than s versions older than the one being trained is never used.
    0 = synchronous on-policy; 1 = one-step off-policy."""
    over_admission: float = 0.5
    """With dynamic sampling, groups admitted beyond what the staleness bound can keep, against the expected keep
    rate, at most this x trainer.batch_size in flight (the bound stays hard: a surplus group that finishes kept is
    re-queued, its tokens wasted; see pipeline/flow/admission.py). 0: every unfinished group counts as kept."""
    partial_rollout: str = "resume"
    """At a weight update, in-flight requests are: wait (finished first) | abort (aborted, prompt re-queued) |
    resume (aborted, prompt + generated prefix resent under the new weights, tokens tagged with versions; nothing
    generated is thrown away, and benchmarks/bench_pipeline.py measures it fastest)."""
    max_gen_rounds: int = 8
    """Dynamic sampling: cap on how many times a prompt is regenerated after being filtered, per epoch."""
    buffer_capacity: int = 0
    """Most finished groups held in the buffer (0: (max_staleness + 2) x batch)."""
    zmq_address: str = ""
    """ZMQ endpoint of the buffer's PULL socket; empty: tcp://127.0.0.1:<free port>."""


# --------------------------------------------------------------------------------------------------- algorithm
@dataclass
class OverlongConfig:
    soft_punish: bool = True
    """DAPO soft overlong punishment (Eq. 13)."""
    cache_len: int = 4096
    """L_cache: the punishment ramps over the last L_cache tokens before L_max."""
    factor: float = 1.0
    """Scale of the punishment (1.0 gives rewards in [-2, 1])."""
    filter: bool = False
    """Overlong filtering: mask truncated responses from the loss."""


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    """grpo (group mean/std) | drgrpo (no std) | rloo | reinforce_pp."""
    policy_loss: str = "ppo"
    """ppo (clip-higher PPO) | gspo (sequence ratio) | cispo (clipped IS weight, REINFORCE)."""
    eps_low: float = 0.2
    """Lower clip: ratio >= 1 - eps_low."""
    eps_high: float = 0.28
    """Upper clip (Clip-Higher): ratio <= 1 + eps_high."""
    dual_clip_c: float = 0.0
    """Dual-clip bound for negative advantages (0: off; else > 1, e.g. 3)."""
    loss_agg: str = "token-mean"
    """token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm."""
    dynamic_sampling: bool = True
    """Drop groups whose `acc` has zero std (all correct or all wrong)."""
    off_policy: str = "behaviour"
    """behaviour (ratio against the engine's logprobs) | decoupled (recomputed proximal policy + IS weights)."""
    is_correction: str = "tis"
    """Importance weights behaviour->proximal in decoupled mode: none | tis (truncated) | mis (masked)."""
    is_cap: float = 2.0
    """Truncation (tis) or mask (mis) threshold of the importance weights."""
    routing_replay: str = "off"
    """MoE rollout routing replay (R3): off | rollout. With rollout the engines return the experts every token was
    routed to (SGLang's return_routed_experts; validation adds --enable-return-routed-experts to engine.extra_args)
    and the megatron trainer sends each token to those experts (training forward and the decoupled-PPO proximal
    pass), the gate weights still coming from its own router logits. Dense models ignore it."""
    routing_mismatch_probe: bool = True
    """With recorded routing: one extra no-grad forward per mini-batch in the other routing mode, so that the
    train-inference logprob mismatch is reported with and without replay (rollout/*_replay, rollout/*_noreplay)."""
    log_ratio_clamp: float = 20.0
    """|log ratio| is clamped to this before exp for stability."""
    kl_coef: float = 0.0
    """KL penalty (DAPO: none)."""
    entropy_coef: float = 0.0
    """Entropy bonus (DAPO: none)."""
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    """Overlong reward shaping and filtering."""
    reward_fn: str = "pipeline.flow.rewards:dapo_math_reward"
    """Reward function by dotted path `module:function` (see pipeline/flow/rewards.py for the signature)."""
    reward_timeout_s: float = 10.0
    """A reward call slower than this counts as failed and gets the wrong-answer reward."""
    reward_workers: int = 2
    """Threads scoring responses."""


# --------------------------------------------------------------------------------------------------- trainer
@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor parallel degree (megatron)."""
    pp: int = 1
    """Pipeline parallel degree (megatron)."""
    vpp: int = 1
    """Virtual pipeline stages per rank (megatron interleaved schedule)."""
    cp: int = 1
    """Context parallel degree (megatron: each sequence is split into 2*cp chunks, rank r taking chunks r and
    2*cp-1-r; on GPUs it needs transformer-engine, on CPU our attention runs it)."""
    ep: int = 1
    """Expert parallel degree (megatron MoE)."""
    etp: int = 1
    """Expert tensor parallel degree (megatron MoE; 1 = experts not tp-split, "parallel folding"; set it to tp for
    megatron's own default). ep * etp must divide the ranks of a pipeline stage, tp * cp * dp."""
    dp: int = 0
    """Data parallel degree; 0: derived as world_size / (tp * pp * cp)."""


@dataclass
class TrainerConfig:
    backend: str = "fsdp"
    """fsdp (torch FSDP2/DDP) | megatron (megatron-core GPTModel)."""
    world_size: int = 1
    """Trainer ranks (GPUs, or CPU processes on gloo)."""
    gpus_per_rank: float = 0.0
    """GPUs per trainer rank (0 on CPU)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallelism; checked once: tp * pp * cp * dp == world_size."""
    total_steps: int = 10
    """Trainer steps (one step = one batch of `batch_size` kept groups)."""
    batch_size: int = 512
    """B: kept groups (prompts) per trainer step."""
    num_minibatches: int = 1
    """Optimizer updates per step (the batch is split into this many mini-batches)."""
    stream_minibatches: bool = True
    """With num_minibatches > 1, train each mini-batch as soon as its groups are in the buffer, while the step's
    later groups are still generating (the same groups, order and updates as waiting for the whole batch). Not in
    algorithm.off_policy = decoupled, whose proximal policy must be computed before the step's first update."""
    micro_batch_size: int = 8
    """Samples per forward/backward; gradients accumulate over micro-batches."""
    max_tokens_per_micro_batch: int = 0
    """If > 0, pack micro-batches by token budget instead of `micro_batch_size`."""
    lr: float = 1e-6
    """Learning rate (constant after warm-up)."""
    warmup_steps: int = 10
    """Linear warm-up optimizer steps."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 1
    """Seed for data order, sampling and initialisation."""
    threads: int = 1
    """CPU threads per trainer rank."""
    recompute: bool = False
    """Activation recomputation of every transformer layer (megatron: full layer recompute; fsdp: HF gradient
    checkpointing, non-reentrant)."""
    logprob_chunk_tokens: int = 1024
    """Tokens per chunk of the fused output layer + log-softmax (engines/logprobs.py): its extra memory
    is a few chunk x vocabulary float32 buffers, never tokens x vocabulary. Larger chunks: fewer, bigger matmuls."""
    distributed_optimizer: bool = True
    """Megatron distributed (ZeRO-1) optimizer."""


# --------------------------------------------------------------------------------------------------- weight sync
@dataclass
class WeightSyncConfig:
    every: int = 1
    """Broadcast new weights to the engines every k trainer steps."""
    mode: str = "disaggregated"
    """disaggregated (broadcast over a process group) | colocated (no process group; see colocated_transport)."""

    colocated_transport: str = "auto"
    """How colocated mode hands the weights over: tensor (safetensors bytes in /update_weights_from_tensor; the CPU
    engine only) | disk (a safetensors checkpoint staged in disk_dir, loaded by /update_weights_from_disk; works with
    SGLang on CUDA) | auto (disk where CUDA is available, else tensor). Neither puts a pickle on a socket."""
    disk_dir: str = "/dev/shm"
    """Base of the run's private staging directory: each run creates `<disk_dir>/dapo-run-<host>-<pid>-<random>/`
    (mode 0700, removed at the end; pipeline/runtime/run_security.py), which is the CPU engines' only
    /update_weights_from_disk root in every mode, and where colocated_transport=disk stages each sync's checkpoint
    (one directory per sync, removed after it). Use a memory filesystem (tmpfs): it must hold the model once in the
    wire dtype while a sync runs."""
    release_memory: list[str] = field(default_factory=list)
    """colocated: memory the engines give back while the trainer trains (SGLang's /release_memory_occupation tags:
    kv_cache, weights, cuda_graph); generation stops meanwhile. Empty (default): off, generation and training
    overlap. SGLang needs --enable-memory-saver (added by the launcher); weights need every = 1 (they are resynced)
    unless engine.extra_args has --enable-weights-cpu-backup."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU) | nccl | gloo."""
    bucket_mb: float = 512.0
    """Bucket size in MiB; each bucket is one metadata request and one flat broadcast (a larger tensor goes alone)."""
    flatten: bool = True
    """Send each bucket as one uint8 broadcast (SGLang `load_format="flattened_bucket"`, which needs an SGLang whose
    /update_weights_from_distributed takes `load_format`); false: one broadcast per tensor (every SGLang version)."""
    dtype: str = ""
    """Cast floating-point tensors to this dtype before sending (bfloat16 | float16 | float32); empty: as trained."""
    prefetch: int = 1
    """Buckets prepared (gathered, cast, flattened) ahead of the one on the wire; 0 prepares each in turn."""
    master_address: str = "127.0.0.1"
    """Address the trainer's source rank listens on for the sync group."""
    master_port: int = 0
    """Port of the sync group's store; 0 picks a free one."""
    checksum: bool = False
    """After each sync compare a sha256 of the sent tensors with each engine's /weights_checksum (CPU engine only)."""
    timeout_s: float = 600.0
    """A sync (or the group set-up) that does not finish in this time fails, naming the engines that did not finish."""
    pause_mode: str = "abort"
    """/pause_generation mode around a sync: abort | retract | in_place."""

    @property
    def colocated(self) -> bool:
        """The weights go over without a process group (the engines share the trainer's devices)."""
        return self.mode == "colocated"


# --------------------------------------------------------------------------------------------------- cluster, logging, ckpt, eval
@dataclass
class ClusterConfig:
    address: str = "local"
    """Ray cluster: local (start one on this machine) | auto | ray://host:port."""
    num_cpus: int = 0
    """CPUs for a local Ray instance (0: all)."""
    num_gpus: int = 0
    """GPUs for a local Ray instance."""
    bind_host: str = "127.0.0.1"
    """Interface every socket we open binds to."""
    namespace: str = "dapo"
    """Ray namespace."""
    placement_strategy: str = "PACK"
    """Ray placement-group strategy of the trainer ranks' bundles (one per rank): PACK | STRICT_PACK (one node) |
    SPREAD | STRICT_SPREAD. Engines get their own group, one bundle per engine (its GPUs on one node), PACK."""
    gpus_per_node: int = 0
    """GPUs of one node (0: not stated). Colocated engines of engine.tp > 1 GPUs span that many trainer ranks of one
    node, so engine.tp must divide it; placement checks the ranks' nodes either way."""
    placement_timeout_s: float = 120.0
    """How long to wait for a placement group before failing with what it needs and what the cluster has."""
    zmq_max_message_mb: float = 256.0
    """Largest message the rollout buffer's ZMQ socket accepts (ZMQ_MAXMSGSIZE; a sender of a larger frame is cut
    off). A group of G samples of T tokens is about G x T x 14 bytes."""


@dataclass
class WandbConfig:
    project: str = ""
    """W&B project (empty: W&B off). Needs the `wandb` extra (pip install 'dapo-rl[wandb]'); the run's name is the
    run directory's name; the API key comes from `wandb login` / WANDB_API_KEY, never from the config."""
    entity: str = ""
    """W&B team or user (empty: the account's default)."""
    mode: str = "online"
    """online, offline (sync later with `wandb sync <run>/wandb/...`) or disabled. WANDB_MODE overrides it."""

    def __post_init__(self) -> None:
        if self.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logging.wandb.mode: must be online, offline or disabled; got {self.mode!r}")


@dataclass
class LoggingConfig:
    dir: str = "runs"
    """Root of run directories (TensorBoard event files, logs, checkpoints)."""
    run_name: str = ""
    """Run directory name; empty: a timestamp."""
    tensorboard: bool = True
    """Write TensorBoard scalars."""
    console: bool = True
    """One status line per step on the console."""
    level: str = "INFO"
    """Python log level."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases, beside TensorBoard (the same metric names and steps); off unless `project` is set."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every k trainer steps (0: only at the end and on signals)."""
    keep_last: int = 2
    """Checkpoints kept."""
    resume: str = ""
    """`auto` (latest in the run dir), a checkpoint path, or empty."""
    hf_every: int = 0
    """Write the policy as a Hugging Face checkpoint (`<run>/hf/step_N/`: config, generation config, tokenizer,
    safetensors shards + index; what transformers, SGLang and vLLM load) every k trainer steps and at the end of the
    run (0: at the end only; -1: never). The newest `keep_last` are kept. `dapo export` writes one offline."""
    hf_dtype: str = ""
    """dtype of the Hugging Face checkpoint's weights: bfloat16, float16 or float32 (empty: model.dtype)."""

    def __post_init__(self) -> None:
        if self.hf_dtype not in ("", "bfloat16", "float16", "float32"):
            raise ConfigError(
                f"checkpoint.hf_dtype: must be bfloat16, float16, float32 or empty; got {self.hf_dtype!r}"
            )


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate every k trainer steps (0: off)."""
    n_samples: int = 1
    """k of avg@k."""
    max_prompts: int = 0
    """Evaluate at most this many prompts (0: all)."""
    temperature: float = 0.0
    """Sampling temperature for evaluation (0: greedy)."""
    reward_fn: str = ""
    """Scorer for evaluation (empty: algorithm.reward_fn)."""
    before_train: bool = True
    """With eval.every > 0: also evaluate the initial weights before the first step, and the final ones after the
    last (both exact: no weight update happens while they run)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
