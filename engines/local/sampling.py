"""Sampling parameters (SGLang's `sampling_params` JSON) and the batched sampler of the CPU engine.

Contract:
- `SamplingParams.from_json` accepts SGLang's field names (checked against sglang 0.5.23 `SamplingParams`) with
  SGLang's defaults (max_new_tokens 128, temperature 1, top_p 1, top_k -1 = off, n 1). Fields we cannot honour
  are accepted only at their neutral value; anything else raises `ValueError` naming the field.
- temperature < 1e-6 means greedy (as SGLang: top_k = 1).
- Behaviour logprobs (what `return_logprob` reports) follow SGLang's default: the log-probability of the sampled
  token under softmax(logits / temperature), i.e. after temperature scaling and before top-p/top-k truncation;
  for greedy rows under softmax(logits) (temperature 1). A trainer must therefore score with
  log_softmax(logits / T) using the rollout temperature T (identical to plain log_softmax at T = 1, the RL
  default). `--return-original-logprob` (SGLang: env SGLANG_RETURN_ORIGINAL_LOGPROB) reports log_softmax(logits)
  at temperature 1 instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SAMPLING_EPS = 1e-6
_INT_LIMIT = 2**31

# Fields we take at any value.
_SUPPORTED = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos", "n"}
# SGLang fields we accept only at their neutral value (the engine does not implement them).
_NEUTRAL: dict[str, object] = {
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
    "stop": None,
    "stop_regex": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
    "sampling_seed": None,
    "custom_params": None,
    "beam_width": None,
    "stream_interval": None,
}
# Output-formatting fields with no effect on token ids.
_IGNORED = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @classmethod
    def from_json(cls, d: dict | None) -> SamplingParams:
        d = dict(d or {})
        for key, value in d.items():
            if key in _SUPPORTED or key in _IGNORED:
                continue
            if key in _NEUTRAL:
                if value not in (_NEUTRAL[key], None, [], "", {}):
                    raise ValueError(f"sampling_params.{key}={value!r} is not supported by the local engine")
                continue
            raise ValueError(f"sampling_params.{key}: unknown field")
        p = cls()
        if d.get("max_new_tokens") is not None:
            p.max_new_tokens = int(d["max_new_tokens"])
        if d.get("temperature") is not None:
            p.temperature = float(d["temperature"])
        if d.get("top_p") is not None:
            p.top_p = float(d["top_p"])
        if d.get("top_k") is not None:
            p.top_k = int(d["top_k"])
        stop = d.get("stop_token_ids") or []
        if not isinstance(stop, list):
            raise ValueError("sampling_params.stop_token_ids must be a list of integers")
        p.stop_token_ids = [int(t) for t in stop]
        p.ignore_eos = bool(d.get("ignore_eos") or False)
        if d.get("n") is not None:
            p.n = int(d["n"])
        p.validate()
        return p

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"sampling_params.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0.0 or self.temperature == float("inf"):
            raise ValueError(f"sampling_params.temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"sampling_params.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"sampling_params.n must be >= 1, got {self.n}")
        # ints become int64 tensors on the engine thread: an overflow there would fail a whole batch
        for name, value in (("max_new_tokens", self.max_new_tokens), ("top_k", self.top_k), ("n", self.n)):
            if value >= _INT_LIMIT:
                raise ValueError(f"sampling_params.{name} must be < 2**31, got {value}")
        if any(not 0 <= t < _INT_LIMIT for t in self.stop_token_ids):
            raise ValueError("sampling_params.stop_token_ids must hold integers in [0, 2**31)")


def sample(
    logits: torch.Tensor,  # (B, V) float
    params: list[SamplingParams],
    generator: torch.Generator,
    original_logprob: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (token ids (B,), behaviour logprobs (B,)) as documented above."""
    logits = logits.float()
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32)
    scaled = logits / temps[:, None]
    logprobs = torch.log_softmax(logits if original_logprob else scaled, dim=-1)
    greedy = torch.tensor([p.greedy for p in params])
    if bool(greedy.all()):
        tokens = torch.argmax(logits, dim=-1)
    else:
        tokens = _sample_truncated(scaled, params, generator)
        if bool(greedy.any()):
            tokens = torch.where(greedy, torch.argmax(logits, dim=-1), tokens)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from unnormalised non-negative weights (B, V); much cheaper than torch.multinomial."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _sample_truncated(scaled: torch.Tensor, params: list[SamplingParams], generator: torch.Generator) -> torch.Tensor:
    """Sample from softmax(scaled) restricted to each row's top-k and top-p sets (SGLang: both masks are taken
    on the full distribution; the first token always stays)."""
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    top_p = [p.top_p for p in params]
    if not any(top_k) and all(p >= 1.0 for p in top_p):
        return _inverse_cdf(torch.softmax(scaled, dim=-1), generator)
    vocab = scaled.shape[-1]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    ks = torch.tensor([k if k else vocab for k in top_k])
    remove = torch.arange(vocab)[None, :] >= ks[:, None]
    remove |= (probs.cumsum(-1) - probs) > torch.tensor(top_p, dtype=torch.float32)[:, None]
    idx = _inverse_cdf(probs.masked_fill(remove, 0.0), generator)
    return order.gather(1, idx[:, None]).squeeze(1)
