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
    policy: str  # h2o | qh2o | tova | snapkv | knorm | random | keydiff | expected_attention
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
    seed: int = 0
    n_future: int = 512  # expected_attention
    n_sink: int = 4
    rope_base: float = 10000.0
    state: dict = field(default_factory=dict)
    queries: dict = field(default_factory=dict)  # expected_attention: (b, h) -> the pre-RoPE queries seen

    hs: int = 32

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
            self.queries = {(b, h): [] for b in range(B) for h in range(H)}
        if self.policy == "expected_attention" and T > 1:
            for b in range(B):
                for h in range(H):
                    for t in range(T):
                        if p + t >= self.n_sink:
                            self.queries[(b, h)].append(self._rotation(p + t).T @ q[b, h, t].double())
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
                if self.policy == "expected_attention":
                    weights = self._expected(cands, b, g, H, p + T) if T > 1 else weights
                self._rescore(old, new, weights, T, b, g)
                for c in new:  # stored as the buffer would store it
                    c.err = 0.0
                    if self.bits is not None:
                        kq, vq = self._store(c.k), self._store(c.v)
                        c.err = float((kq - c.k).norm() + (vq - c.v).norm())
                        c.k, c.v = kq, vq
                self.state[(b, g)] = self._select(cands, p + T, T)
        return out

    def _rotation(self, pos: int) -> torch.Tensor:
        """RoPE at `pos` as a (hs, hs) matrix acting on a column vector ("rotate half" layout), built explicitly."""
        hs = self.hs
        half = hs // 2
        r = torch.zeros(hs, hs, dtype=torch.float64)
        for i in range(half):
            angle = pos / self.rope_base ** (2 * i / hs)
            c, s = math.cos(angle), math.sin(angle)
            r[i, i], r[i, i + half] = c, -s  # out[i] = x[i] cos - x[i + half] sin
            r[i + half, i + half], r[i + half, i] = c, s  # out[i + half] = x[i + half] cos + x[i] sin
        return r

    def _expected(self, cands, b: int, g: int, H: int, end: int) -> list[float]:
        """Expected attention of each candidate: per query head, the softmax of mu'.k / sqrt(d) + k' Sigma' k / (2d)
        from the pre-RoPE queries' mean and covariance rotated by the mean rotation of the next n_future positions,
        averaged over the group's heads, times the value's norm."""
        hs = self.hs
        mean_rot = sum(self._rotation(t) for t in range(end, end + self.n_future)) / self.n_future
        total = [0.0] * len(cands)
        heads = range(g * (H // self.G), (g + 1) * (H // self.G))
        for h in heads:
            qs = torch.stack(self.queries[(b, h)])  # (N, hs)
            mu = qs.mean(0)
            cov = (qs - mu).T @ (qs - mu) / len(qs)
            mu_f, cov_f = mean_rot @ mu, mean_rot @ cov @ mean_rot.T
            z = [float(mu_f @ c.k) / math.sqrt(hs) + float(c.k @ cov_f @ c.k) / (2 * hs) for c in cands]
            m = max(x for x, c in zip(z, cands) if c.pos >= self.n_sink) if end > self.n_sink else 0.0
            e = [math.exp(x - m) if c.pos >= self.n_sink else 0.0 for x, c in zip(z, cands)]  # the sinks: kept
            if not any(e):
                continue
            total = [a + x / sum(e) / len(heads) for a, x in zip(total, e)]
        return [a * float(c.v.norm()) for a, c in zip(total, cands)]

    def _counts(self, t: int, T: int) -> bool:
        if self.policy in ("h2o", "qh2o"):
            return True
        if self.policy == "tova":
            return t == T - 1
        return T > 1 and t >= T - self.window  # snapkv: the observation window

    def _rescore(self, old, new, weights, T, b, g):
        cands = old + new
        if self.policy == "knorm":  # fixed at entry: minus the key's norm
            for c in new:
                c.score = -float(c.k.norm())
        elif self.policy == "random":
            for c in new:
                c.score = naive_hash(self.seed, b, g, c.pos)
        elif self.policy == "expected_attention":  # weights here are the expected ones; decode: keep the new token
            if T == 1:
                new[0].score = math.inf
            else:
                for c, w in zip(cands, weights):
                    c.score = w
        elif self.policy == "keydiff":  # minus the cosine to the mean unit key of every candidate, recomputed
            units = [c.k / c.k.norm() for c in cands]
            anchor = sum(units) / len(units)
            for c, u in zip(cands, units):
                c.score = -float(u @ anchor / anchor.norm())
        elif self.policy in ("h2o", "qh2o"):
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
        elif self.policy in ("tova", "knorm", "random", "keydiff"):
            ranks, protect = [c.score for c in cands], math.inf
        elif self.policy == "expected_attention":  # the sinks are kept
            ranks = [math.inf if c.pos < self.n_sink else c.score for c in cands]
            protect = math.inf
        else:
            ranks, protect = [c.score for c in cands], end - (self.window if T > 1 else 1)
        ranks = [math.inf if c.pos >= protect else r for c, r in zip(cands, ranks)]
        order = sorted(range(len(cands)), key=lambda i: (ranks[i], cands[i].pos))
        dropped = set(order[: len(cands) - self.L])
        return [c for i, c in enumerate(cands) if i not in dropped]


def naive_hash(seed: int, b: int, g: int, pos: int) -> float:
    """The random cache's score of a token, in plain Python integers."""
    m, mod = 73244475, 2**32
    x = (pos * m + b * 40503 + g * 9973 + seed * 2654435) % mod
    x = (((x >> 16) ^ x) * m) % mod
    x = (((x >> 16) ^ x) * m) % mod
    return (((x >> 16) ^ x) >> 8) / 2**24


def _minmax(xs: list[float]) -> list[float]:
    lo, hi = min(xs), max(xs)
    return [0.0 if hi == lo else (x - lo) / (hi - lo) for x in xs]


@dataclass
class NaiveAdaKV:
    """Ada-KV on SnapKV's or H2O's scores, plainly: per sequence, a list of (head, token) the layer keeps; each call
    scores every head's candidates, sets aside each head's top alpha x L and the protected newest, then keeps the
    G x L best over all heads (ties: the older goes first)."""

    L: int
    B: int
    G: int
    H: int
    scorer: str = "snapkv"
    alpha: float = 0.2
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    recent: int | None = None
    state: dict = field(default_factory=dict)

    def __post_init__(self):
        self.recent = self.L // 2 if self.recent is None else self.recent
        self.state = {b: [] for b in range(self.B)}  # b -> [(head, Token)]

    def kept(self, b: int, g: int) -> list[int]:
        return sorted(t.pos for h, t in self.state[b] if h == g)

    def step(self, q, k, v, p: int) -> torch.Tensor:
        B, H, T, hs = q.shape
        if p == 0:
            self.state = {b: [] for b in range(B)}
        out = torch.zeros(B, H, T, hs, dtype=torch.float64)
        for b in range(B):
            cands = []  # (head, token, protected)
            for g in range(self.G):
                old = [t for h, t in self.state[b] if h == g]
                new = [Token(p + t, k[b, g, t].double(), v[b, g, t].double()) for t in range(T)]
                mine = old + new
                weights = [0.0] * len(mine)
                for h in range(g * (H // self.G), (g + 1) * (H // self.G)):
                    for t in range(T):
                        qpos = p + t
                        logits = [
                            float(q[b, h, t].double() @ c.k) / math.sqrt(hs) if c.pos <= qpos else -math.inf
                            for c in mine
                        ]
                        m = max(logits)
                        e = [math.exp(x - m) for x in logits]
                        row = [x / sum(e) for x in e]
                        out[b, h, t] = sum(w * c.v for w, c in zip(row, mine))
                        if self.scorer == "h2o" or (T > 1 and t >= T - self.window):
                            weights = [a + w for a, w in zip(weights, row)]
                self._rescore(old, new, weights, T)
                end = p + T
                newest = end - (self.recent if self.scorer == "h2o" else (self.window if T > 1 else 1))
                by_score = sorted(range(len(mine)), key=lambda i: (-mine[i].score, -mine[i].pos))
                floor = by_score[: int(self.alpha * self.L)]
                cands += [(g, c, c.pos >= newest or i in floor) for i, c in enumerate(mine)]
            ranked = sorted(cands, key=lambda x: (-(math.inf if x[2] else x[1].score), -x[1].pos))
            self.state[b] = [(g, c) for g, c, _ in ranked[: self.G * self.L]]
        return out

    def _rescore(self, old, new, weights, T):
        mine = old + new
        if self.scorer == "h2o":
            for c, w in zip(mine, weights):
                c.score = (c.score if c in old else 0.0) + w
        elif T == 1:
            new[0].score = math.inf
        else:
            order = sorted(range(len(mine)), key=lambda i: mine[i].pos)
            ws = [weights[i] for i in order]
            half = self.kernel // 2
            for j, i in enumerate(order):
                span = ws[max(0, j - half) : j + half + 1]
                mine[i].score = max(span) if self.pooling == "max" else sum(span) / len(span)
