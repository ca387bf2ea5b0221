"""A Llama-family GPT whose attention layers hand their keys and values to pluggable KV caches.

    model = GPT.from_name("smollm2-135m")
    model.set_kv_caches(batch_size=2, cache="last_recent", cache_length=1024, sink_tokens=4)
    logits = model(ids[:, :512], input_pos=0)  # prefill, (2, 512, vocab)
    logits = model(next_tok, input_pos=512)    # decode, (2, 1, vocab)

`forward(idx)` with input_pos=None is a plain causal forward without any cache (the reference the tests use).

Weights are stored as (in, out) and applied as `x @ w` (`Linear`). With tied embeddings one (n_embd, vocab) matrix
serves both the output head and, read by columns, the token embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caches import KVCache, KVCacheParams, cache_class
from caches.allocation import layer_budgets
from model.attention import AttentionOptions, Visibility, attention
from model.config import Config

LayerHook = Callable[[Tensor, int, "int | None"], None]


class Linear(nn.Module):
    """y = x @ W (+ bias) for W (in_features, out_features), stored that way (what the loaders write): a decode step
    multiplies a handful of rows by every weight, and `x @ W` streams W row by row."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dimension, in float32. Llama casts back before the weight; Gemma's
    (`offset`) scales by (1 + weight) in float32, then casts."""

    def __init__(self, size: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if offset else torch.ones(size))
        self.eps, self.offset = eps, offset

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


class RoPE(nn.Module):
    """Rotary embeddings, "rotate half" layout (as in HF Llama). cos/sin are computed for the positions of each
    call (no table of block_size rows): a (T, head_size) product is negligible next to one layer."""

    def __init__(self, config: Config, local: bool = False) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config, local), persistent=False)

    def forward(self, start: int | Tensor, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (length, hs) for positions start .. start + length - 1; `start` may be a 0-d tensor on the
        device (the compiled decode step's position)."""
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        positions = positions + (start.float() if isinstance(start, Tensor) else start)  # exact below 2**24
        freqs = torch.outer(positions, self.inv_freq)  # (T, hs / 2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_inv_freq(config: Config, local: bool = False) -> Tensor:
    """(head_size / 2,) rotation frequencies: the global layers' (rope_base, with the config's scaling: Llama 3's, or
    linear, positions divided by `factor`), or with `local` a hybrid's windowed layers' (rope_local_base, unscaled)."""
    hs = config.head_size
    base = config.rope_local_base if local else config.rope_base
    inv_freq = 1.0 / (base ** (torch.arange(0, hs, 2, dtype=torch.float32) / hs))
    scaling = None if local else config.rope_scaling
    if scaling is not None and "low_freq_factor" in scaling:
        inv_freq = _llama3_scaled(inv_freq, **scaling)
    elif scaling is not None:
        inv_freq = inv_freq / scaling["factor"]
    return inv_freq


