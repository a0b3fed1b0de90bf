"""The running system: Ray actors and groups (cluster), the weight-sync coordinator and sender, checkpoints, metrics,
live evaluation, and `train()` that drives the flow with them. The composition roots that name concrete engines
and backends live here (`cluster`, `weight_sync.sender`)."""
