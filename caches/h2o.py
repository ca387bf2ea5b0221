"""`h2o`: Heavy-Hitter Oracle (Zhang et al., 2023).

Keeps the `recent` newest tokens plus the heavy hitters. A token's score, per sequence and KV head, is the sum of
the softmax weights it has received from every query of its KV head's query group since it entered the cache
(its own call included). When slots are needed, the lowest-scoring tokens outside the recent window go (ties:
the older one). `normalize_scores` ranks by score / number of query positions that have seen the token instead,
so that old tokens are not favoured just for having been seen more often. Mechanics: caches/scored.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import KVCacheParams, register
from caches.scored import Candidates, ScoredCache


@register("h2o")
class H2OCache(ScoredCache):
    def __init__(
        self,
        params: KVCacheParams,
        recent: int | None = None,
        normalize_scores: bool = False,
        buffer: str = "float",
        group_size: int = 32,
    ) -> None:
        super().__init__(params, buffer, group_size)
        self.recent = params.cache_length // 2 if recent is None else recent
        if not 0 <= self.recent <= params.cache_length:
            raise ValueError(f"recent must be in [0, cache_length={params.cache_length}], got {recent}")
        self.normalize_scores = normalize_scores

    def candidate_scores(self, c: Candidates) -> Tensor:
        return torch.cat([c.old_score + c.w_old if c.w_old is not None else c.old_score, c.w_new], dim=-1)

    def rank(self, scores: Tensor, cand_pos: Tensor, cand_err: Tensor | None, end: int) -> Tensor:
        if self.normalize_scores:
            return scores / (end - cand_pos)  # queries at positions pos .. end-1 have seen the token
        return scores

    def protected(self, cand_pos: Tensor, end: int, T: int) -> Tensor:
        return cand_pos >= end - self.recent
