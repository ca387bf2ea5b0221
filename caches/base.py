"""The KV cache contract (LitGPT PR #2061) and the registry of caches by name.

A cache holds the keys and values of one layer in fixed buffers and computes that layer's attention, so a
score-based cache gets the attention weights it needs in the same pass. Seen from the model:

    logits = model(ids[:, :512], input_pos=0)       # prefill: resets the cache
    logits = model(ids[:, 512:700], input_pos=512)  # a further chunk: input_pos == next_token_pos
    logits = model(next_tok, input_pos=700)         # decode, one token per sequence
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from model.attention import AttentionOptions, Visibility, attention


@dataclass(frozen=True)
class KVCacheParams:
    batch_size: int  # maximum batch size; each prefill fixes the effective one
    n_query_groups: int  # number of KV heads (GQA); storage is per KV head, never expanded
    n_head: int
    head_size: int
    cache_length: int  # slots per sequence and KV head
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("batch_size", "n_query_groups", "n_head", "head_size", "cache_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVCacheParams.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_query_groups={self.n_query_groups}")


class KVCache(nn.Module):
    """Base class: validates every call, tracks `next_token_pos`, and leaves storage and eviction to subclasses.

    Subclasses implement `_prefill(query, key, value)` (input_pos 0; the cache has been reset) and
    `_extend(query, key, value, input_pos)`; both return the attention output (B, n_head, T, hs).
    """

    name: ClassVar[str] = "base"
    requires_attn_weights: bool = False  # the compiled step must return attention weights (per instance in scored.py)
    # a decode step run twice at one position leaves what it left once (model/compiled_decode.py: the manual graph)
    idempotent_decode: ClassVar[bool] = True
    # True where `decode_step` exists: storage and attention of a decode step do not depend on the tokens, so the
    # step can be compiled with fixed shapes and captured in a CUDA graph (model/compiled_decode.py).
    supports_compiled_decode: ClassVar[bool] = False
    # compile=auto (bench/config/spec.py) decodes this cache through the compiled step on CUDA: set where a GPU run has
    # shown that step giving the eager step's tokens
    compiled_by_default: ClassVar[bool] = False
    allocation: ClassVar[str] = "uniform"  # how set_kv_caches shares a budget among layers (caches/allocation.py)
    keeps_every_token: ClassVar[bool] = False  # no budget: a slot for every token it is given (dense)
    # what it keeps and what each query sees depend on positions alone, however a prompt is split into calls (dense;
    # last_recent's sinks and window), not on the calls' attention
    keeps_window: ClassVar[bool] = False
    # `load_prompt` exists: a one-call prefill's output is plain causal attention, so the cache can be loaded from a
    # prompt another pass recorded (caches/prompt.py)
    shares_prefill: ClassVar[bool] = False

    def __init__(self, params: KVCacheParams) -> None:
        super().__init__()
        self.params = params
        self.next_token_pos: int | None = None
        self.batch_size: int | None = None  # effective batch size, fixed by the last prefill
        self.attn_opts = AttentionOptions()
        self.rotary = None  # set by the model: rotary(start, length, dtype) -> cos, sin (length, head_size)

    @property
    def cache_length(self) -> int:
        return self.params.cache_length

    @property
    def chunks_as_one(self) -> bool:
        """A prompt in several calls leaves the state and the outputs one call leaves: then a context's prefill,
        copied, serves a longer prompt that begins with it (bench/eval/protocols.py). True for a cache that keeps
        every token, or keeps its window whatever the calls, at full precision (a quantized buffer is read back
        dequantized by the next call, where one call attends its own tokens exactly)."""
        return self.keeps_window and not self.buf.quantized

    @property
    def causal_prefix(self) -> int:
        """How many first positions of a prompt this cache's own prefill attends as plain causal attention, whatever
        comes after them, so that a recorded prompt's first positions (caches/prompt.py) loaded into it stand for
        them: 0 unless the cache says (last_recent: its sinks and window, which every query before them sees whole).
        A cache that a recorded prompt loads whole (`shares_prefill`) needs none."""
        return 0

    @property
    def max_prefill_length(self) -> int | None:
        """Longest prefill accepted (None: no limit)."""
        return None

    @property
    def max_tokens_forward(self) -> int:
        """Most tokens one call after the prefill may bring."""
        return self.cache_length

    # ---- the checked API: prefill, chunks and eager decode steps ------------------------------------------------

    def forward(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        """query (B, n_head, T, hs); key, value (B, n_query_groups, T, hs), RoPE applied.

        Returns the attention output (B, T, n_head * hs), before the output projection.
        """
        self._check(query, key, value, input_pos)
        B, n_head, T, hs = query.shape
        if input_pos == 0:
            self.batch_size = B
            out = self._prefill(query, key, value)
        else:
            out = self._extend(query, key, value, input_pos)
        self.next_token_pos = input_pos + T
        return out.transpose(1, 2).reshape(B, T, n_head * hs)  # (B, T, n_head * hs)

    def _check(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> None:
        p = self.params
        if query.dim() != 4 or key.dim() != 4 or key.shape != value.shape:
            raise ValueError(
                f"expected query (B, n_head, T, hs) and key == value shape, got {query.shape}, "
                f"{key.shape}, {value.shape}"
            )
        B, n_head, T, hs = query.shape
        if (n_head, hs) != (p.n_head, p.head_size) or key.shape != (B, p.n_query_groups, T, hs):
            raise ValueError(
                f"shapes {tuple(query.shape)} / {tuple(key.shape)} do not match the cache's n_head={p.n_head}, "
                f"n_query_groups={p.n_query_groups}, head_size={p.head_size}"
            )
        self.check_position(B, T, input_pos)

    def check_position(self, B: int, T: int, input_pos: int) -> None:
        """The checks of a call of T tokens per sequence at `input_pos` that do not need the tensors (the compiled
        decode step runs them outside its graph)."""
        p = self.params
        if B > p.batch_size:
            raise ValueError(f"batch size {B} exceeds the cache's maximum batch_size={p.batch_size}")
        if not isinstance(input_pos, int) or input_pos < 0:
            raise ValueError(f"input_pos must be a non-negative int, got {input_pos!r}")
        if input_pos == 0:
            if self.max_prefill_length is not None and T > self.max_prefill_length:
                raise ValueError(
                    f"prefill of {T} tokens exceeds {self.name} cache's max_prefill_length={self.max_prefill_length}"
                )
            return
        if self.next_token_pos is None:
            raise ValueError("the cache is empty: start with a prefill at input_pos=0")
        if input_pos != self.next_token_pos:
            raise ValueError(
                f"input_pos={input_pos} but the cache expects next_token_pos={self.next_token_pos} "
                "(input_pos=0 starts a new prefill)"
            )
        if B != self.batch_size:
            raise ValueError(f"batch size {B} differs from the prefill's batch size {self.batch_size}")
        if T > self.max_tokens_forward:
            raise ValueError(
                f"{T} tokens in one call exceed {self.name} cache's max_tokens_forward={self.max_tokens_forward}"
            )

    def load_prompt(self, prompt) -> None:
        """The state `forward(prompt.query, prompt.key, prompt.value, 0)` leaves, without computing the attention
        output (the pass that recorded the prompt did: caches/prompt.py). For caches that `shares_prefill`."""
        self._check(prompt.query, prompt.key, prompt.value, 0)
        self.batch_size = prompt.key.shape[0]
        self._load(prompt)
        self.next_token_pos = prompt.key.shape[2]

    def _load(self, prompt) -> None:
        raise NotImplementedError(f"cache {self.name!r} runs its own prefill (shares_prefill is False)")

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        raise NotImplementedError

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        raise NotImplementedError

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, vis: Visibility) -> Tensor:
        return attention(query, key, value, vis, self.attn_opts)[0]

    def token_positions(self) -> Tensor:
        """(B, n_query_groups, n_cached): the token position held by each filled slot (-1: none, where heads keep
        different numbers of tokens)."""
        raise NotImplementedError

    def kept_kv(self, B: int) -> tuple[Tensor, Tensor, Tensor]:
        """What the cache holds now, read as it is: K, V (B, G, n, hs) and their positions (B, G, n), -1 where a slot
        holds nothing (caches/frozen.py masks it)."""
        positions = self.token_positions()[:B]
        k, v = self.buf.read(B, positions.shape[-1])
        return k, v, positions

    # ---- the compiled-decode API (model/compiled_decode.py) -----------------------------------------------------

    def decode_step(self, query: Tensor, key: Tensor, value: Tensor, pos: Tensor) -> Tensor:
        """One token per sequence at position `pos`, a 0-d int64 tensor on the cache's device (no Python int: a
        captured graph replays with the same arguments, and the position is read on the device). Fixed shapes,
        no host synchronisation, no checks: the caller ran `check_position` with the int. query (B, n_head, 1,
        hs), key and value (B, n_query_groups, 1, hs); returns (B, 1, n_head * hs)."""
        raise NotImplementedError(f"cache {self.name!r} has no compiled decode step")

    def decoded(self, input_pos: int) -> None:
        """The bookkeeping `forward` does after a call, for a `decode_step` at `input_pos` (which, run inside a
        captured graph, cannot touch Python state): called by the compiled step after every step."""
        self.next_token_pos = input_pos + 1

    # ---- size and reset -------------------------------------------------------------------------------------

    def size_estimate(self) -> int:
        """Bytes held by the cache's buffers now (every buffer it registered, payload and bookkeeping)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @classmethod
    def knob_defaults(cls, knobs: dict) -> dict:
        """The knobs this cache takes, with their defaults (its constructor's keyword arguments), given the knobs a
        user set (a cache whose knobs depend on another setting, adakv's on its scorer, reads them)."""
        params = list(inspect.signature(cls.__init__).parameters.values())[2:]  # after self and params
        return {p.name: p.default for p in params if p.kind is not p.VAR_KEYWORD}

    @classmethod
    def size_estimate_apriori(cls, params: KVCacheParams, **kwargs) -> int:
        """Bytes the buffers will take, from the parameters alone."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the sequences (buffers stay allocated)."""
        self.next_token_pos = None
        self.batch_size = None

    def extra_repr(self) -> str:
        p = self.params
        return f"batch_size={p.batch_size}, cache_length={p.cache_length}, n_query_groups={p.n_query_groups}"


_REGISTRY: dict[str, type[KVCache]] = {}


def register(name: str):
    """Class decorator: make a cache available to `create_cache(name, ...)`."""

    def wrap(cls: type[KVCache]) -> type[KVCache]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def cache_names() -> list[str]:
    return sorted(_REGISTRY)


def cache_class(name: str) -> type[KVCache]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown cache {name!r}; valid names: {', '.join(cache_names())}")
    return _REGISTRY[name]


def create_cache(name: str, params: KVCacheParams, **kwargs) -> KVCache:
    return cache_class(name)(params, **kwargs)
