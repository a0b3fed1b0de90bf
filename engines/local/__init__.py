"""A CPU inference engine that serves SGLang's HTTP protocol, so one client and one weight-sync path run in CI.

Modules: `runner` (model forward with a KV cache rows join and leave), `sampling` (SGLang's sampling params and
behaviour logprobs), `engine` (continuous batching on a background thread; abort/pause semantics), `updates` and
`dist` (weight updates over a dedicated gloo group, shared with the trainer-side sender), `server` (aiohttp routes),
`__main__` (`python -m engines.local --model-path DIR ...`). Tiny saved models for its tests: pipeline/testing/tiny_models.py.
"""
