"""engines/sglang."""
