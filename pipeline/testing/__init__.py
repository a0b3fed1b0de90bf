"""Test support, apart from product code: the rollout simulator (simulated engines, tokenizer, rewards), tiny saved
models, the megatron/FSDP harness and the MoE routing-replay harness. Tests and benchmarks import it; product never."""
