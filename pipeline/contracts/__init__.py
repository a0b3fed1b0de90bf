"""The contracts between the pipeline and the engines, and between the pipeline's own stages.

Both `pipeline/` and `engines/` import these modules; these modules import nothing of either. `engines/` imports
nothing else of `pipeline/`. See docs/DESIGN.md, "Contracts".

- `config`: the run's configuration schema (typed dataclasses, `ConfigError`); loading and validation are
  `pipeline.config`'s.
- `engine_api`: generate request/answer, engine errors, the `GenerateClient` protocol.
- `weight_wire`: the weight-sync wire format (process group, bucket layout, safetensors payloads).
- `backend`: the trainer-backend protocol (`MicroBatch`, `LossFn`, `TrainerBackend` incl. its pipeline stage).
- `records`: the sample records that flow from the rollout through the buffer to the trainer.
"""
