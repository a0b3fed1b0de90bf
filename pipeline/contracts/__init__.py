"""The contracts between the pipeline and the engines, and between the pipeline's own stages.

Both `pipeline/` and `engines/` import these modules; these modules import nothing of either (only
`pipeline.config` for the config sections they name). See docs/DESIGN.md, "Contracts".

- `engine_api`: generate request/answer, engine errors, the `GenerateClient` protocol.
- `weight_wire`: the weight-sync wire format (process group, bucket layout, safetensors payloads).
- `backend`: the trainer-backend protocol (`MicroBatch`, `LossFn`, `TrainerBackend` incl. its pipeline stage).
- `records`: the sample records that flow from the rollout through the buffer to the trainer.
"""
