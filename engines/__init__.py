"""External engines behind small interfaces: inference (sglang, local) and training (megatron, fsdp)."""
