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

Attention gathers each head's own slots into a padded (B, G, longest, hs) block (grouped gather), then attends
them and the call's new tokens with one softmax (model/attention.py, grouped_attention): per call, a copy of the
buffer laid out by head, at most G times the longest head's share. Eager only: the selection has data-dependent
shapes.
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
from model.attention import Visibility, grouped_attention

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
        flat = KVCacheParams(B, 1, params.n_head, params.head_size, self.slots, params.device, params.dtype)
        self.buf = make_buffer(flat, buffer, group_size)  # (B, 1, G * L, X)
        for name, fill, dtype in (("owner", -1, torch.long), ("pos", -1, torch.long), ("score", 0, torch.float32)):
            self.register_buffer(
                name, torch.full((B, self.slots), fill, dtype=dtype, device=params.device), persistent=False
            )

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
        k_flat, v_flat = self.buf.read(B, self.slots)  # (B, 1, slots, hs)
        owner = self.owner[:B]
        counts = torch.stack([(owner == g).sum(dim=1) for g in range(G)], dim=1)  # (B, G)
        longest = max(1, int(counts.max()))
        # Slots sorted by (owner, slot), free ones (owner -1) last: head g's run starts after the heads before it.
        slot_ids = torch.arange(self.slots, device=owner.device)
        by_owner = torch.argsort(torch.where(owner < 0, G, owner) * self.slots + slot_ids, dim=1)  # (B, slots)
        starts = counts.cumsum(dim=1) - counts  # (B, G)
        j = torch.arange(longest, device=owner.device)
        valid = j < counts.unsqueeze(-1)  # (B, G, longest)
        at = (starts.unsqueeze(-1) + j).clamp(max=self.slots - 1).flatten(1)  # (B, G * longest)
        index = torch.where(valid, by_owner.gather(1, at).view(B, G, longest), 0)
        # rows of the flat (B * slots, hs) K and V: index_select copies whole rows (several times faster than gather)
        rows = (index + torch.arange(B, device=owner.device).view(B, 1, 1) * self.slots).flatten()  # (B * G * longest,)
        k = k_flat.reshape(B * self.slots, -1).index_select(0, rows).view(B, G, longest, -1)  # (B, G, longest, hs)
        v = v_flat.reshape(B * self.slots, -1).index_select(0, rows).view(B, G, longest, -1)
        pos = torch.where(valid, self.pos[:B].gather(1, index.flatten(1)).view(B, G, longest), -1)
        return k, v, pos, index

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        B, G, T, _ = key.shape
        p = input_pos
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

    def _select(self, key: Tensor, value: Tensor, p: int, call: Candidates, index: Tensor) -> None:
        """Keep the layer's best G x cache_length candidates across heads (each head's floor first), write the new
        tokens that stay into the free slots."""
        T, L, end = call.T, self.cache_length, p + call.T
        longest = call.old_pos.shape[-1]
        cand_pos = call.pos  # (B, G, longest + T), -1 at padding
        scores = self.policy.candidate_scores(call).masked_fill(cand_pos < 0, float("-inf"))
        rank = self.policy.rank(scores, cand_pos, None, end)
        protect = self.policy.protected(cand_pos, end, T)
        protect = torch.zeros_like(cand_pos, dtype=torch.bool) if protect is None else protect
        floor = int(self.alpha * L)
        if floor:  # each head's own top `floor` are set aside before the heads compete (ties: the newer)
            by_pos = torch.argsort(cand_pos, dim=-1, descending=True, stable=True)
            by_score = torch.argsort(-rank.gather(-1, by_pos), dim=-1, stable=True)
            top = by_pos.gather(-1, by_score[..., :floor])
            protect = protect.scatter(-1, top, True)
        rank = rank.masked_fill(protect & (cand_pos >= 0), float("inf"))
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
        flat = KVCacheParams(B, 1, params.n_head, params.head_size, G * L, params.device, params.dtype)
        return buffer_nbytes(flat, buffer, group_size) + B * G * L * (8 + 8 + 4)  # owner, position, score
