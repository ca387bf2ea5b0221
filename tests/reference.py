"""Independent references for the tests: written with plain tensor ops and explicit full masks, sharing no code
with model/attention.py or caches/ (only the weights are read from a GPT)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def naive_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, softcap: float | None = None) -> Tensor:
    """q (B, H, T, hs); k, v (B, G, S, hs); allowed (T, S) bool. K/V expanded head by head, full softmax."""
    B, H, T, hs = q.shape
    G = k.shape[1]
    out = torch.empty_like(q)
    for h in range(H):
        g = h // (H // G)
        scores = q[:, h] @ k[:, g].transpose(-1, -2) / math.sqrt(hs)  # (B, T, S)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, g]
    return out


def window_allowed(T: int, window: int | None = None, sinks: int = 0) -> Tensor:
    """(T, T): query i sees key j iff j <= i and (window is None or i - j < window or j < sinks)."""
    i = torch.arange(T).view(-1, 1)
    j = torch.arange(T).view(1, -1)
    allowed = j <= i
    if window is not None:
        allowed &= (i - j < window) | (j < sinks)
    return allowed


def naive_forward(model, idx: Tensor, allowed: Tensor) -> Tensor:
    """Logits (B, T, vocab) of a Llama forward under an explicit (T, T) attention mask, from model's weights."""
    c = model.config
    B, T = idx.shape
    hs, H, G = c.head_size, c.n_head, c.n_query_groups

    def rms(x: Tensor, w: Tensor) -> Tensor:
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.norm_eps))

    half = hs // 2
    inv = 1.0 / (c.rope_base ** (torch.arange(0, half, dtype=torch.float64) * 2 / hs))
    ang = torch.arange(T, dtype=torch.float64).view(-1, 1) * inv.view(1, -1)  # (T, hs/2)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(x: Tensor) -> Tensor:  # x (B, heads, T, hs), rotate-half layout
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    emb = model.lm_head.weight.t() if model.wte is None else model.wte.weight  # (vocab, n_embd)
    x = emb[idx]
    for blk in model.blocks:
        h = rms(x, blk.norm_1.weight)
        qkv = h @ blk.attn.qkv.weight
        if blk.attn.qkv.bias is not None:
            qkv = qkv + blk.attn.qkv.bias
        q = qkv[..., : H * hs].reshape(B, T, H, hs).transpose(1, 2)
        k = qkv[..., H * hs : (H + G) * hs].reshape(B, T, G, hs).transpose(1, 2)
        v = qkv[..., (H + G) * hs :].reshape(B, T, G, hs).transpose(1, 2)
        y = naive_attention(rope(q), rope(k), v, allowed)
        x = x + y.transpose(1, 2).reshape(B, T, H * hs) @ blk.attn.proj.weight
        h = rms(x, blk.norm_2.weight)
        gate, up = (h @ blk.mlp.fc.weight).chunk(2, dim=-1)
        x = x + (torch.nn.functional.silu(gate) * up) @ blk.mlp.proj.weight
    return rms(x, model.norm.weight) @ model.lm_head.weight
