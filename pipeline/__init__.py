"""Asynchronous off-policy DAPO, engine-agnostic: contracts, config, algorithm, flow, runtime, tools (docs/DESIGN.md)."""