def _llama3_scaled(
    inv_freq: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original_max_seq_len: int
) -> Tensor:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, short ones kept, smooth in between."""
    low_wavelen = original_max_seq_len / low_freq_factor
    high_wavelen = original_max_seq_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, heads, T, hs); cos, sin (T, hs). x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]
    never built: the sine terms are added into the cosine product in place, so a prefill chunk's queries cost
    one copy of temporaries, not four."""
    half = x.shape[-1] // 2
    out = x * cos  # (B, heads, T, hs)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config, layer: int = 0) -> None:
        super().__init__()
        self.config = config
        hs = config.head_size
        self.qkv = Linear(config.n_embd, (config.n_head + 2 * config.n_query_groups) * hs, bias=config.qkv_bias)
        self.proj = Linear(config.n_head * hs, config.n_embd)
        if config.qk_norm:  # one weight per channel, shared by the heads
            self.q_norm = RMSNorm(hs, config.norm_eps, config.norm_offset)
            self.k_norm = RMSNorm(hs, config.norm_eps, config.norm_offset)
        self.kv_cache: KVCache | None = None
        self.attn_opts = AttentionOptions(
            scale=config.attn_scale, softcap=config.attn_softcap, sliding_window=config.window(layer)
        )

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: int | Tensor | None) -> Tensor:
        """input_pos None: no cache; an int: through the cache's checked API; a 0-d tensor: the cache's
        `decode_step` (one token, position on the device, for the compiled decode step)."""
        c = self.config
        B, T, _ = x.shape
        hs, nq, ng = c.head_size, c.n_head, c.n_query_groups
        qkv = self.qkv(x)  # (B, T, (n_head + 2 * n_query_groups) * hs)
        q, k, v = qkv.split([nq * hs, ng * hs, ng * hs], dim=-1)
        q, k = q.view(B, T, nq, hs), k.view(B, T, ng, hs)  # (B, T, heads, hs)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, n_head, T, hs)
        k = k.transpose(1, 2)  # (B, n_query_groups, T, hs)
        v = v.view(B, T, ng, hs).transpose(1, 2)  # (B, n_query_groups, T, hs)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if input_pos is None:
            y, _, _ = attention(q, k, v.contiguous(), Visibility(q_start=0), self.attn_opts)
            y = y.transpose(1, 2).reshape(B, T, nq * hs)  # (B, T, n_head * hs)
        else:
            if self.kv_cache is None:
                raise ValueError("input_pos is set but no KV caches are assigned: call set_kv_caches() first")
            if isinstance(input_pos, Tensor):
                y = self.kv_cache.decode_step(q, k, v, input_pos)  # (B, 1, n_head * hs)
            else:
                y = self.kv_cache(q, k, v, input_pos)  # (B, T, n_head * hs)
        return self.proj(y)


# Rows (tokens over the whole batch) the MLP takes at once. Its temporaries are 4 x intermediate values per row
# (the fused gate/up output, silu(gate), the product): 64 KiB per token for Llama-3.2-1B in bf16, 537 MB for a
# 2048-token prefill chunk at batch 4, more than everything else in a layer. Past this many rows the MLP runs in
# blocks into one output; 1024 rows still keep an H100/H200's tensor cores busy (a 1024 x 2048 x 16384 GEMM).
MLP_BLOCK_ROWS = 1024


