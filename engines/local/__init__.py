"""engines/local."""
