"""`adakv`: Ada-KV's head-wise adaptive budget (Feng et al., 2024) around any per-head score-based cache's policy.

A layer holds `cache_length` slots per KV head on average, G x cache_length in all, in one flat buffer per
sequence: each slot has an owner (a KV head), a position and a score. When the candidates (the filled slots and
the call's new tokens of every head) do not fit, the layer keeps the highest scores across all its heads jointly,
after each head's top `alpha` x cache_length of its own are set aside (the floor a head never goes below), so a
head whose attention is spread keeps more tokens and a focused one fewer. The storage really is the layer's total:
K, V (B, G x cache_length, hs) and per slot an owner, a position and a score; nothing is a mask over a full
per-head buffer.

The scores are the `scorer` cache's (caches/scored.py): its policy, built without storage, scores each head's
candidates (`candidate_scores`), ranks and protects them (`rank`, `protected`) and says which queries' attention
weights it needs (`weights_from`); its knobs (SnapKV's window, kernel and pooling, H2O's recent) are passed through.
A policy whose scores are not a head's own cannot be wrapped: TOVA's are averaged over the heads (which here hold
different tokens), Expected Attention's come from query statistics of its own, Q-Hitter's from a quantization error
per slot (`headwise = False`).

A call gathers each head's own slots into a padded (B, G, longest, hs) block (grouped gather), then attends them
and the call's new tokens with one softmax (model/attention.py, grouped_attention): per call, a copy of the buffer
laid out by head, at most G times the longest head's share. A decode step on a full layer (float buffer) copies
nothing: the buffer has G slots more than the layer keeps, each head's token is written to one of them, and every
query head attends the whole flat buffer with the slots of other heads masked (two matrix products and a softmax,
the weights per slot out of the same pass); the G lowest-ranked candidates then go (two top-k's, no sort), and their
slots take the next step's tokens. Eager only: the selection has data-dependent shapes.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch
from torch import Tensor

from caches.base import KVCache, KVCacheParams, cache_class, cache_names, register
from caches.buffers import buffer_nbytes, make_buffer
from caches.prompt import Prompt, prompt_weights
from caches.scored import Candidates, ScoredCache
from model.attention import Visibility, grouped_attention, record

STORAGE = ("buffer", "group_size")  # a scorer's knobs that are about its storage: adakv has its own


def scorers() -> list[str]:
    """The caches whose policy adakv can wrap."""
    return [n for n in cache_names() if issubclass(cache_class(n), ScoredCache) and cache_class(n).headwise]


@register("adakv")
class AdaKVCache(KVCache):
    requires_attn_weights = True
    shares_prefill = True

    def __init__(
        self,
        params: KVCacheParams,
        scorer: str = "snapkv",
        alpha: float = 0.2,
        buffer: str = "float",
        group_size: int = 32,
        **scorer_knobs,
    ) -> None:
        super().__init__(params)
        if scorer not in scorers():
            raise ValueError(f"scorer={scorer!r} is not valid; valid choices: {', '.join(scorers())}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        # The policy alone: its own slots on the meta device hold nothing, and it is no submodule (no bytes of ours).
        self.__dict__["policy"] = cache_class(scorer)(replace(params, device=torch.device("meta")), **scorer_knobs)
        self.scorer, self.alpha = scorer, alpha
        B, G, L = params.batch_size, params.n_query_groups, params.cache_length
        self.slots = G * L  # the layer's total
        self.room = self.slots + G * (buffer == "float")  # the decode step's G extra slots (float buffer)
        flat = KVCacheParams(B, 1, params.n_head, params.head_size, self.room, params.device, params.dtype)
        self.buf = make_buffer(flat, buffer, group_size)  # (B, 1, room, X)
        for name, fill, dtype in (("owner", -1, torch.long), ("pos", -1, torch.long), ("score", 0, torch.float32)):
            self.register_buffer(
                name, torch.full((B, self.room), fill, dtype=dtype, device=params.device), persistent=False
            )
        # a full layer's G empty slots per sequence, where the next decode step writes its tokens
        self.register_buffer("free", torch.zeros(B, G, dtype=torch.long, device=params.device), persistent=False)
        self.free_known = False
        self.n_kept = 0  # tokens the layer holds, the same for every sequence (a Python int: no host sync)

    @classmethod
    def knob_defaults(cls, knobs: dict) -> dict:
        """Its own knobs and its scorer's (the scorer's storage knobs are its own)."""
        scorer = knobs.get("scorer") or inspect.signature(cls.__init__).parameters["scorer"].default
        own = super().knob_defaults(knobs)
        theirs = cache_class(scorer).knob_defaults(knobs) if scorer in cache_names() else {}
        return {**own, **{k: v for k, v in theirs.items() if k not in STORAGE}}

    @property
    def max_tokens_forward(self) -> int:
        return self.cache_length

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """The output as dense computes it, the policy's weights from its query rows alone (caches/prompt.py): the
        hidden states are dense's, so a recorded prompt loads this cache too (`_load`)."""
        w_from = self.policy.weights_from(key.shape[2])
        w_new = None if w_from is None else prompt_weights(query, key, value, 0, w_from, self.attn_opts)
        self._admit_prompt(key, value, w_new)
        return self._attend(query, key, value, Visibility(q_start=0))

    def _load(self, prompt: Prompt) -> None:
        w_from = self.policy.weights_from(prompt.key.shape[2])
        w_new = None if w_from is None else prompt.weights(w_from, self.attn_opts)
        self._admit_prompt(prompt.key, prompt.value, w_new)

    def _admit_prompt(self, key: Tensor, value: Tensor, w_new: Tensor | None) -> None:
        """An empty layer takes a prompt: its candidates are the prompt's tokens, the weights they received w_new."""
        self.owner.fill_(-1)
        self.pos.fill_(-1)
        self.score.zero_()
        self.buf.reset()
        self.n_kept = 0
        B, G, T, _ = key.shape
        old_k, old_v, old_pos, index = self._gather(B)  # nothing kept: one padding column per head
        w_old = None if w_new is None else torch.zeros(old_pos.shape, device=key.device)  # (B, G, 1)
        stored = self.score[:B].gather(1, index.flatten(1)).view(old_pos.shape)  # (B, G, 1)
        new_pos = torch.arange(T, device=key.device).expand(B, G, T)
        call = Candidates(stored, w_old, w_new, T, old_k, key, old_v, value, old_pos, new_pos)
        self._select(key, value, 0, call, index)

    def _gather(self, B: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each head's own slots (ascending), padded to the longest: K, V (B, G, longest, hs), their positions
        (B, G, longest) (-1: padding) and slot indices (B, G, longest) (0 at padding)."""
        G = self.params.n_query_groups
        S = self.room
        k_flat, v_flat = self.buf.read(B, S)  # (B, 1, S, hs)
        owner = self.owner[:B]
        counts = torch.stack([(owner == g).sum(dim=1) for g in range(G)], dim=1)  # (B, G)
        longest = max(1, int(counts.max()))
        # Slots sorted by (owner, slot), free ones (owner -1) last: head g's run starts after the heads before it.
        slot_ids = torch.arange(S, device=owner.device)
        by_owner = torch.argsort(torch.where(owner < 0, G, owner) * S + slot_ids, dim=1)  # (B, S)
        starts = counts.cumsum(dim=1) - counts  # (B, G)
        j = torch.arange(longest, device=owner.device)
        valid = j < counts.unsqueeze(-1)  # (B, G, longest)
        at = (starts.unsqueeze(-1) + j).clamp(max=S - 1).flatten(1)  # (B, G * longest)
        index = torch.where(valid, by_owner.gather(1, at).view(B, G, longest), 0)
        # rows of the flat (B * slots, hs) K and V: index_select copies whole rows (several times faster than gather)
        rows = (index + torch.arange(B, device=owner.device).view(B, 1, 1) * S).flatten()  # (B * G * longest,)
        k = k_flat.reshape(B * S, -1).index_select(0, rows).view(B, G, longest, -1)  # (B, G, longest, hs)
        v = v_flat.reshape(B * S, -1).index_select(0, rows).view(B, G, longest, -1)
        pos = torch.where(valid, self.pos[:B].gather(1, index.flatten(1)).view(B, G, longest), -1)
        return k, v, pos, index

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        B, G, T, _ = key.shape
        p = input_pos
        plain = self.attn_opts.softcap is None and self.attn_opts.sliding_window is None
        if T == 1 and self.n_kept == self.slots and self.room > self.slots and plain:
            return self._decode_full(query, key, value, p)
        old_k, old_v, old_pos, index = self._gather(B)
        new_pos = torch.arange(p, p + T, device=key.device)
        segments = [
            (old_k, old_v, Visibility(q_start=p, k_pos=old_pos, all_visible=False)),
            (key, value, Visibility(q_start=p, k_pos=new_pos if T > 1 else None, all_visible=T == 1, k_start=p)),
        ]
        out, weights = grouped_attention(query, segments, self.attn_opts, self.policy.weights_from(T))
        w_old, w_new = weights if weights is not None else (None, None)
        stored = self.score[:B].gather(1, index.flatten(1)).view(old_pos.shape)  # (B, G, longest)
        call = Candidates(stored, w_old, w_new, T, old_k, key, old_v, value, old_pos, new_pos.expand(B, G, T))
        self._select(key, value, p, call, index)
        return out

    def _decode_full(self, query: Tensor, key: Tensor, value: Tensor, p: int) -> Tensor:
        """A decode step on a full layer: `_extend`'s outputs and choices, over the flat buffer as it lies. Head g's
        token goes to the free slot free[b, g]; every query head attends all `room` slots with the other heads'
        masked (one softmax, weights per slot summed over the heads, which are 0 off a slot's owner); the policy
        scores the candidates and ranks them flat; the G lowest of the layer go and their slots are the next step's
        free ones. Owners, positions and scores are updated in place."""
        B, G, _, hs = key.shape
        S = self.room
        dev = key.device
        heads = torch.arange(G, device=dev)
        if not self.free_known:  # a full layer has exactly G empty slots per sequence
            self.free[:B] = torch.topk((self.owner[:B] < 0).to(torch.float32), G, dim=1).indices
            self.free_known = True
        free = self.free[:B]  # (B, G)
        self.buf.write_at(B, free.unsqueeze(1), key.view(B, 1, G, hs), value.view(B, 1, G, hs))  # head g's: free[b, g]
        rescores = not self.policy.decode_keeps_scores
        own = self.owner[:B].clone() if rescores else None  # (B, S), -1 at the free slots: the tokens come as new
        owner = self.owner[:B].scatter_(1, free, heads.expand(B, G))  # (B, S): every slot owned, the tokens' too
        slot_pos = self.pos[:B].scatter_(1, free, p)  # (B, S)
        other = owner.unsqueeze(1) != heads.view(1, G, 1)  # (B, G, S): slot s is not head g's

        k_flat, v_flat = self.buf.read(B, S)  # (B, 1, S, hs)
        out, probs = self._attend_flat(query, k_flat, v_flat, other)

        new_pos = torch.full((B, G, 1), p, device=dev)
        if rescores:
            scores = self.score[:B].copy_(self._rescored(probs, k_flat, v_flat, key, value, own, free, new_pos))
        else:  # the stored scores stay: only the tokens' are new (a one-slot stand-in for the others, not scored)
            score1, pos1 = (x[:, :1].unsqueeze(1).expand(B, G, 1) for x in (self.score[:B], slot_pos))
            k1, v1 = (x[:, :, :1].expand(B, G, 1, hs) for x in (k_flat, v_flat))
            call = Candidates(score1, None, None, 1, k1, key, v1, value, pos1, new_pos)
            scores = self.score[:B].scatter_(1, free, self.policy.candidate_scores(call)[..., 1])  # (B, S)

        drop = self._drop(scores, slot_pos, owner, other, p)  # (B, G)
        owner.scatter_(1, drop, -1)
        slot_pos.scatter_(1, drop, -1)
        scores.scatter_(1, drop, 0.0)
        free.copy_(drop)
        return out.unsqueeze(2)  # (B, n_head, 1, hs)

    def _attend_flat(self, query: Tensor, k_flat: Tensor, v_flat: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
        """One query per head (query (B, n_head, 1, hs)) over every slot of the flat buffer (k_flat, v_flat (B, 1, S,
        hs)), the slots of other heads masked (other (B, G, S)): (output (B, n_head, hs), float32 softmax weights (B,
        n_head, S), 0 off each head's own slots)."""
        B, H, _, hs = query.shape
        G, S = other.shape[1:]
        scale = self.attn_opts.scale if self.attn_opts.scale is not None else hs**-0.5
        q = query.reshape(B, H, hs) * scale  # (B, n_head, hs): query head h belongs to KV head h // (n_head / G)
        logits = torch.matmul(q, k_flat[:, 0].transpose(1, 2))  # (B, n_head, S)
        logits.view(B, G, H // G, S).masked_fill_(other.unsqueeze(2), float("-inf"))  # (B, G, R, S)
        probs = torch.softmax(logits.float(), dim=-1)  # (B, n_head, S)
        record("eager")
        return torch.matmul(probs.to(query.dtype), v_flat[:, 0]), probs  # (B, n_head, hs)

    def _drop(self, scores: Tensor, pos: Tensor, owner: Tensor, other: Tensor, p: int) -> Tensor:
        """The G slots (B, G) that go from a full layer's flat candidates (scores, pos, owner (B, S); other (B, G, S):
        not head g's): the lowest ranks, the policy's protected ones and each head's floor set aside."""
        G, S = other.shape[1:]
        rank = self.policy.rank(scores, pos, None, p + 1)  # (B, S): a policy's rank and protection are per candidate
        protect = self.policy.protected(pos, p + 1, 1)
        # `_keep`'s order among equal ranks: the older first, then the later in (head, column) order, which for one
        # position (held once per head) is the later head
        tie = pos * G - owner  # (B, S)
        drop = lowest(rank if protect is None else rank.masked_fill(protect, float("inf")), tie, G)  # (B, G)
        floor = int(self.alpha * self.cache_length)
        if floor and self._in_floor(rank, pos, owner, other, protect, drop, floor):
            # each head's own top `floor` set aside first (ties: the newer)
            B = rank.shape[0]
            per_head = rank.neg().unsqueeze(1).expand(B, G, S).masked_fill(other, float("inf"))  # the highest first
            top = lowest(per_head, (p - pos).unsqueeze(1).expand(B, G, S), min(floor, S))  # (B, G, floor)
            top = torch.zeros_like(other).scatter_(-1, top, True).masked_fill_(other, False).any(dim=1)  # (B, S)
            protect = top if protect is None else protect | top
            drop = lowest(rank.masked_fill(protect, float("inf")), tie, G)
        return drop

    def _rescored(
        self,
        probs: Tensor,
        k_flat: Tensor,
        v_flat: Tensor,
        key: Tensor,
        value: Tensor,
        own: Tensor,
        free: Tensor,
        new_pos: Tensor,
    ) -> Tensor:
        """`_decode_full`'s scores (B, S) from a policy that rescores the buffered tokens: each head's candidates
        through a (B, G, S + 1) view (its own slots, the others' at position -1, then its token), each slot's score
        read back from its owner's row and the tokens' written to their slots. probs (B, n_head, S): the step's
        softmax; k_flat, v_flat (B, 1, S, hs); own (B, S): the owners before the step (-1 at the free slots)."""
        B, G, _, hs = key.shape
        S = own.shape[1]
        theirs = own.unsqueeze(1) != torch.arange(G, device=own.device).view(1, G, 1)  # (B, G, S): not head g's
        w_old = w_new = None
        if self.policy.weights_from(1) is not None:
            w_slot = probs.sum(dim=1)  # (B, S): the weight each slot received from its owner's query heads
            w_old = w_slot.unsqueeze(1).expand(B, G, S).masked_fill(theirs, 0.0)  # (B, G, S)
            w_new = w_slot.gather(1, free).unsqueeze(-1)  # (B, G, 1)
        old_pos = self.pos[:B].unsqueeze(1).expand(B, G, S).masked_fill(theirs, -1)  # (B, G, S)
        k_all, v_all = k_flat.expand(B, G, S, hs), v_flat.expand(B, G, S, hs)  # views
        stored = self.score[:B].unsqueeze(1).expand(B, G, S)
        call = Candidates(stored, w_old, w_new, 1, k_all, key, v_all, value, old_pos, new_pos)
        scores = self.policy.candidate_scores(call)  # (B, G, S + 1)
        return scores[..., :S].gather(1, own.clamp(min=0).unsqueeze(1)).squeeze(1).scatter(1, free, scores[..., S])

    @staticmethod
    def _in_floor(
        rank: Tensor, pos: Tensor, owner: Tensor, other: Tensor, protect: Tensor | None, drop: Tensor, floor: int
    ) -> bool:
        """Whether a slot of `drop` (B, n) is among its head's top `floor` by rank (ties: the newer), that is, fewer
        than `floor` of its head's slots rank above it (rank, pos, owner (B, S); other (B, G, S): not head g's).
        Where none is, the floor changes nothing: the set-aside tokens are not the ones that go. First the quick
        answer: a head's unprotected slots that stay all rank above its dropped ones, and a head with `floor` + n +
        (the layer's protected slots) keeps `floor` of them, which most heads do."""
        n = drop.shape[1]
        margin = n if protect is None else protect.sum(dim=-1, keepdim=True) + n  # (B, 1)
        if not bool((other.shape[-1] - other.sum(dim=-1) - margin < floor).any()):
            return False
        r, p, g = (x.gather(1, drop).unsqueeze(-1) for x in (rank, pos, owner))  # (B, n, 1) each
        above = (rank.unsqueeze(1) > r) | ((rank.unsqueeze(1) == r) & (pos.unsqueeze(1) > p))  # (B, n, S)
        return bool(((above & (owner.unsqueeze(1) == g)).sum(dim=-1) < floor).any())

    def _protected_rank(self, scores: Tensor, cand_pos: Tensor, end: int, T: int) -> Tensor:
        """The policy's rank of each head's candidates (B, G, n), +inf where protected: the policy's protected ones
        and each head's own top alpha x cache_length (ties: the newer), set aside before the heads compete."""
        rank = self.policy.rank(scores, cand_pos, None, end)
        protect = self.policy.protected(cand_pos, end, T)
        protect = torch.zeros_like(cand_pos, dtype=torch.bool) if protect is None else protect
        floor = min(int(self.alpha * self.cache_length), rank.shape[-1])
        if floor:
            top = lowest(-rank, end - cand_pos, floor)  # (B, G, floor)
            protect = protect.scatter(-1, top, True)
        return rank.masked_fill(protect & (cand_pos >= 0), float("inf"))

    def _select(self, key: Tensor, value: Tensor, p: int, call: Candidates, index: Tensor) -> None:
        """Keep the layer's best G x cache_length candidates across heads (each head's floor first), write the new
        tokens that stay into the free slots."""
        T, end = call.T, p + call.T
        longest = call.old_pos.shape[-1]
        cand_pos = call.pos  # (B, G, longest + T), -1 at padding
        scores = self.policy.candidate_scores(call).masked_fill(cand_pos < 0, float("-inf"))
        rank = self._protected_rank(scores, cand_pos, end, T)
        self.n_kept = min(self.slots, self.n_kept + key.shape[1] * T)
        self.free_known = False
        for b in range(key.shape[0]):
            self._keep(b, key, value, rank[b], cand_pos[b], scores[b], index[b], longest)

    def _keep(self, b: int, key, value, rank, cand_pos, scores, index, longest: int) -> None:
        """Sequence b: the layer's `slots` best candidates over every head stay (rank, then the newer first; full
        ties in (head, column) order). Evicted slots are freed; surviving new tokens fill the lowest free slots in
        (head, position) order."""
        heads, cols = torch.nonzero(cand_pos >= 0, as_tuple=True)  # the real candidates, (head, column) order
        by_pos = torch.argsort(-cand_pos[heads, cols], stable=True)
        order = by_pos[torch.argsort(-rank[heads, cols][by_pos], stable=True)]
        kept = torch.zeros(len(heads), dtype=torch.bool, device=heads.device)
        kept[order[: self.slots]] = True
        old = cols < longest
        gone = index[heads[old & ~kept], cols[old & ~kept]]
        self.owner[b, gone], self.pos[b, gone] = -1, -1
        stay = old & kept
        self.score[b, index[heads[stay], cols[stay]]] = scores[heads[stay], cols[stay]]
        new = ~old & kept
        g, c = heads[new], cols[new]
        slot = torch.nonzero(self.owner[b] < 0).flatten()[: len(g)]
        t = c - longest
        self.buf.put(torch.full_like(slot, b), torch.zeros_like(slot), slot, key[b, g, t], value[b, g, t])
        self.owner[b, slot], self.pos[b, slot], self.score[b, slot] = g, cand_pos[g, c], scores[g, c]

    def token_positions(self) -> Tensor:
        """(B, G, longest): each head's positions in ascending order, then -1 (heads keep different numbers)."""
        B = self.batch_size or self.params.batch_size
        _, _, pos, _ = self._gather(B)
        big = torch.iinfo(torch.long).max
        ordered = torch.where(pos < 0, big, pos).sort(dim=-1).values
        return torch.where(ordered == big, -1, ordered)

    def kept_kv(self, B: int) -> tuple[Tensor, Tensor, Tensor]:
        k, v, pos, _ = self._gather(B)
        return k, v, pos

    def head_lengths(self) -> Tensor:
        """(B, G): how many tokens each head keeps."""
        B = self.batch_size or self.params.batch_size
        return torch.stack([(self.owner[:B] == g).sum(dim=1) for g in range(self.params.n_query_groups)], dim=1)

    @classmethod
    def size_estimate_apriori(cls, params: KVCacheParams, buffer: str = "float", group_size: int = 32, **knobs) -> int:
        B, G, L = params.batch_size, params.n_query_groups, params.cache_length
        room = G * L + G * (buffer == "float")  # the decode step's G extra slots on a float buffer
        flat = KVCacheParams(B, 1, params.n_head, params.head_size, room, params.device, params.dtype)
        return buffer_nbytes(flat, buffer, group_size) + B * room * (8 + 8 + 4) + B * G * 8  # owner, pos, score; free


def lowest(rank: Tensor, tie: Tensor, n: int) -> Tensor:
    """Indices (..., n) of the n lowest ranks along the last dimension, equal ranks taken by the lowest `tie` (int64,
    distinct where it must decide): the set a stable sort by (rank, tie) puts first, from two top-k's, no sort
    (equal ranks are common: SnapKV's pooled scores)."""
    edge = rank.topk(n, dim=-1, largest=False).values[..., -1:]  # the n-th lowest rank
    key = tie.masked_fill(rank > edge, torch.iinfo(torch.long).max).masked_fill_(
        rank < edge, torch.iinfo(torch.long).min
    )
    return key.topk(n, dim=-1, largest=False).indices
