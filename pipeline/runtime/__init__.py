"""The running system: Ray actors and groups (cluster, groups), the weight-sync coordinator and sender, evaluation
(`dapo eval` and live evaluation), checkpoints, metrics, signals, and `train()` that drives the flow with them.
`wiring` is the composition root: the only module here that names concrete engines and backends. Nothing here
imports the tools."""
