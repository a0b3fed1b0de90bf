"""Model runners of the CPU engine: a batch of sequences ("rows") with a KV cache that rows join and leave.

Contract (what `engine.py` relies on):
- `prefill(token_lists)` appends one row per list (its KV computed from all its tokens) and returns the logits of
  each list's last position, (n, V). `decode(tokens)` feeds one token to every current row, in row order, and
  returns (B, V) logits. `remove(row)` drops a row by swap-remove: the last row takes its index.
  `reset()` drops every row.
- `SlotRunner` (the fast path) serves Llama-family decoders (llama, qwen2, qwen3, mistral without sliding
  windows). It reuses the HF model's own modules and parameter tensors (so in-place weight updates are seen at
  once) and replaces only the attention/KV plumbing: one preallocated cache per layer, (slots, kv_heads, L, D),
  rows kept dense in slots [0, B) so a decode step reads a view, never a gather; L grows by doubling.
- `HFRunner` serves any other `AutoModelForCausalLM`: the HF forward with its own cache, rebuilt by recomputing
  all rows whenever the set of rows changes (slow but generic and correct). On a mixture-of-experts model it records
  the routed experts (engines/local/routing.py): after each call `last_routing[i]` = (first position, (n, L, k)
  int32) of the tokens the call fed for returned row i (prefill: every token; decode: the one fed token).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from engines.local.routing import RouteRecorder

FAST_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
_RUNTIME_ROPE = ("dynamic", "longrope")


def supports_fast_path(model: torch.nn.Module) -> bool:
    cfg = model.config
    if getattr(cfg, "model_type", "") not in FAST_MODEL_TYPES:
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    if getattr(cfg, "model_type", "") == "mistral" and getattr(cfg, "sliding_window", None):
        return False
    if getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "rope_type", "default") in _RUNTIME_ROPE:
        return False  # their frequencies change with the sequence length; the slot path uses fixed tables
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, torch.nn.Linear) for m in linears) or not hasattr(mlp, "act_fn"):
            return False
        if len({m.bias is None for m in linears[:3]}) != 1:
            return False
        if not all(_is_rms_norm(n) for n in (layer.input_layernorm, layer.post_attention_layernorm, inner.norm)):
            return False
    return True


def make_runner(model: torch.nn.Module, capacity: int, max_len: int, kind: str = "auto"):
    if kind == "slot" or (kind == "auto" and supports_fast_path(model)):
        if not supports_fast_path(model):
            raise ValueError(f"--runner slot: model_type {model.config.model_type!r} is not supported by the fast path")
        return SlotRunner(model, capacity, max_len)
    return HFRunner(model, capacity, max_len)  # routed-expert capture (MoE models) runs on this one


def _is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _rms_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The fused kernel computes HF's RMSNorm (float32 statistics, then weight * x) in one op.
    return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of `linears` into one tensor and make each parameter a view of it.

    The parameters stay the same objects (so `named_parameters` and in-place weight updates keep working and
    land in the fused tensor); one matmul then replaces several.
    """
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = torch.cat([m.bias.detach() for m in linears]) if linears[0].bias is not None else None
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[row : row + n]
        if bias is not None:
            m.bias.data = bias[row : row + n]
        row += n
    return weight, bias


def _fused_weights(model: torch.nn.Module, layers: list) -> tuple[list, list]:
    """Fuse once per model (every runner of an engine shares the same fused tensors)."""
    fused = getattr(model, "_slot_runner_fused", None)
    if fused is None:
        qkv = [_fuse([lay.self_attn.q_proj, lay.self_attn.k_proj, lay.self_attn.v_proj]) for lay in layers]
        gate_up = [_fuse([lay.mlp.gate_proj, lay.mlp.up_proj]) for lay in layers]
        fused = model._slot_runner_fused = (qkv, gate_up)
    return fused


