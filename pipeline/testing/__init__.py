"""Test support, apart from product code: the rollout simulator (simulated engines, tokenizer, rewards)."""
