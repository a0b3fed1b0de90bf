"""The running system: Ray actors and groups (cluster, groups), the weight-sync coordinator and sender, evaluation
(`dapo eval` and live evaluation), checkpoints, metrics, signals, and `train()` that drives the flow with them.
The composition roots that name concrete engines and backends live here: `cluster`, `weight_sync.sender`,
`evaluate`. Nothing here imports the tools."""
