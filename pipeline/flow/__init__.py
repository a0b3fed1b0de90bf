"""The data flow, one module per arrow of docs/DESIGN.md: prompts (data, tasks, prompt_queue) -> rollout (admission)
-> rewards -> transport -> buffer -> trainer step. Imports only the algorithm, the contracts, config and tokenizer;
never the runtime that drives it, never concrete engines (the rollout speaks `contracts.engine_api.GenerateClient`)."""
