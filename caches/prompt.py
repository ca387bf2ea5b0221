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

from dataclasses import dataclass, field

import torch
from torch import Tensor

from caches.base import KVCache
from model.attention import AttentionOptions, Visibility, grouped_attention


def prompt_weights(query: Tensor, key: Tensor, value: Tensor, p: int, w_from: int, opts: AttentionOptions) -> Tensor:
    """(B, G, T) float32: the causal softmax weights each of T prompt tokens (at positions p..) receives from the
    queries t >= w_from, summed over them and over the heads of each KV group (eager, those query rows alone)."""
    T = key.shape[2]
    vis = Visibility(q_start=p + w_from, k_pos=torch.arange(p, p + T, device=key.device), k_start=p)
    _, weights = grouped_attention(query[:, :, w_from:], [(key, value, vis)], opts, 0)
    return weights[0]


@dataclass
class Prompt:
    """One layer's view of a prompt prefilled in one call at position 0: query (B, n_head, T, hs), key and value
    (B, G, T, hs), RoPE applied."""

    query: Tensor
    key: Tensor
    value: Tensor
    computed: dict = field(default_factory=dict)  # (w_from, options) -> weights

    def weights(self, w_from: int, opts: AttentionOptions) -> Tensor:
        """`prompt_weights` of this prompt, computed once per (w_from, options)."""
        at = (w_from, repr(opts))
        if at not in self.computed:
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
