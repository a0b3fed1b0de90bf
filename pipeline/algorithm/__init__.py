"""pipeline/algorithm."""
