"""engines/fsdp."""