class MLP(nn.Module):
    """A gated MLP: proj(act(gate(x)) * up(x)), gate and up fused into one (n_embd, 2 * intermediate) weight; act is
    silu (SwiGLU) or GELU's tanh form (Gemma). Inputs of more than MLP_BLOCK_ROWS tokens go through in row blocks
    (bounded prefill memory)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = Linear(config.n_embd, 2 * config.intermediate_size)
        self.proj = Linear(config.intermediate_size, config.n_embd)
        self.act = config.mlp_act

    def swiglu(self, x: Tensor) -> Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        # one expression: no name holds the activation while the product and the projection run (a prefill's peak)
        return self.proj((F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")) * up)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[:-1].numel()
        if rows <= MLP_BLOCK_ROWS:
            return self.swiglu(x)
        flat = x.reshape(rows, x.shape[-1])  # (B * T, n_embd)
        out = flat.new_empty(rows, self.proj.out_features)  # (B * T, n_embd)
        for start in range(0, rows, MLP_BLOCK_ROWS):
            out[start : start + MLP_BLOCK_ROWS] = self.swiglu(flat[start : start + MLP_BLOCK_ROWS])
        return out.view(x.shape)  # (B, T, n_embd)


class Block(nn.Module):
    """Pre-norm attention, then pre-norm MLP, each added to the residual; with `sandwich_norms` (Gemma) each output
    is normed again before its residual add."""

    def __init__(self, config: Config, layer: int = 0) -> None:
        super().__init__()
        d, eps, offset = config.n_embd, config.norm_eps, config.norm_offset
        self.norm_1 = RMSNorm(d, eps, offset)
        self.attn = CausalSelfAttention(config, layer)
        self.norm_2 = RMSNorm(d, eps, offset)
        self.mlp = MLP(config)
        self.post_attn_norm = RMSNorm(d, eps, offset) if config.sandwich_norms else None
        self.post_mlp_norm = RMSNorm(d, eps, offset) if config.sandwich_norms else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, input_pos: int | Tensor | None) -> Tensor:
        x = x + self._post(self.post_attn_norm, self.attn(self.norm_1(x), cos, sin, input_pos))
        # (no local holds a branch's output past its add: a prefill chunk's peak stays one residual lower)
        return x + self._post(self.post_mlp_norm, self.mlp(self.norm_2(x)))

    @staticmethod
    def _post(norm: RMSNorm | None, h: Tensor) -> Tensor:
        return h if norm is None else norm(h)


class GPT(nn.Module):
    def __init__(self, config: Config, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        # lm_head: (n_embd, vocab). Tied models read the embedding from its columns; untied ones own `wte`.
        self.lm_head = Linear(config.n_embd, config.vocab_size)
        self.wte = None if config.tie_embeddings else nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_offset)
        self.rope = RoPE(config)
        # a hybrid's windowed layers rotate by a base of their own
        self.rope_local = RoPE(config, local=True) if config.rope_local_base is not None else None
        self.local = [config.window(i) is not None and self.rope_local is not None for i in range(config.n_layer)]
        self.hook: LayerHook | None = None
        self.init_weights(seed=seed)

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPT:
        return cls(Config.from_name(name, **overrides))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random weights (normal, std 0.02; residual projections scaled by depth as in GPT-2)."""
        gens: dict[torch.device, torch.Generator] = {}
        norms = {name: m for name, m in self.named_modules() if isinstance(m, RMSNorm)}
        for name, p in self.named_parameters():
            if p.is_meta:  # built on the meta device to be loaded: nothing to initialise
                continue
            if p.device not in gens:
                gens[p.device] = torch.Generator(device=p.device)
                gens[p.device].manual_seed(seed if seed is not None else 0)
            gen = gens[p.device]
            if name.rsplit(".", 1)[0] in norms:
                p.fill_(0.0 if norms[name.rsplit(".", 1)[0]].offset else 1.0)  # the identity either way
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = std / math.sqrt(2 * self.config.n_layer) if name.endswith("proj.weight") else std
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(s))

    def embed(self, idx: Tensor) -> Tensor:
        if self.wte is not None:
            x = self.wte(idx)
        else:
            x = F.embedding(idx, self.lm_head.weight.t())  # (B, T, n_embd), rows of the (vocab, n_embd) view
        if self.config.embed_scale:  # sqrt(n_embd) rounded to the weights' dtype first, as Gemma does
            x = x * torch.tensor(self.config.n_embd**0.5, dtype=x.dtype)
        return x

    def rotations(self, start: int | Tensor, length: int, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Each layer's cos, sin (length, hs) for positions start..: computed once per kind of layer."""
        glob = self.rope(start, length, dtype)
        local = self.rope_local(start, length, dtype) if self.rope_local is not None else glob
        return [local if is_local else glob for is_local in self.local]

    def forward(self, idx: Tensor, input_pos: int | None = None, skip_lm_head: bool = False) -> Tensor:
        """idx (B, T) token ids. Returns logits (B, T, vocab), or the final normed hidden states (B, T, n_embd)
        with skip_lm_head=True. input_pos=None: causal forward without caches; an int: through the caches."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, tokens), got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        x = self.embed(idx)  # (B, T, n_embd)
        rotations = self.rotations(input_pos or 0, T, x.dtype)
        for i, (block, (cos, sin)) in enumerate(zip(self.blocks, rotations)):
            if self.hook is not None:
                self.hook(x, i, input_pos)
            x = block(x, cos, sin, input_pos)
        if self.hook is not None:
            self.hook(x, len(self.blocks), input_pos)
        x = self.norm(x)
        return x if skip_lm_head else self.lm_head(x)

    def decode_step(self, idx: Tensor, pos: Tensor) -> Tensor:
        """One token per sequence, idx (B, 1), at position `pos` (a 0-d int64 tensor on the device) through every
        cache's `decode_step`: fixed shapes, no host synchronisation, no checks and no hook. Returns logits
        (B, 1, vocab). What model/compiled_decode.py compiles; use `model(idx, input_pos=int)` otherwise."""
        x = self.embed(idx)  # (B, 1, n_embd)
        for block, (cos, sin) in zip(self.blocks, self.rotations(pos, 1, x.dtype)):
            x = block(x, cos, sin, pos)
        return self.lm_head(self.norm(x))

    def set_start_of_layer_hook(self, hook: LayerHook | None) -> None:
        """hook(x, block_idx, input_pos) runs before each block and once more (block_idx = n_layer) after the
        last, before the final norm."""
        self.hook = hook

    # ---- KV caches ---------------------------------------------------------------------------------------------

    def kv_cache_params(self, batch_size: int, cache_length: int) -> KVCacheParams:
        c, ref = self.config, self.lm_head.weight
        return KVCacheParams(
            batch_size=batch_size,
            n_query_groups=c.n_query_groups,
            n_head=c.n_head,
            head_size=c.head_size,
            cache_length=cache_length,
            device=ref.device,
            dtype=ref.dtype,
        )

    def set_kv_caches(
        self,
        batch_size: int,
        cache: str = "dense",
        cache_length: int | None = None,
        allocation: str | None = None,
        longest: int | None = None,
        **kwargs,
    ) -> None:
        """One cache of type `cache` per global layer, `cache_length` slots each on average (default: the model's
        block_size), shared among those layers by `allocation` (caches/allocation.py: uniform, or pyramid; default
        the cache's own, `cls.allocation`); `longest`: the longest sequence the caches will see (no layer gets
        more). Knobs go to every such cache. A hybrid model's windowed layers each get a window cache of their
        window (last_recent without sinks: what such a layer attends is all it needs), whatever `cache` is."""
        cls = cache_class(cache)
        per_layer = cache_length or self.config.block_size
        window = kwargs.get("window", 32)
        glob = self.config.global_layers if self.config.layer_windows is not None else range(len(self.blocks))
        counts = iter(layer_budgets(allocation or cls.allocation, per_layer, len(glob), window, longest=longest))
        caches = []
        for i in range(len(self.blocks)):
            w = self.config.window(i) if self.config.layer_windows is not None else None
            if w is None:
                caches.append(cls(self.kv_cache_params(batch_size, next(counts)), **kwargs))
            else:
                slots = w if longest is None else min(w, longest)
                caches.append(cache_class("last_recent")(self.kv_cache_params(batch_size, slots), sink_tokens=0))
        self.assign_kv_caches(caches)

    def assign_kv_caches(self, caches: list[KVCache]) -> None:
        if len(caches) != len(self.blocks):
            raise ValueError(f"need one cache per layer ({len(self.blocks)}), got {len(caches)}")
        for block, cache, is_local in zip(self.blocks, caches, self.local):
            opts = block.attn.attn_opts
            cache.attn_opts.backend, cache.attn_opts.scale = opts.backend, opts.scale
            cache.attn_opts.softcap, cache.attn_opts.sliding_window = opts.softcap, opts.sliding_window
            # cos, sin of any positions, the layer's own: for a policy that undoes or predicts RoPE
            cache.rotary = (self.rope_local if is_local else self.rope).forward
            block.attn.kv_cache = cache

    def clear_kv_caches(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    @property
    def kv_caches(self) -> list[KVCache]:
        return [b.attn.kv_cache for b in self.blocks if b.attn.kv_cache is not None]

    def set_attention_backend(self, backend: str) -> None:
        """Force an attention backend (auto | flash | efficient | cudnn | math | eager) for every layer."""
        opts = AttentionOptions(backend=backend)  # validates the name
        for block in self.blocks:
            block.attn.attn_opts.backend = opts.backend
            if block.attn.kv_cache is not None:
                block.attn.kv_cache.attn_opts.backend = opts.backend
