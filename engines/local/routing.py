"""Routed-expert capture for the CPU engine: SGLang's `return_routed_experts` on a HF mixture-of-experts model.

Contract:
- `RouteRecorder(model)` hooks the router of every decoder layer whose MLP has one (HF Qwen3-MoE's `mlp.gate`,
  whose forward returns (router_logits, routing weights, top-k indices)); `is_moe` says whether there is any.
  Around a forward, `recorder.take(batch, seq)` returns the top-k expert ids the forward routed its `batch * seq`
  tokens to, as int32 (batch, seq, L, k) with L = the model's num_hidden_layers (SGLang's layer axis); layers
  without a router hold -1.
- Wire format (SGLang 0.5.23, checked by tests/test_sglang_contract.py): `meta_info["routed_experts"]` is the base64
  of the raw bytes of an int32 array (tokens, num_hidden_layers, top_k), C order, for the fed tokens
  `[routed_experts_start_len, prompt_tokens + completion_tokens - 1)` (the last generated token is never fed).
  `encode_routing(arr)` produces it; engines/client.py decodes it.
"""

from __future__ import annotations

import base64

import numpy as np
import torch


def _router_of(layer: torch.nn.Module) -> torch.nn.Module | None:
    gate = getattr(getattr(layer, "mlp", None), "gate", None)
    if gate is not None and hasattr(gate, "top_k") and isinstance(getattr(gate, "weight", None), torch.Tensor):
        return gate
    return None


class RouteRecorder:
    def __init__(self, model: torch.nn.Module) -> None:
        layers = list(model.model.layers)
        self.num_layers = int(getattr(model.config, "num_hidden_layers", len(layers)))
        self.top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
        self._last: dict[int, torch.Tensor] = {}
        self._handles = []
        for i, layer in enumerate(layers):
            gate = _router_of(layer)
            if gate is not None:
                self._handles.append(gate.register_forward_hook(self._hook(i)))
        self.is_moe = bool(self._handles) and self.top_k > 0

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, args: tuple, output: tuple) -> None:
            self._last[layer] = output[2].detach()  # (tokens, top_k) indices

        return hook

    def take(self, batch: int, seq: int) -> torch.Tensor:
        """(batch, seq, L, k) int32 of the last forward (its inputs were (batch, seq) tokens)."""
        out = torch.full((batch * seq, self.num_layers, self.top_k), -1, dtype=torch.int32)
        for layer, idx in self._last.items():
            out[:, layer] = idx.reshape(batch * seq, self.top_k).to(torch.int32)
        self._last = {}
        return out.view(batch, seq, self.num_layers, self.top_k)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def encode_routing(arr: torch.Tensor | np.ndarray) -> str:
    """SGLang's encoding: base64 of the int32 bytes."""
    a = np.ascontiguousarray(np.asarray(arr, dtype=np.int32))
    return base64.b64encode(a.tobytes()).decode("ascii")