class SlotRunner:
    def __init__(self, model: torch.nn.Module, capacity: int, max_len: int, init_len: int = 256) -> None:
        self.model = model
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.lm_head = model.get_output_embeddings()
        attn = self.layers[0].self_attn
        cfg = model.config
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.scaling = float(attn.scaling)
        self.qk_norm = hasattr(attn, "q_norm")
        self.dtype = self.lm_head.weight.dtype
        self.qkv, self.gate_up = _fused_weights(model, self.layers)
        self.capacity, self.max_len = capacity, max_len
        self.n = 0
        self.lens = torch.zeros(capacity, dtype=torch.long)
        self._rope_tables()
        self.init_len = min(init_len, max_len)
        self._alloc(self.init_len)

    def _rope_tables(self) -> None:
        """cos/sin for every position from the model's own rotary module (shared by an engine's runners), with
        sin's first half negated: rotate_half(x) * sin == roll(x, D/2) * [-sin_1, sin_2], no concatenation."""
        tables = getattr(self.model, "_slot_runner_rope", None)
        if tables is None or tables[0].shape[0] < self.max_len:
            d = self.head_dim
            probe = torch.zeros(1, 1, d, dtype=self.dtype)
            cos, sin = self.inner.rotary_emb(probe, torch.arange(self.max_len)[None, :])  # (1, L, D)
            sin = sin[0].clone()
            sin[:, : d // 2] = -sin[:, : d // 2]
            tables = self.model._slot_runner_rope = (cos[0].to(self.dtype), sin.to(self.dtype))
        self.cos_table, self.sin_table = tables
        # Over the fused q|k|v heads, v heads get cos 1 and sin 0: one pass rotates q and k and leaves v alone.
        self.is_v = (torch.arange(self.n_heads + 2 * self.n_kv) >= self.n_heads + self.n_kv)[:, None]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., heads, D) cos and signed sin for `positions` (...)."""
        cos = torch.where(self.is_v, 1.0, self.cos_table[positions].unsqueeze(-2))
        sin = torch.where(self.is_v, 0.0, self.sin_table[positions].unsqueeze(-2))
        return cos, sin

    # ------------------------------------------------------------------ cache storage
    def _alloc(self, length: int) -> None:
        # One tensor per layer, (2, slots, KV, L, D): [0] keys, [1] values, so one write stores both, and
        # cache[:, :B, :, :span] folds (B, KV) into one batch dimension without a copy.
        shape = (2, self.capacity, self.n_kv, length, self.head_dim)
        self.kv = [torch.zeros(shape, dtype=self.dtype) for _ in self.layers]
        self.cache_len = length

    def _ensure(self, needed: int) -> None:
        if needed > self.max_len:
            raise ValueError(f"sequence of {needed} tokens exceeds the context length {self.max_len}")
        if needed <= self.cache_len:
            return
        old, old_len = self.kv, self.cache_len
        self._alloc(min(self.max_len, max(needed, 2 * old_len)))
        for new_t, old_t in zip(self.kv, old, strict=True):
            new_t[:, : self.n, :, :old_len] = old_t[:, : self.n]

    @property
    def rows(self) -> int:
        return self.n

    # The cache may have been reallocated inside the forward's inference mode (a long prompt grows it), which makes
    # its tensors inference tensors: every in-place write to them must happen in inference mode too.
    @torch.inference_mode()
    def reset(self) -> None:
        self.n = 0
        self.lens.zero_()

    def release_cache(self) -> None:
        """Free the KV cache (the engine is idle); `restore_cache` allocates the initial one again."""
        self.reset()
        self._alloc(0)

    def restore_cache(self) -> None:
        self._alloc(self.init_len)

    @torch.inference_mode()
    def remove(self, row: int) -> None:
        last = self.n - 1
        if row != last:
            length = int(self.lens[last])
            for kv in self.kv:
                kv[:, row, :, :length] = kv[:, last, :, :length]
            self.lens[row] = self.lens[last]
        self.lens[last] = 0
        self.n = last

    # ------------------------------------------------------------------ forward
    def _layer(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, write, attend) -> torch.Tensor:
        """One decoder layer on h (B, T, hidden); cos/sin (B, T, heads, D); returns the new h."""
        layer = self.layers[i]
        b, t, _ = h.shape
        heads = self.n_heads + 2 * self.n_kv
        qkv = F.linear(_rms_norm(layer.input_layernorm, h), *self.qkv[i]).view(b, t, heads, self.head_dim)
        if self.qk_norm:
            attn, hq, hk = layer.self_attn, self.n_heads, self.n_heads + self.n_kv
            qkv = torch.cat([_rms_norm(attn.q_norm, qkv[:, :, :hq]), _rms_norm(attn.k_norm, qkv[:, :, hq:hk]),
                             qkv[:, :, hk:]], dim=2)  # fmt: skip
        qkv = torch.addcmul(qkv * cos, qkv.roll(self.head_dim // 2, dims=-1), sin)  # RoPE on q and k only
        o = attend(qkv[:, :, : self.n_heads], write(i, qkv[:, :, self.n_heads :]))  # (B, T, H * D)
        o_proj = layer.self_attn.o_proj
        h = h + F.linear(o, o_proj.weight, o_proj.bias)
        gate, up = F.linear(_rms_norm(layer.post_attention_layernorm, h), *self.gate_up[i]).chunk(2, dim=-1)
        down = layer.mlp.down_proj
        return h + F.linear(layer.mlp.act_fn(gate) * up, down.weight, down.bias)

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return F.linear(_rms_norm(self.inner.norm, h_last), self.lm_head.weight, self.lm_head.bias).float()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.inner.embed_tokens.weight)

    @torch.inference_mode()
    def prefill(self, token_lists: list[list[int]]) -> torch.Tensor:
        n = len(token_lists)
        if self.n + n > self.capacity:
            raise ValueError(f"{self.n + n} rows exceed the runner capacity {self.capacity}")
        lens = torch.tensor([len(t) for t in token_lists])
        t_max = int(lens.max())
        self._ensure(t_max)
        ids = torch.zeros(n, t_max, dtype=torch.long)
        for r, toks in enumerate(token_lists):
            ids[r, : len(toks)] = torch.tensor(toks)
        rows = slice(self.n, self.n + n)
        pos = torch.arange(t_max)
        # Causal within each row, and never onto the right padding.
        mask = (pos[None, :] <= pos[:, None])[None, None] & (pos[None, :] < lens[:, None])[:, None, None, :]
        kv = self.n_kv

        def write(i: int, new_kv: torch.Tensor) -> torch.Tensor:  # new_kv (n, T, 2KV, D) -> (2, n, KV, T, D)
            new_kv = new_kv.view(n, t_max, 2, kv, self.head_dim).permute(2, 0, 3, 1, 4)
            self.kv[i][:, rows, :, :t_max] = new_kv
            return new_kv

        def attend(q: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys_values[0], keys_values[1], attn_mask=mask, scale=self.scaling, enable_gqa=True
            )
            return o.transpose(1, 2).reshape(n, t_max, -1)

        h = self._embed(ids)
        cos, sin = self._rope(pos[None, :])
        for i in range(len(self.layers)):
            h = self._layer(i, h, cos, sin, write, attend)
        self.lens[rows] = lens
        self.n += n
        return self._logits(h[torch.arange(n), lens - 1])

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        b = self.n
        if len(tokens) != b:
            raise ValueError(f"decode got {len(tokens)} tokens for {b} rows")
        pos = self.lens[:b].clone()
        span = int(pos.max()) + 1
        self._ensure(span)
        kv, group, d = self.n_kv, self.n_heads // self.n_kv, self.head_dim
        # Flat row index of (k|v, row, kv head, pos) in the (2, slots, KV, L, D) cache, in new_kv's order; one
        # index_copy_ per layer stores keys and values (cheaper than advanced-index assignment).
        half = torch.arange(2).view(1, 2, 1)
        head = torch.arange(kv).view(1, 1, kv)
        flat_idx = ((half * self.capacity + torch.arange(b).view(b, 1, 1)) * kv + head) * self.cache_len + pos.view(
            b, 1, 1
        )
        flat_idx = flat_idx.reshape(-1)
        # Additive mask over the cache span, shared by every layer: -inf beyond each row's length.
        bias = torch.zeros(b, span, dtype=self.dtype).masked_fill_(
            torch.arange(span)[None, :] > pos[:, None], -torch.inf
        )
        bias = bias[:, None, :].expand(b, kv * group, span).reshape(b * kv, group, span)

        def write(i: int, new_kv: torch.Tensor) -> torch.Tensor:  # new_kv (B, 1, 2KV, D)
            self.kv[i].view(-1, d).index_copy_(0, flat_idx, new_kv.reshape(b * 2 * kv, d))
            return self.kv[i][:, :b, :, :span]

        def attend(q: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
            # One query per row: batched GEMMs over (row, kv head) beat SDPA's kernel for this shape on CPU.
            keys = keys_values[0].view(b * kv, span, d)  # a view: the cache is never copied
            values = keys_values[1].view(b * kv, span, d)
            # (bmm + add is much faster than baddbmm here.) The scale is folded into the mask-free query.
            scores = torch.bmm(q.reshape(b * kv, group, d) * self.scaling, keys.transpose(1, 2)).add_(bias)
            return torch.bmm(torch.softmax(scores, dim=-1), values).view(b, 1, kv * group * d)

        h = self._embed(torch.tensor(tokens)[:, None])
        cos, sin = self._rope(pos[:, None])
        for i in range(len(self.layers)):
            h = self._layer(i, h, cos, sin, write, attend)
        self.lens[:b] += 1
        return self._logits(h[:, -1])


class HFRunner:
    """Generic fallback: HF forward + HF cache; any change of the row set recomputes every row's KV."""

    def __init__(self, model: torch.nn.Module, capacity: int, max_len: int) -> None:
        self.model = model
        self.capacity, self.max_len = capacity, max_len
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.seqs: list[list[int]] = []  # every token whose KV belongs in the cache
        self.cache = None
        self.mask: torch.Tensor | None = None
        self.valid = False
        # MoE: the experts of the tokens each call fed, per returned row: (first position, (n, L, k) int32).
        self.recorder: RouteRecorder | None = RouteRecorder(model)
        if not self.recorder.is_moe:
            self.recorder.remove()
            self.recorder = None
        self.last_routing: list[tuple[int, torch.Tensor]] | None = None

    @property
    def rows(self) -> int:
        return len(self.seqs)

    def reset(self) -> None:
        self.seqs, self.cache, self.valid = [], None, False

    release_cache = reset  # the HF cache lives only while rows run

    def restore_cache(self) -> None:
        pass

    def remove(self, row: int) -> None:
        self.seqs[row] = self.seqs[-1]
        self.seqs.pop()
        self.valid = False

    def _full_forward(self, seqs: list[list[int]]) -> tuple[torch.Tensor, object, torch.Tensor]:
        t_max = max(len(s) for s in seqs)
        if t_max > self.max_len:
            raise ValueError(f"sequence of {t_max} tokens exceeds the context length {self.max_len}")
        ids = torch.zeros(len(seqs), t_max, dtype=torch.long)
        mask = torch.zeros(len(seqs), t_max, dtype=torch.long)
        for r, s in enumerate(seqs):  # left padding so every row's last token is at -1
            ids[r, t_max - len(s) :] = torch.tensor(s)
            mask[r, t_max - len(s) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        if self.recorder is not None:  # left padding: row r's tokens are its last len(s) positions
            routes = self.recorder.take(len(seqs), t_max)
            self.last_routing = [(0, routes[r, t_max - len(s) :]) for r, s in enumerate(seqs)]
        return out.logits[:, -1].float(), _out_cache(out), mask

    @torch.inference_mode()
    def prefill(self, token_lists: list[list[int]]) -> torch.Tensor:
        if self.rows + len(token_lists) > self.capacity:
            raise ValueError(f"{self.rows + len(token_lists)} rows exceed the runner capacity {self.capacity}")
        logits, _, _ = self._full_forward(token_lists)
        self.seqs.extend(list(t) for t in token_lists)
        self.valid = False
        return logits

    @torch.inference_mode()
    def decode(self, tokens: list[int]) -> torch.Tensor:
        if len(tokens) != self.rows:
            raise ValueError(f"decode got {len(tokens)} tokens for {self.rows} rows")
        for s, t in zip(self.seqs, tokens, strict=True):
            s.append(t)
        if not self.valid:
            logits, self.cache, self.mask = self._full_forward(self.seqs)
            self.valid = True
            if self.last_routing is not None:  # only the newly fed token's routing is new
                self.last_routing = [
                    (len(s) - 1, r[-1:]) for s, (_, r) in zip(self.seqs, self.last_routing, strict=True)
                ]
            return logits
        if max(len(s) for s in self.seqs) > self.max_len:
            raise ValueError(f"sequence exceeds the context length {self.max_len}")
        pos = self.mask.sum(-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        out = self.model(
            input_ids=torch.tensor(tokens)[:, None],
            attention_mask=self.mask,
            position_ids=pos,
            use_cache=True,
            **{self._cache_kw: self.cache},
        )
        self.cache = _out_cache(out)
        if self.recorder is not None:
            routes = self.recorder.take(self.rows, 1)
            self.last_routing = [(len(s) - 1, routes[r, 0:1]) for r, s in enumerate(self.seqs)]
        return out.logits[:, -1].float()


def _out_cache(out) -> object:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)
