"""Asynchronous off-policy DAPO: the engine-agnostic pipeline (config, data, algorithm, rollout, buffer, trainer loop)."""
