"""`snapkv`: SnapKV (Li et al., 2024).

A call of several tokens (the prefill, or a chunk of it) scores every candidate by the attention it receives
from an observation window, the call's last `window` queries, summed over the window and the query group's
heads and pooled over neighbouring positions (`pooling` max or avg, `kernel` wide). When the candidates do not
fit, the best ones are kept, plus the window itself. Decoding then proceeds on that set: a decode step's token is
always kept (score +inf), and when the buffer is full the lowest-scored prompt token makes room.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from caches.base import KVCacheParams, register
from caches.scored import INF, Candidates, ScoredCache


@register("snapkv")
class SnapKVCache(ScoredCache):
    decode_weights = False  # a decode step keeps its token whatever the weights: one fused call
    decode_keeps_scores = True

    def __init__(
        self,
        params: KVCacheParams,
        window: int = 32,
        kernel: int = 7,
        pooling: str = "max",
        buffer: str = "float",
        group_size: int = 32,
    ) -> None:
        super().__init__(params, buffer, group_size)
        if window < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"window must be >= 1 and kernel odd and >= 1, got window={window}, kernel={kernel}")
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be max or avg, got {pooling!r}")
        self.window, self.kernel, self.pooling = window, kernel, pooling

    def weights_from(self, T: int) -> int | None:
        return max(0, T - self.window) if T > 1 else None

    def candidate_scores(self, c: Candidates) -> Tensor:
        old = c.old_score
        if c.T == 1:  # decode: keep the prompt's scores, never evict a generated token
            return torch.cat([old, torch.full_like(old[..., :1], INF).expand(*old.shape[:-1], 1)], dim=-1)
        w = c.w_new if c.w_old is None else torch.cat([c.w_old, c.w_new], dim=-1)  # (B, G, n + T)
        pos = c.pos
        order = torch.argsort(pos, dim=-1)  # pool over neighbouring positions, not slots (empty ones, -1, first)
        w_sorted = w.gather(-1, order)
        flat = w_sorted.flatten(0, 1).unsqueeze(1)  # (B * G, 1, n + T)
        pad = self.kernel // 2
        if self.pooling == "max":  # weights are >= 0 and an empty slot's is 0: it never wins
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        elif bool((pos < 0).any()):  # the mean over the real neighbours only (adakv's padded heads)
            real = (pos >= 0).gather(-1, order).float().flatten(0, 1).unsqueeze(1)
            pooled = F.avg_pool1d(flat, self.kernel, 1, pad) / F.avg_pool1d(real, self.kernel, 1, pad)
        else:
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad, count_include_pad=False)
        return torch.empty_like(w).scatter_(-1, order, pooled.view_as(w))

    def protected(self, cand_pos: Tensor, end: int, T: int) -> Tensor:
        return cand_pos >= end - (self.window if T > 1 else 1)


@register("pyramidkv")
class PyramidKVCache(SnapKVCache):
    """`pyramidkv`: SnapKV's scores with per-layer budgets in a pyramid (Cai et al., 2024): set_kv_caches gives the
    first layers the most slots and the last the fewest, the total the uniform one's (caches/allocation.py)."""

    allocation = "pyramid"
