"""engines/megatron."""
