"""SGLang servers: what each supported release speaks (`protocol`: version negotiation, the 0.5.23 weight-update
session, stop tokens), command lines for `python -m sglang.launch_server` and the optional sglang-router
(`launcher`). The HTTP client shared with the local engine is `engines.client`; processes are `engines.process`."""
