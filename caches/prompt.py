"""One prompt, many caches: what a layer saw of a prompt prefilled in one call, kept so that any cache can be loaded
with it instead of running the prompt through the model again.

A cache whose one-call prefill computes the layer's output as plain causal attention over the prompt (dense, every
score-based cache, adakv) leaves the model's hidden states exactly as dense leaves them; only what it keeps differs,
and that it decides from the prompt's queries, keys, values and attention weights. So one pass of the model with a
`PromptRecorder` per layer gives every such cache what it needs:

    recorders = [PromptRecorder(model.kv_cache_params(B, T)) for _ in model.blocks]
    model.assign_kv_caches(recorders)
    logits = prefill(model, ids, prefill_chunk=T)          # one call: the prompt's last logits, as any such cache's
    model.set_kv_caches(B, "snapkv", 512)
    for cache, recorder in zip(model.kv_caches, recorders):
        cache.load_prompt(recorder.prompt)                  # the state its own prefill of `ids` leaves

The weights a policy asks for (those of the queries from `weights_from` on) are computed when first asked, by the
same call its own prefill makes (`prompt_weights`), and kept for the next cache that asks: equal inputs, equal
numbers, so a loaded cache keeps exactly the tokens its own prefill keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from caches.base import KVCache
from model.attention import AttentionOptions, Visibility, block_rows, effective_window, mask_rows


def prompt_weights(query: Tensor, key: Tensor, value: Tensor, p: int, w_from: int, opts: AttentionOptions) -> Tensor:
    """(B, G, T) float32: the causal softmax weights each of T prompt tokens (at positions p..) receives from the
    queries t >= w_from, summed over them and over the heads of each KV group. The weights alone (no product with
    the values: the output comes from the fused call), in the eager path's blocks of query rows (a transient of the
    call's own size, model/attention.py `block_rows`) with its masks, one sample at a time: a block's scores are then
    the batch's size smaller and stay in the CPU's caches through the passes over them (half the time at batch 25
    and 2k). `value` is unused: it is there so that every scorer calls this with the prefill's arguments."""
    B, n_head, T, hs = query.shape
    if B > 1:
        return torch.cat([prompt_weights(query[b : b + 1], key[b : b + 1], value, p, w_from, opts) for b in range(B)])
    G = key.shape[1]
    q_per_kv = n_head // G
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(hs)
    vis = Visibility(q_start=p + w_from, k_pos=torch.arange(p, p + T, device=key.device), k_start=p)
    window = effective_window(vis.window, opts.sliding_window)
    q5 = query.view(B, G, q_per_kv, T, hs)[:, :, :, w_from:]  # (B, G, q_per_kv, R, hs): the policy's query rows
    R = T - w_from
    weights = torch.zeros(B, G, T, dtype=torch.float32, device=key.device)
    block = block_rows(query[:, :, w_from:], T, p + w_from, opts.block_size)
    for t0 in range(0, R, block):
        t1 = min(R, t0 + block)
        tb, lim = t1 - t0, vis.visible_prefix(t1, T)  # keys after the block's last query are never visible
        q_blk = q5[:, :, :, t0:t1].reshape(B, G, q_per_kv * tb, hs)  # (B, G, q_per_kv * tb, hs)
        scores = torch.matmul(q_blk, key[:, :, :lim].transpose(-1, -2)).float()  # (B, G, q_per_kv * tb, lim)
        scores.mul_(scale)
        if opts.softcap is not None:
            scores = torch.tanh(scores.div_(opts.softcap)).mul_(opts.softcap)
        scores = scores.view(B, G, q_per_kv, tb, lim)  # (B, G, q_per_kv, tb, lim)
        mask = mask_rows(replace(vis, k_pos=vis.k_pos[:lim]), t0, t1, lim, key.device, window)
        if mask is not None:  # (tb, lim): True = may attend
            scores.masked_fill_(mask.logical_not_(), float("-inf"))
        weights[..., :lim] += torch.softmax(scores, dim=-1).sum(dim=(2, 3))
    return weights


@dataclass
class Prompt:
    """One layer's view of a prompt prefilled in one call at position 0: query (B, n_head, T, hs), key and value
    (B, G, T, hs), RoPE applied."""

    query: Tensor
    key: Tensor
    value: Tensor
    computed: dict = field(default_factory=dict)  # (w_from, options) -> weights
    whole: Prompt | None = None  # the longer recording this prompt begins (`prefix`)

    def prefix(self, n: int) -> Prompt:
        """The first n positions: under causal attention, the prompt a prefill of its first n tokens records (views,
        no copy)."""
        return Prompt(self.query[:, :, :n], self.key[:, :, :n], self.value[:, :, :n], whole=self)

    def weights(self, w_from: int, opts: AttentionOptions) -> Tensor:
        """`prompt_weights` of this prompt, computed once per (w_from, options). A prefix whose whole prompt has its
        weights from every query (w_from 0) takes them, less what the whole's later queries gave: those rows alone
        are computed (causal: a query's softmax is the same in both prompts)."""
        at = (w_from, repr(opts))
        if at not in self.computed:
            whole, n = self.whole, self.key.shape[2]
            if w_from == 0 and whole is not None and at in whole.computed:
                later = prompt_weights(whole.query, whole.key, whole.value, 0, n, opts)[..., :n]  # (B, G, n)
                self.computed[at] = (whole.computed[at][..., :n] - later).clamp_min_(0)
            else:
                self.computed[at] = prompt_weights(self.query, self.key, self.value, 0, w_from, opts)
        return self.computed[at]


class PromptRecorder(KVCache):
    """A layer's cache for one prompt in one call: returns the causal attention dense's prefill returns, and keeps
    the prompt's tensors (`prompt`). Not registered: it records, it is not a strategy."""

    name = "prompt_recorder"

    def __init__(self, params) -> None:
        super().__init__(params)
        self.prompt: Prompt | None = None

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        self.prompt = Prompt(query, key, value)
        return self._attend(query, key, value, Visibility(q_start=0))

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        raise ValueError("a prompt recorder takes the prompt in one call (prefill_chunk >= its length)")

    def size_estimate(self) -> int:
        p = self.prompt
        return 0 if p is None else sum(t.numel() * t.element_size() for t in (p.query, p.key, p.value))
