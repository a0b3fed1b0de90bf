"""The engine API as the pipeline sees it: one generate call, its answer, its errors.

Contract (both sides import this module and nothing of each other):
- `GenerateClient` is the only surface the rollout needs: `generate(input_ids, sampling_params, rid, return_logprob,
  url)` returns one `GenerateOutput`; `abort(rid | abort_all)`; `alive_urls`. `engines.client.EngineClient` (HTTP, to
  SGLang or the CPU engine) implements it, and so does the simulator in `pipeline/testing/` (via structural typing).
- `GenerateOutput` is the normalised answer: `output_ids` and one `logprobs` entry per output token (empty when
  `return_logprob` is False), `finish_reason` one of `FINISH_REASONS`, the engine's `weight_version` at completion
  (a string, as SGLang reports it), the serving `url`, `prompt_tokens`, the request id `rid`.
- MoE routing: with `return_routed_experts=True, routed_experts_start_len=s` (SGLang's request fields; passed only
  when the run replays routing) the answer's meta_info["routed_experts"] is the base64 of int32 (fed tokens
  [s, prompt + completion - 1), num_hidden_layers, top_k); `routed_experts(out, layers, top_k, s)` decodes it into
  np.int16 (None when absent).
- `EngineError` names the engine URL (and the HTTP status when one came back); `EngineDeadError` means the engine
  stopped answering beyond the retry budget and gets no more traffic until re-added.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

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


def routed_experts(out: GenerateOutput, num_layers: int, top_k: int, start_len: int = 0) -> np.ndarray | None:
    """(prompt + completion - 1 - start_len, num_layers, top_k) np.int16 expert ids of the fed tokens, or None."""
    raw = out.meta_info.get("routed_experts")
    if raw is None:
        return None
    try:
        flat = np.frombuffer(base64.b64decode(raw, validate=True), dtype=np.int32)
    except (ValueError, TypeError) as e:
        raise EngineError(f"{out.url}/generate: meta_info.routed_experts is not base64 int32 ({e})", out.url) from e
    rows = out.prompt_tokens + len(out.output_ids) - 1 - start_len
    if flat.size != max(rows, 0) * num_layers * top_k:
        raise EngineError(
            f"{out.url}/generate: meta_info.routed_experts has {flat.size} ids, expected {rows} tokens x "
            f"{num_layers} layers x top-{top_k}", out.url,
        )  # fmt: skip
    if flat.size and (flat.max() > np.iinfo(np.int16).max or flat.min() < -1):
        raise EngineError(f"{out.url}/generate: meta_info.routed_experts holds ids outside [-1, 32767]", out.url)
    return flat.astype(np.int16).reshape(max(rows, 0), num_layers, top_k)
