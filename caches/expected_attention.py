"""`expected_attention`: keep the tokens that future queries are expected to attend to (Devoto et al., 2025,
"Expected Attention", NVIDIA's kvpress). Query-free at compression time: no query of the future is seen, only the
statistics of the prompt's queries so far.

Per query head, the mean mu and covariance Sigma of the queries before RoPE (the prompt's, the first `n_sink`
positions left out), then rotated as the next `n_future` positions would rotate them, on average: with R the mean
of those positions' rotations, mu' = R mu and Sigma' = R Sigma R^T. A key k (stored after RoPE) gets, per head,

    z = mu'.k / sqrt(d) + k^T Sigma' k / (2 d)        (the log of E[exp(q.k / sqrt(d))] for a Gaussian q)

softmaxed over the candidates (the `n_sink` first tokens left out: they are kept), averaged over the heads of its KV
group, and multiplied by the norm of its value; the lowest go. The statistics grow with every prefill chunk and every
candidate is scored again; decode steps use them as they are, and keep the tokens they generate (the prompt's
lowest-scored token makes room), as SnapKV does. Mechanics: caches/scored.py.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from caches.base import KVCacheParams, register
from caches.scored import INF, Candidates, ScoredCache


def rotate_half_matrix(hs: int, device) -> Tensor:
    """Q (hs, hs) with x @ Q = rotate_half(x) = [-x2, x1]."""
    half = hs // 2
    q = torch.zeros(hs, hs, device=device)
    q[torch.arange(half, hs), torch.arange(half)] = -1.0  # output i < half takes -x[i + half]
    q[torch.arange(half), torch.arange(half, hs)] = 1.0  # output i >= half takes x[i - half]
    return q


@register("expected_attention")
class ExpectedAttentionCache(ScoredCache):
    decode_weights = False  # a decode step keeps its token whatever the weights: one fused call
    headwise = False  # scores from query statistics it gathers itself

    def __init__(
        self,
        params: KVCacheParams,
        n_future: int = 512,
        n_sink: int = 4,
        use_covariance: bool = True,
        use_vnorm: bool = True,
        buffer: str = "float",
        group_size: int = 32,
    ) -> None:
        super().__init__(params, buffer, group_size)
        if n_future < 1 or n_sink < 0:
            raise ValueError(f"n_future must be >= 1 and n_sink >= 0, got {n_future}, {n_sink}")
        self.n_future, self.n_sink = n_future, n_sink
        self.use_covariance, self.use_vnorm = use_covariance, use_vnorm
        B, H, hs = params.batch_size, params.n_head, params.head_size
        self.register_buffer("q_sum", torch.zeros(B, H, hs, device=params.device), persistent=False)
        self.register_buffer("q_outer", torch.zeros(B, H, hs, hs, device=params.device), persistent=False)
        self.q_count = 0

    def weights_from(self, T: int) -> None:
        return None

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        self.q_sum.zero_()
        self.q_outer.zero_()
        self.q_count = 0
        return super()._prefill(query, key, value)

    def _load(self, prompt) -> None:
        self.q_sum.zero_()
        self.q_outer.zero_()
        self.q_count = 0
        self._observe(prompt.query, 0)
        self._end = prompt.key.shape[2]
        super()._load(prompt)

    def _step(self, query: Tensor, key: Tensor, value: Tensor, p: int) -> Tensor:
        T = query.shape[2]
        if T > 1:  # a prefill chunk: its queries join the statistics
            self._observe(query, p)
            self._end = p + T
        return super()._step(query, key, value, p)

    def _observe(self, query: Tensor, p: int) -> None:
        """Add the call's queries at positions >= n_sink, RoPE undone, to the running sums."""
        if self.rotary is None:
            raise ValueError("expected_attention needs the model's rotary embedding (set by GPT.assign_kv_caches)")
        B, H, T, hs = query.shape
        first = max(0, self.n_sink - p)
        if first >= T:
            return
        cos, sin = self.rotary(p + first, T - first, torch.float32)  # (T', hs)
        q = query[:, :, first:].float()  # (B, H, T', hs)
        half = hs // 2
        rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)  # rotate_half(q)
        pre = q * cos - rotated * sin  # RoPE undone: a rotation by minus the position's angles
        self.q_sum[:B] += pre.sum(dim=2)
        self.q_outer[:B] += torch.einsum("bhti,bhtj->bhij", pre, pre)
        self.q_count += T - first

    def _future(self, B: int, device) -> tuple[Tensor, Tensor | None]:
        """mu' (B, H, hs) and Sigma' (B, H, hs, hs): the statistics rotated as the next n_future positions would."""
        hs = self.params.head_size
        count = max(1, self.q_count)
        mu = self.q_sum[:B] / count
        cos, sin = self.rotary(self._end, self.n_future, torch.float32)  # (n_future, hs)
        rot = torch.diag(cos.mean(0)) + rotate_half_matrix(hs, device) * sin.mean(0)  # x @ rot: the mean rotation
        mu_f = mu @ rot
        if not self.use_covariance:
            return mu_f, None
        cov = self.q_outer[:B] / count - mu.unsqueeze(-1) * mu.unsqueeze(-2)
        return mu_f, rot.transpose(0, 1) @ cov @ rot

    def candidate_scores(self, c: Candidates) -> Tensor:
        old = c.old_score
        if c.T == 1:  # decode: the statistics stay; a generated token is kept
            return torch.cat([old, torch.full_like(old[..., :1], INF).expand(*old.shape[:-1], 1)], dim=-1)
        B, G = c.new_k.shape[:2]
        H, hs = self.params.n_head, self.params.head_size
        keys = c.keys().float()  # (B, G, n + T, hs)
        mu, cov = self._future(B, keys.device)
        mu = mu.view(B, G, H // G, 1, hs)  # (B, G, q_per_kv, 1, hs)
        z = (mu * keys.unsqueeze(2)).sum(-1) / math.sqrt(hs)  # (B, G, q_per_kv, n + T)
        if cov is not None:
            cov = cov.view(B, G, H // G, hs, hs)
            quad = torch.einsum("bgsi,bghij,bgsj->bghs", keys, cov, keys)  # k^T Sigma' k per head
            z = z + quad / (2 * hs)
        # the softmax over the candidates that can go: not the empty slots, not the sinks (kept anyway), as kvpress
        # scores them; a call of sinks alone scores nothing
        z = z.masked_fill((c.pos < self.n_sink).unsqueeze(2), -INF)
        scores = torch.softmax(z, dim=-1).nan_to_num(0.0).mean(dim=2)  # (B, G, n + T): averaged over the group's heads
        if self.use_vnorm:
            scores = scores * c.values().float().norm(dim=-1)
        return scores

    def protected(self, cand_pos: Tensor, end: int, T: int) -> Tensor:
        return cand_pos < self.n_sink

    def reset(self) -> None:
        super().reset()
        self.q_count = 0

    @classmethod
    def size_estimate_apriori(cls, params: KVCacheParams, buffer: str = "float", group_size: int = 32, **knobs) -> int:
        """The scored buffer's bytes and the query statistics: a float32 sum and sum of outer products per head."""
        B, H, hs = params.batch_size, params.n_head, params.head_size
        return super().size_estimate_apriori(params, buffer, group_size) + B * H * (hs + hs * hs) * 4
