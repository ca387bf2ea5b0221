"""`keydiff`: evict the keys most similar to the mean key (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache
Eviction"). Query-free: per sequence and KV head the anchor is the mean of the candidates' unit-length keys (the
buffered and the call's new ones); a token's score is minus its key's cosine similarity to the anchor, recomputed
at every call (the anchor moves); the lowest go. A chunked prefill is the paper's block-wise compression: each chunk
scores the buffer and its own keys together.

The compiled decode step (`decode_step`, float buffer) keeps what the anchor is made of: each slot's inverse key
norm and the sum of the buffered unit keys (in float64, so that adding and removing one unit key a step does not
drift from the sum taken afresh). A step then adds its token's unit key, reads the buffered keys once (one
matrix-vector product) and takes the dropped token's unit key out: one pass over the keys instead of three (a norm,
the anchor's sum, the products). The eager step computes everything afresh, which on a CPU costs fewer launches."""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import KVCacheParams, register
from caches.prompt import Prompt
from caches.scored import Candidates, ScoredCache


def inverse_norm(keys: Tensor) -> Tensor:
    """(..., n) float32: one over each key's length (keys (..., n, hs); a zero key counts as tiny, not zero)."""
    return keys.float().norm(dim=-1).clamp_min(1e-30).reciprocal_()


@register("keydiff")
class KeyDiffCache(ScoredCache):
    decode_weights = False  # a decode step needs no attention weights: it decodes through one fused call

    def __init__(self, params: KVCacheParams, buffer: str = "float", group_size: int = 32) -> None:
        super().__init__(params, buffer, group_size)
        B, G, L = params.batch_size, params.n_query_groups, params.cache_length
        if self.fused_decode:  # the compiled step's anchor, kept (module docstring); empty slots hold 0
            dev = params.device
            self.register_buffer("inv_norm", torch.zeros(B, G, L, device=dev, dtype=torch.float32), persistent=False)
            shape = (B, G, 1, params.head_size)
            self.register_buffer("unit_sum", torch.zeros(shape, device=dev, dtype=torch.float64), persistent=False)
        self.anchor_current = False  # the kept anchor describes the buffer (eager calls do not update it)

    def weights_from(self, T: int) -> None:
        return None

    def candidate_scores(self, c: Candidates) -> Tensor:
        # cos(k, anchor) does not change with the anchor's length: the sum of the unit keys serves, and no unit copy
        # of the keys is made (two matrix-vector products over them)
        keys = c.keys().float()  # (B, G, n + T, hs)
        inv = inverse_norm(keys)  # (B, G, n + T)
        if not c.no_empty:  # an empty slot of a fixed-shape step takes no part in the anchor
            inv = inv.masked_fill_(c.pos < 0, 0)
        anchor = inv.unsqueeze(-2) @ keys  # (B, G, 1, hs)
        dots = (keys @ anchor.transpose(-1, -2)).squeeze(-1)  # (B, G, n + T)
        return dots.mul_(inv).div_(anchor.norm(dim=-1).clamp_min(1e-30)).neg_()

    # ---- the kept anchor of the compiled step ----------------------------------------------------------------

    def _step(self, query: Tensor, key: Tensor, value: Tensor, p: int) -> Tensor:
        self.anchor_current = False
        return super()._step(query, key, value, p)

    def _load(self, prompt: Prompt) -> None:
        self.anchor_current = False
        super()._load(prompt)

    def reset(self) -> None:
        super().reset()
        self.anchor_current = False

    def before_decode_step(self) -> None:
        """After eager calls, the anchor of the filled slots (a prefix) taken afresh, outside the compiled graph."""
        if not self.fused_decode or self.anchor_current:
            return
        B, n = self.batch_size, self.n_filled
        keys = self.buf.read(B, n)[0].float()  # (B, G, n, hs)
        self.inv_norm.zero_()
        self.inv_norm[:B, :, :n] = inverse_norm(keys)
        self.unit_sum[:B] = (self.inv_norm[:B, :, :n].unsqueeze(-2) @ keys).double()  # (B, G, 1, hs)
        self.anchor_current = True

    def decode_step(self, query: Tensor, key: Tensor, value: Tensor, pos: Tensor) -> Tensor:
        if not self.fused_decode:
            return super().decode_step(query, key, value, pos)
        B, L = key.shape[0], self.cache_length
        if not self.anchor_current:  # called without the compiled step's `before_decode_step` (a test, say)
            self.before_decode_step()
        slot = pos.clamp(max=L).view(1)  # (1,): after the filled prefix, or the extra slot (ScoredCache)
        self.buf.write_slots(B, slot, key, value)
        out = self.buf.attend_all(query, B, slot + 1, self.attn_opts)  # (B, 1, n_head * hs)
        keys = self.buf.read(B, L)[0].float()  # (B, G, L, hs); a filling buffer's token slot still counts empty
        inv, new_k = self.inv_norm[:B], key.float()  # (B, G, L), (B, G, 1, hs)
        inv_new = inverse_norm(new_k)  # (B, G, 1)
        unit_new = new_k * inv_new.unsqueeze(-1)  # (B, G, 1, hs)
        anchor = self.unit_sum[:B] + unit_new  # (B, G, 1, hs) float64: every candidate's unit key summed
        anchor32 = anchor.float()
        cos_scale = anchor32.norm(dim=-1).clamp_min(1e-30).reciprocal_().neg_()  # (B, G, 1)
        old = (keys @ anchor32.transpose(-1, -2)).squeeze(-1) * inv  # (B, G, L); empty slots 0
        new = (unit_new * anchor32).sum(dim=-1)  # (B, G, 1)
        cand_score = torch.cat([old, new], dim=-1).mul_(cos_scale)  # (B, G, L + 1)
        cand_pos = self._candidate_positions(B, pos)
        drop = self._one_to_drop(cand_pos, cand_score, None, pos)  # (B, G, 1)
        # the dropped candidate's unit key leaves the sum (an empty slot's is 0), the token's inverse norm follows it
        kept_new = drop != L
        at = drop.clamp(max=L - 1)
        inv_at = inv.gather(2, at)  # (B, G, 1)
        unit_at = keys.gather(2, at.unsqueeze(-1).expand(*at.shape, keys.shape[-1])) * inv_at.unsqueeze(-1)
        self.unit_sum[:B] = anchor - torch.where(kept_new.unsqueeze(-1), unit_at, unit_new)
        inv.scatter_(2, at, torch.where(kept_new, inv_new, inv_at))
        self._put_one(key, value, drop, cand_pos, cand_score, None)
        return out

    @classmethod
    def size_estimate_apriori(
        cls, params: KVCacheParams, buffer: str | None = None, group_size: int = 32, **policy_kwargs
    ) -> int:
        nbytes = super().size_estimate_apriori(params, buffer, group_size, **policy_kwargs)
        if not cls.fuses_decode(buffer):
            return nbytes
        B, G = params.batch_size, params.n_query_groups
        return nbytes + B * G * params.cache_length * 4 + B * G * params.head_size * 8
