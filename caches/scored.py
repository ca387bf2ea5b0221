"""Score-based eviction on fixed buffers: the machinery shared by h2o, qh2o, tova, snapkv, pyramidkv, knorm, keydiff,
random and expected_attention.

Each sequence and KV head has `cache_length` slots; a slot holds a token's K/V (in any buffer, see
caches/buffers.py), its position and its score. Every call (prefill, chunk or decode step) of T tokens at
position p does the same:

1. Attend: the T queries see the tokens in the buffer and the call's own tokens (causally), through the eager
   grouped path with two key segments, so neither K/V nor the buffer grows (a decode step: one fused call where the
   policy reads no weights, below; where it does, `static_weighted_decode`'s few operations over the filled slots
   and the token, one softmax). The call's own tokens are attended at full precision; tokens read from the buffer
   are dequantized. The softmax weights the policy asks for come out of the same pass.
2. Score: the policy turns the weights into a score for every candidate (buffered and new tokens).
3. Select: if the candidates do not fit, the lowest-ranked ones are evicted (ties: the older token), protected
   ones last; surviving new tokens are written into the freed slots. Decisions are per sequence and KV head.

A call into an empty buffer (a prompt's first) attends as dense does (causal, fused kernels) and computes the
weights of the policy's query rows alone on the eager path; then the best `cache_length` tokens are kept. The model's
hidden states are then dense's, so one recorded prompt can load every such cache (`load_prompt`, caches/prompt.py).

`decode_step` is the one-token call at fixed shapes, for the compiled decode step (model/compiled_decode.py):
every slot is attended (empty ones masked) and is a candidate, empty slots ranking lowest, so one rule covers a
filling buffer and a full one, with no Python int and no host synchronisation.

A policy whose decode step needs no attention weights (`decode_weights = False`: knorm, keydiff and random score by
keys, snapkv and expected_attention keep what they generate) decodes through one fused attention call on a float
buffer: the buffer has one slot more than the cache keeps, the step's token is written to the first free slot (the
extra one once the buffer is full), the filled slots are attended as they lie (SDPA, no mask, no weights), and only
then is the token admitted: on a full buffer the lowest-ranked of the L + 1 goes and the token's K/V are copied
into its slot (`_select_in_place`). The extra slot is counted in the cache's bytes. A quantized buffer keeps the
grouped path (the step's own token is attended at full precision there), and so does a layer under a model-level
sliding window (the grouped step attends every kept token, as it always has).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from caches.base import KVCache, KVCacheParams
from caches.buffers import buffer_nbytes, make_buffer
from caches.prompt import Prompt, prompt_weights
from model.attention import Visibility, grouped_attention, record
from model.decode_attention import static_weighted_decode

INF = float("inf")


@dataclass
class Candidates:
    """What a policy scores a call's candidates by: the buffered tokens (the first n) and the call's new ones (the
    last T). Keys and values as stored (dequantized from a quantized buffer) and as they arrive; empty buffer slots
    (a fixed-shape decode step's) at position -1."""

    old_score: Tensor  # (B, G, n) the stored scores
    w_old: Tensor | None  # (B, G, n) softmax weights summed over the policy's queries and the group's heads
    w_new: Tensor | None  # (B, G, T)
    T: int
    old_k: Tensor  # (B, G, n, hs)
    new_k: Tensor  # (B, G, T, hs)
    old_v: Tensor
    new_v: Tensor
    old_pos: Tensor  # (B, G, n) token positions of the buffered slots
    new_pos: Tensor  # (B, G, T) (an expanded view)
    no_empty: bool = False  # every candidate is a token (no empty slot of a fixed-shape step, no padding)
    joined_k: Tensor | None = None  # (B, G, n + T, hs): the keys as they already lie side by side (the fused step's)

    @property
    def pos(self) -> Tensor:
        """(B, G, n + T): every candidate's token position (built when a policy asks: most do not)."""
        return torch.cat([self.old_pos, self.new_pos], dim=-1)

    def keys(self) -> Tensor:
        """(B, G, n + T, hs): every candidate's key (a copy, unless they already lie side by side)."""
        if self.joined_k is not None:
            return self.joined_k
        return torch.cat([self.old_k, self.new_k.to(self.old_k.dtype)], dim=2)

    def values(self) -> Tensor:
        return torch.cat([self.old_v, self.new_v.to(self.old_v.dtype)], dim=2)


class ScoredCache(KVCache):
    requires_attn_weights = True
    supports_compiled_decode = True  # decode_step: fixed shapes, no Python ints
    uses_quant_error = False  # qh2o: also keep each token's K+V quantization error
    # Its scores are each KV head's own, from the call's candidates alone: caches/adakv.py can take them per head
    headwise = True
    default_buffer = "float"
    shares_prefill = True
    decode_weights: ClassVar[bool] = True  # a decode step's policy reads the step's attention weights
    # a decode step leaves the buffered tokens' scores as they are, its token's score from the token alone
    decode_keeps_scores: ClassVar[bool] = False
    idempotent_decode = False  # a step scores and evicts

    def __init__(self, params: KVCacheParams, buffer: str = "float", group_size: int = 32) -> None:
        super().__init__(params)
        B, G, L = params.batch_size, params.n_query_groups, params.cache_length
        self.fused_decode = self.fuses_decode(buffer)  # decode steps: one fused call over a slot more than L
        self.requires_attn_weights = not self.fused_decode  # the compiled step's form (model/compiled_decode.py)
        self.buf = make_buffer(replace(params, cache_length=L + self.fused_decode), buffer, group_size)
        self.register_buffer("pos", torch.full((B, G, L), -1, device=params.device, dtype=torch.long), persistent=False)
        self.register_buffer("score", torch.zeros(B, G, L, device=params.device, dtype=torch.float32), persistent=False)
        if self.uses_quant_error:
            self.register_buffer(
                "qerr", torch.zeros(B, G, L, device=params.device, dtype=torch.float32), persistent=False
            )
        self.n_filled = 0  # filled slots (a prefix), the same for every sequence and head

    @classmethod
    def fuses_decode(cls, buffer: str | None) -> bool:
        return not cls.decode_weights and (buffer or cls.default_buffer) == "float"

    # ---- the policy ----------------------------------------------------------------------------------------------

    def weights_from(self, T: int) -> int | None:
        """First query of the call whose attention weights the policy needs (None: none)."""
        return 0

    def candidate_scores(self, c: Candidates) -> Tensor:
        """Scores (B, G, n + T) of the buffered tokens and the call's new ones after this call."""
        raise NotImplementedError

    def rank(self, scores: Tensor, cand_pos: Tensor, cand_err: Tensor | None, end: int) -> Tensor:
        """Ranking key (low is evicted first); `end` = position after the call's last token."""
        return scores

    def protected(self, cand_pos: Tensor, end: int, T: int) -> Tensor | None:
        """Candidates that are evicted only when nothing else is left (bool, like cand_pos)."""
        return None

    # ---- the machinery -----------------------------------------------------------------------------------------

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        self._empty()
        return self._step(query, key, value, 0)

    def _empty(self) -> None:
        self.pos.fill_(-1)
        self.buf.reset()
        self.score.zero_()
        self.n_filled = 0

    def _load(self, prompt: Prompt) -> None:
        """What `_step` keeps of a prompt in one call, its weights from the recorded prompt (caches/prompt.py)."""
        self._empty()
        w_from = self.weights_from(prompt.key.shape[2])
        w_new = None if w_from is None else prompt.weights(w_from, self.attn_opts)
        self._admit(prompt.key, prompt.value, 0, None, w_new)

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        return self._step(query, key, value, input_pos)

    def _step(self, query: Tensor, key: Tensor, value: Tensor, p: int) -> Tensor:
        B, G, T, _ = key.shape
        n = self.n_filled
        w_from = self.weights_from(T)
        if n == 0 and T > 1:
            # An empty buffer: the output as dense computes it (causal, fused kernels), the weights from the eager
            # path on the policy's query rows alone. Far less work for a long prompt than one eager pass, and the
            # hidden states are dense's, so a prompt recorded once serves every cache (caches/prompt.py).
            out = self._attend(query, key, value, Visibility(q_start=p))
            w_new = None if w_from is None else prompt_weights(query, key, value, p, w_from, self.attn_opts)
            self._admit(key, value, p, None, w_new)
            return out
        if T == 1 and self.fused_decode and self.attn_opts.sliding_window is None:
            # the step's token in the first free slot (the extra one on a full buffer), every filled slot attended
            self.buf.write_range(B, n, key, value)
            k, v = self.buf.read(B, n + 1)  # (B, G, n + 1, hs)
            out = self._attend(query, k, v, Visibility(q_start=p, all_visible=True))
            self._admit(key, value, p, None, None, *((k[:, :, :n], v[:, :, :n]) if n else ()), in_buffer=True)
            return out
        plain = self.attn_opts.softcap is None and self.attn_opts.sliding_window is None
        if T == 1 and n and w_from is not None and plain:
            # a step whose policy reads its weights: the filled prefix and the token, one softmax, at full precision
            # for the token (`grouped_attention`'s result, in fewer operations)
            old_k, old_v = self.buf.read(B, n)  # (B, G, n, hs)
            out, weights = static_weighted_decode(query, old_k, old_v, None, key, value, self.attn_opts)
            record("eager")
            self._admit(key, value, p, weights[..., :n], weights[..., n:], old_k, old_v)
            return out.view(B, 1, -1, query.shape[-1]).transpose(1, 2)  # (B, n_head, 1, hs), as the other paths
        new_pos = torch.arange(p, p + T, device=key.device) if T > 1 else None  # a decode step needs no mask
        segments = []
        if n:
            old_k, old_v = self.buf.read(B, n)  # (B, G, n, hs)
            segments.append((old_k, old_v, Visibility(q_start=p, k_pos=self.pos[:B, :, :n], all_visible=True)))
        segments.append((key, value, Visibility(q_start=p, k_pos=new_pos, all_visible=T == 1, k_start=p)))
        out, weights = grouped_attention(query, segments, self.attn_opts, w_from)
        w_old = weights[0] if weights is not None and n else None
        w_new = weights[-1] if weights is not None else None
        self._admit(key, value, p, w_old, w_new, *(segments[0][:2] if n else ()))
        return out

    def _admit(
        self,
        key: Tensor,
        value: Tensor,
        p: int,
        w_old: Tensor | None,
        w_new: Tensor | None,
        old_k: Tensor | None = None,
        old_v: Tensor | None = None,
        in_buffer: bool = False,
    ) -> None:
        """Score the buffered tokens and the call's T new ones (at positions p..), given the weights they received
        (w_old (B, G, n), w_new (B, G, T), None where the policy asks for none), and keep the best that fit.
        in_buffer: the fused step's one token, already written to slot n."""
        B, G, T, _ = key.shape
        n, L = self.n_filled, self.cache_length
        if old_k is None:  # an empty buffer
            old_k, old_v = key[:, :, :0], value[:, :, :0]  # (B, G, 0, hs)
        old_pos, new_pos = self.pos[:B, :, :n], torch.arange(p, p + T, device=key.device).expand(B, G, T)
        joined_k = self.buf.read(B, n + T)[0] if in_buffer else None  # (B, G, n + T, hs), a view
        call = Candidates(
            self.score[:B, :, :n], w_old, w_new, T, old_k, key, old_v, value, old_pos, new_pos, True, joined_k
        )
        cand_score = self.candidate_scores(call)  # (B, G, n + T)
        new_err = self.buf.error(key, value) if self.uses_quant_error else None  # (B, G, T)
        if n + T <= L:
            if not in_buffer:
                self.buf.write_range(B, n, key, value)
            self.pos[:B, :, n : n + T] = new_pos
            self.score[:B, :, : n + T] = cand_score
            if new_err is not None:
                self.qerr[:B, :, n : n + T] = new_err
            self.n_filled = n + T
        elif in_buffer:
            self._select_in_place(p, cand_score)
        elif T == 1:
            self._select_one(key, value, p, cand_score, new_err)
        else:
            self._select(key, value, p, cand_score, new_err)

    def _select_one(
        self, key: Tensor, value: Tensor, pos: int | Tensor, cand_score: Tensor, new_err: Tensor | None
    ) -> None:
        """A decode step at position `pos` (an int, or a 0-d tensor on the device) over every slot of the buffer:
        exactly one of the L + 1 candidates (the slots, then the new token) goes. Empty slots (position -1) rank
        below everything, so on a buffer still filling the token takes the first empty one; on a full buffer it is
        `_select`'s rule, with reductions instead of sorts and masked scatters instead of data-dependent indexing
        (fixed shapes, no host synchronisation). cand_score (B, G, L + 1); new_err (B, G, 1) or None."""
        B, G = key.shape[:2]
        L = self.cache_length
        new_pos = pos.expand(B, G, 1) if isinstance(pos, Tensor) else torch.full((B, G, 1), pos, device=key.device)
        cand_pos = torch.cat([self.pos[:B], new_pos], dim=-1)  # (B, G, L + 1)
        cand_err = None if new_err is None else torch.cat([self.qerr[:B], new_err], dim=-1)
        rank = self.rank(cand_score, cand_pos, cand_err, pos + 1)
        prot = self.protected(cand_pos, pos + 1, 1)
        if prot is not None:
            rank = rank.masked_fill(prot, INF)
        rank = rank.masked_fill(cand_pos < 0, -INF)  # an empty slot is taken before anything is evicted
        lowest = rank == rank.amin(dim=-1, keepdim=True)  # (B, G, L + 1)
        drop = torch.where(lowest, cand_pos, torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)  # the oldest
        keep_new = drop != L  # (B, G, 1): the new token survives and takes the dropped token's (or empty) slot
        slot = drop.clamp(max=L - 1)
        self.score[:B] = cand_score[..., :L]
        self.buf.put_where(B, slot, keep_new, key, value)
        updates = [(self.pos, cand_pos[..., L:]), (self.score, cand_score[..., L:])]
        if new_err is not None:
            updates.append((self.qerr, new_err))
        for store, new in updates:
            view = store[:B]
            view.scatter_(2, slot, torch.where(keep_new, new, view.gather(2, slot)))

    def _select_in_place(self, p: int, cand_score: Tensor) -> None:
        """A fused eager step on a full buffer, the step's token at position p already in the extra slot L:
        `_select_one`'s rule (the lowest rank goes, ties to the older; no slot is empty) over the L + 1 candidates,
        and the token's K/V, position and score copied into the dropped one's slot (onto itself when it is the one
        dropped). The same decision with fewer operations: nothing is gathered back where the token does not stay.
        cand_score (B, G, L + 1)."""
        B, L = cand_score.shape[0], self.cache_length
        cand_pos = F.pad(self.pos[:B], (0, 1), value=p)  # (B, G, L + 1): the slots' positions, then the token's
        rank = self.rank(cand_score, cand_pos, None, p + 1)
        prot = self.protected(cand_pos, p + 1, 1)
        if prot is not None:
            rank = rank.masked_fill(prot, INF)
        lowest = rank == rank.amin(dim=-1, keepdim=True)  # (B, G, L + 1)
        drop = torch.where(lowest, cand_pos, torch.iinfo(torch.long).max).argmin(dim=-1, keepdim=True)  # (B, G, 1)
        self.pos[:B] = cand_pos.scatter_(2, drop, p)[..., :L]
        self.score[:B] = cand_score.scatter(2, drop, cand_score[..., L:])[..., :L]  # out of place: the source stays
        self.buf.move_slot(B, L, drop)

    def decode_step(self, query: Tensor, key: Tensor, value: Tensor, pos: Tensor) -> Tensor:
        """`_step` of one token at fixed shapes, for the compiled decode step (position `pos` on the device, no
        Python int, no host synchronisation): every slot attended, empty ones masked, plus the new token, one
        softmax (`static_weighted_decode`); then `_select_one` over every slot, which also covers a buffer still
        filling (the token goes to slot n_filled, as `_step` appends it)."""
        B, G = key.shape[:2]
        L = self.cache_length
        if self.fused_decode:
            # the filled slots are a prefix (the prompt's tokens, then one a step): the step's token goes after them,
            # to slot min(pos, L), and the first min(pos, L) + 1 slots are attended (`_step`'s fused call). The token
            # also goes to the extra slot L (the same slot on a full buffer; never attended on a filling one), so the
            # L + 1 candidates' keys lie side by side in the buffer and a policy reads them without a copy.
            slot = pos.clamp(max=L).view(1)  # (1,)
            both = torch.cat([slot, slot.new_full((1,), L)])  # (2,)
            self.buf.write_slots(B, both, key.expand(-1, -1, 2, -1), value.expand(-1, -1, 2, -1))  # (B, G, 2, hs)
            out = self.buf.attend_all(query, B, slot + 1, self.attn_opts)  # (B, 1, n_head * hs)
            joined_k, joined_v = self.buf.read(B, L + 1)  # (B, G, L + 1, hs)
            old_k, old_v = joined_k[:, :, :L], joined_v[:, :, :L]
            w_old = w_new = None
        else:
            joined_k = None
            old_k, old_v = self.buf.read(B, L)  # (B, G, L, hs), dequantized from a quantized buffer
            filled = self.pos[:B] >= 0  # (B, G, L)
            out, weights = static_weighted_decode(query, old_k, old_v, filled, key, value, self.attn_opts)
            w_old, w_new = weights[..., :L], weights[..., L:]
        old_pos, new_pos = self.pos[:B], pos.expand(B, G, 1)
        call = Candidates(self.score[:B], w_old, w_new, 1, old_k, key, old_v, value, old_pos, new_pos, False, joined_k)
        cand_score = self.candidate_scores(call)  # (B, G, L + 1)
        new_err = self.buf.error(key, value) if self.uses_quant_error else None  # (B, G, 1)
        self._select_one(key, value, pos, cand_score, new_err)
        return out

    def decoded(self, input_pos: int) -> None:
        super().decoded(input_pos)
        self.n_filled = min(input_pos + 1, self.cache_length)

    def _select(self, key: Tensor, value: Tensor, p: int, cand_score: Tensor, new_err: Tensor | None) -> None:
        B, G, T, _ = key.shape
        n, L = self.n_filled, self.cache_length
        new_pos = torch.arange(p, p + T, device=key.device).expand(B, G, T)
        cand_pos = torch.cat([self.pos[:B, :, :n], new_pos], dim=-1)  # (B, G, n + T)
        cand_err = None if new_err is None else torch.cat([self.qerr[:B, :, :n], new_err], dim=-1)
        rank = self.rank(cand_score, cand_pos, cand_err, p + T)
        prot = self.protected(cand_pos, p + T, T)
        if prot is not None:
            rank = rank.masked_fill(prot, INF)
        # The n + T - L lowest ranks go; ties go to the older token: sort by position, then stably by rank.
        by_pos = torch.argsort(cand_pos, dim=-1, stable=True)
        by_rank = torch.argsort(rank.gather(-1, by_pos), dim=-1, stable=True)
        drop = by_pos.gather(-1, by_rank[..., : n + T - L])  # (B, G, n + T - L) candidate indices
        keep = torch.ones_like(cand_pos, dtype=torch.bool).scatter_(-1, drop, False)
        free = torch.ones(B, G, L, dtype=torch.bool, device=key.device)
        free[..., :n] = ~keep[..., :n]  # evicted old tokens; slots n .. L-1 were empty
        # Per (b, g) as many free slots as surviving new tokens; nonzero lists both in (b, g) order.
        fb, fg, fs = free.nonzero(as_tuple=True)
        nb, ng, nt = keep[..., n:].nonzero(as_tuple=True)
        self.score[:B, :, :n] = cand_score[..., :n]
        if len(fs):
            self.buf.put(fb, fg, fs, key[nb, ng, nt], value[nb, ng, nt])
            self.pos[fb, fg, fs] = nt + p
            self.score[fb, fg, fs] = cand_score[nb, ng, nt + n]
            if new_err is not None:
                self.qerr[fb, fg, fs] = new_err[nb, ng, nt]
        self.n_filled = L

    def token_positions(self) -> Tensor:
        return self.pos[: self.batch_size or self.params.batch_size, :, : self.n_filled]

    def reset(self) -> None:
        super().reset()
        self.n_filled = 0

    @classmethod
    def size_estimate_apriori(
        cls, params: KVCacheParams, buffer: str | None = None, group_size: int = 32, **policy_kwargs
    ) -> int:
        buffer = buffer or cls.default_buffer
        B, G, L = params.batch_size, params.n_query_groups, params.cache_length
        per_slot = 8 + 4 + (4 if cls.uses_quant_error else 0)  # int64 position, float32 score (+ float32 error)
        slots = replace(params, cache_length=L + cls.fuses_decode(buffer))  # K/V: the fused decode's extra slot
        return buffer_nbytes(slots, buffer, group_size) + B * G * L * per_slot


def minmax(x: Tensor) -> Tensor:
    """Min-max normalise along the last dimension to [0, 1] (0 where all values are equal)."""
    lo = x.amin(dim=-1, keepdim=True)
    span = x.amax(dim=-1, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-30), torch.zeros_like(x))
