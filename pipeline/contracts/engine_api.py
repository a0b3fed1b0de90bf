"""The engine API as the pipeline sees it: one generate call, its answer, its errors.

Contract (both sides import this module and nothing of each other):
- `GenerateClient` is the only surface the rollout needs: `generate(input_ids, sampling_params, rid, return_logprob,
  url)` returns one `GenerateOutput`; `abort(rid | abort_all)`; `alive_urls`. `engines.client.EngineClient` (HTTP, to
  SGLang or the CPU engine) implements it, and so does the simulator in `pipeline/testing/` (via structural typing).
- `GenerateOutput` is the normalised answer: `output_ids` and one `logprobs` entry per output token (empty when
  `return_logprob` is False), `finish_reason` one of `FINISH_REASONS`, the engine's `weight_version` at completion
  (a string, as SGLang reports it), the serving `url`, `prompt_tokens`, the request id `rid`.
- `EngineError` names the engine URL (and the HTTP status when one came back); `EngineDeadError` means the engine
  stopped answering beyond the retry budget and gets no more traffic until re-added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class GenerateOutput:
    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: str
    url: str
    prompt_tokens: int
    rid: str = ""
    meta_info: dict = field(default_factory=dict, repr=False)


class EngineError(RuntimeError):
    """A request to an engine failed; the message names the engine URL."""

    def __init__(self, message: str, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class EngineDeadError(EngineError):
    """The engine stopped answering (connection errors beyond the retry budget) and is marked dead."""


class GenerateClient(Protocol):
    """What the rollout (and the evaluator) call: the generate signature, written once."""

    @property
    def alive_urls(self) -> list[str]: ...

    async def generate(
        self,
        input_ids: list[int],
        sampling_params: dict,
        rid: str | None = None,
        return_logprob: bool = True,
        url: str | None = None,
    ) -> GenerateOutput: ...

    async def abort(self, rid: str | None = None, abort_all: bool = False) -> None: ...
