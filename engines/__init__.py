"""External engines behind small interfaces: inference (sglang, local) and training (megatron, fsdp). They import
nothing of `pipeline/` but its contracts and config (docs/DESIGN.md)."""
