"""How a compiled decode step attends: one query per sequence over a whole fixed-size buffer, at fixed shapes, with
no host synchronisation (model/compiled_decode.py captures it in a CUDA graph).

Three forms for the caches that attend their buffer (`static_decode_attention`), chosen by CompiledDecode:

* `sdpa_gqa` (CUDA): SDPA under a boolean slot mask with `enable_gqa`; PyTorch runs cuDNN's kernel there, which
  reads each KV head's K/V once for all its query heads.
* `sdpa` (elsewhere): SDPA under the slot mask with the query heads of each KV group as that group's rows, query
  (B, G, n_head / G, hs) against key (B, G, S, hs): no `enable_gqa`, which the CPU kernel pays for on every call.
* `triton` (CUDA, int8/int4 buffers): our split-K kernel (model/triton_decode.py), which reads the codes, scales
  and zeros and dequantizes tile by tile instead of attending a dequantized copy of the buffer.

The score-based caches evict by the softmax weights, which no fused kernel returns: `static_weighted_decode` is
their form ("grouped"), explicit grouped matmuls over every slot plus the step's own token, one softmax.
K/V are never expanded in any form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import sdpa_kernel

from model.attention import AttentionOptions, choose_backend, kernel_order

FORMS = ("sdpa", "sdpa_gqa", "triton")
WEIGHTED = "grouped"  # the score-based caches' form


def static_decode_attention(
    query: Tensor, key: Tensor, value: Tensor, n_valid: Tensor, opts: AttentionOptions
) -> Tensor:
    """query (B, n_head, 1, hs); key, value (B, G, S, hs) whose first `n_valid` slots are filled (a 0-d int64
    tensor, the same for every sequence and head). Returns (B, 1, n_head * hs). `opts.decode_form` picks the form;
    the SDPA forms run the kernel `opts.backend` names, under "auto" the first of flash, cuDNN, mem-efficient and
    math that can (PyTorch's own order puts cuDNN after math, and a compiled step traced in that order decomposed
    SDPA into the math path, K/V expanded to float32 every step)."""
    B, H, T, hs = query.shape
    if T != 1:
        raise ValueError(f"static_decode_attention takes one query per sequence, got T={T}")
    if opts.decode_form == "triton":
        from model import triton_decode

        return triton_decode.decode_attention(query, key, value, n_valid, opts.scale, opts.launch)
    G = key.shape[1]
    mask = (torch.arange(key.shape[2], device=key.device) < n_valid).view(1, 1, 1, -1)  # (1, 1, 1, S)
    with sdpa_kernel(*kernel_order(opts.backend)):
        if opts.decode_form == "sdpa_gqa":
            # (B, n_head, 1, hs)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=opts.scale, enable_gqa=G != H)
            return out.transpose(1, 2).reshape(B, 1, H * hs)  # (B, 1, n_head * hs)
        # head h is row h % q_per_kv of group h // q_per_kv
        grouped = query.reshape(B, G, H // G, hs)  # (B, G, q_per_kv, hs)
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=opts.scale)  # (B, G, qpk, hs)
    return out.reshape(B, 1, H * hs)  # (B, 1, n_head * hs), heads in order


def static_weighted_decode(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    filled: Tensor | None,
    new_key: Tensor,
    new_value: Tensor,
    opts: AttentionOptions,
) -> tuple[Tensor, Tensor]:
    """The score-based caches' step: one query per sequence over every slot of a fixed-size buffer (`filled` False
    at empty slots) and over the step's own token, which is not in the buffer yet, with one softmax over both; the
    same operations as `grouped_attention` with two segments, at fixed shapes.

    query (B, n_head, 1, hs); key, value (B, G, L, hs); filled (B, G, L) bool, or None where every slot is filled (the
    eager step over a buffer's filled prefix); new_key, new_value (B, G, 1, hs).
    Returns (output (B, 1, n_head * hs), float32 softmax weights (B, G, L + 1) summed over each group's query heads,
    0 at empty slots, the step's token last).
    """
    B, H, _, hs = query.shape
    G, L = key.shape[1], key.shape[2]
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(hs)
    q = query.view(B, G, H // G, hs)  # (B, G, q_per_kv, hs): head h is row h % q_per_kv of group h // q_per_kv
    old = torch.matmul(q, key.transpose(-1, -2)).mul_(scale)  # (B, G, q_per_kv, L)
    if filled is not None:
        old = old.masked_fill(~filled.unsqueeze(2), float("-inf"))
    new = torch.matmul(q, new_key.transpose(-1, -2)).mul_(scale)  # (B, G, q_per_kv, 1)
    probs = torch.softmax(torch.cat([old, new], dim=-1).float(), dim=-1)  # (B, G, q_per_kv, L + 1)
    weights = probs.sum(dim=2)  # (B, G, L + 1)
    probs = probs.to(query.dtype)
    out = torch.matmul(probs[..., :L], value).add_(torch.matmul(probs[..., L:], new_value))  # (B, G, q_per_kv, hs)
    return out.reshape(B, 1, H * hs), weights  # (B, 1, n_head * hs), heads in order


def decode_kernel(query: Tensor, key: Tensor, opts: AttentionOptions) -> str:
    """What the step's attention runs for query (B, n_head, 1, hs) and key (B, G, S, hs) (only shapes, strides, dtype
    and device count): "triton:<launch options>", or "sdpa:<backend>" as PyTorch chooses it under the step's kernel
    order, which is what the compiled step is traced with. Raises UnsupportedBackend when a forced SDPA kernel
    cannot run the step."""
    if opts.decode_form == "triton":
        return "triton:" + ",".join(f"{k}={v}" for k, v in sorted((opts.launch or {}).items()))
    B, H, _, hs = query.shape
    G = key.shape[1]
    mask = torch.ones(1, 1, 1, key.shape[2], dtype=torch.bool, device=key.device)  # (1, 1, 1, S)
    if opts.decode_form == "sdpa_gqa":
        return "sdpa:" + choose_backend(query, key, key, mask, False, G != H, opts.backend)
    grouped = query.reshape(B, G, H // G, hs)  # (B, G, q_per_kv, hs)
    return "sdpa:" + choose_backend(grouped, key, key, mask, False, False, opts.backend)
