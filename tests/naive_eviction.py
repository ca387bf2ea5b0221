"""A naive reference for the score-based caches: plain Python loops over each sequence and KV head, an explicit
attention row per query over every candidate token, and selection by sorting Python tuples. It shares no code
with caches/ or model/attention.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def naive_quantize(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Dequantized copy of x (hs,) under per-group asymmetric min-max quantization, scale and zero in float16."""
    out = torch.empty_like(x, dtype=torch.float64)
    levels = 2**bits - 1
    for g0 in range(0, x.numel(), group):
        chunk = x[g0 : g0 + group].double()
        lo, hi = float(chunk.min()), float(chunk.max())
        scale = float(torch.tensor((hi - lo) / levels, dtype=torch.float32).half())
        zero = float(torch.tensor(lo, dtype=torch.float32).half())
        for i in range(chunk.numel()):
            q = 0 if scale == 0 else min(levels, max(0, round((float(chunk[i]) - zero) / scale)))
            out[g0 + i] = q * scale + zero
    return out


@dataclass
class Token:
    pos: int
    k: torch.Tensor  # as stored (dequantized when the buffer quantizes)
    v: torch.Tensor
    score: float = 0.0
    err: float = 0.0


@dataclass
class NaiveScoredCache:
    policy: str  # h2o | qh2o | tova | snapkv
    L: int
    B: int
    G: int
    H: int
    recent: int | None = None
    normalize: bool = False
    alpha: float = 0.5
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    bits: int | None = None  # None: full precision
    group: int = 32
    state: dict = field(default_factory=dict)

    def __post_init__(self):
        self.recent = self.L // 2 if self.recent is None else self.recent
        self.state = {(b, g): [] for b in range(self.B) for g in range(self.G)}

    def kept(self, b: int, g: int) -> list[int]:
        return sorted(t.pos for t in self.state[(b, g)])

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() if self.bits is None else naive_quantize(x, self.bits, self.group)

    def step(self, q, k, v, p: int) -> torch.Tensor:
        """q (B, H, T, hs); k, v (B, G, T, hs) -> attention output (B, H, T, hs) in float64."""
        B, H, T, hs = q.shape
        if p == 0:
            self.state = {key: [] for key in self.state}
        out = torch.zeros(B, H, T, hs, dtype=torch.float64)
        for b in range(B):
            calls = []  # per group: (old, new, weights)
            for g in range(self.G):
                old = self.state[(b, g)]
                new = [Token(p + t, k[b, g, t].double(), v[b, g, t].double()) for t in range(T)]
                cands = old + new
                weights = [0.0] * len(cands)
                for h in range(g * (H // self.G), (g + 1) * (H // self.G)):
                    for t in range(T):
                        qpos = p + t
                        logits = [
                            float(q[b, h, t].double() @ c.k) / math.sqrt(hs) if c.pos <= qpos else -math.inf
                            for c in cands
                        ]
                        m = max(logits)
                        e = [math.exp(x - m) for x in logits]
                        z = sum(e)
                        row = [x / z for x in e]
                        out[b, h, t] = sum(w * c.v for w, c in zip(row, cands))
                        if self._counts(t, T):
                            weights = [a + w for a, w in zip(weights, row)]
                calls.append((old, new, weights))
            if self.policy == "tova":  # the paper's rule: one score per token, averaged over the layer's heads
                by_pos = [{c.pos: w for c, w in zip(o + n, ws)} for o, n, ws in calls]
                mean = {pos: sum(d[pos] for d in by_pos) / self.G for pos in by_pos[0]}
                calls = [(o, n, [mean[c.pos] for c in o + n]) for o, n, _ in calls]
            for g, (old, new, weights) in enumerate(calls):
                cands = old + new
                self._rescore(old, new, weights, T)
                for c in new:  # stored as the buffer would store it
                    c.err = 0.0
                    if self.bits is not None:
                        kq, vq = self._store(c.k), self._store(c.v)
                        c.err = float((kq - c.k).norm() + (vq - c.v).norm())
                        c.k, c.v = kq, vq
                self.state[(b, g)] = self._select(cands, p + T, T)
        return out

    def _counts(self, t: int, T: int) -> bool:
        if self.policy in ("h2o", "qh2o"):
            return True
        if self.policy == "tova":
            return t == T - 1
        return T > 1 and t >= T - self.window  # snapkv: the observation window

    def _rescore(self, old, new, weights, T):
        cands = old + new
        if self.policy in ("h2o", "qh2o"):
            for c, w in zip(cands, weights):
                c.score = (c.score if c in old else 0.0) + w
        elif self.policy == "tova":
            for c, w in zip(cands, weights):
                c.score = w
        elif T == 1:  # snapkv decode
            new[0].score = math.inf
        else:  # snapkv: pool the window's weights over neighbouring positions
            order = sorted(range(len(cands)), key=lambda i: cands[i].pos)
            ws = [weights[i] for i in order]
            half = self.kernel // 2
            for j, i in enumerate(order):
                span = ws[max(0, j - half) : j + half + 1]
                cands[i].score = max(span) if self.pooling == "max" else sum(span) / len(span)

    def _select(self, cands, end, T):
        if len(cands) <= self.L:
            return cands
        if self.policy in ("h2o", "qh2o"):
            ranks = [c.score / (end - c.pos) if self.normalize else c.score for c in cands]
            if self.policy == "qh2o":
                ranks = [
                    self.alpha * a + (1 - self.alpha) * (1 - e)
                    for a, e in zip(_minmax(ranks), _minmax([c.err for c in cands]))
                ]
            protect = end - self.recent
        elif self.policy == "tova":
            ranks, protect = [c.score for c in cands], math.inf
        else:
            ranks, protect = [c.score for c in cands], end - (self.window if T > 1 else 1)
        ranks = [math.inf if c.pos >= protect else r for c, r in zip(cands, ranks)]
        order = sorted(range(len(cands)), key=lambda i: (ranks[i], cands[i].pos))
        dropped = set(order[: len(cands) - self.L])
        return [c for i, c in enumerate(cands) if i not in dropped]


def _minmax(xs: list[float]) -> list[float]:
    lo, hi = min(xs), max(xs)
    return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]
