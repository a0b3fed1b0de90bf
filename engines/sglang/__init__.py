"""SGLang servers: command lines for `python -m sglang.launch_server` and the optional sglang-router
(`launcher`). The HTTP client shared with the local engine is `engines.client`; processes are `engines.process`."""
