"""kvbench's own core as a system: the GPT of model/ with a cache of caches/ per layer, the chunked prefill of
model/generate.py, and the decode step eager or compiled (model/compiled_decode.py)."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.config.spec import CacheSpec
from bench.systems.base import System, swapped
from caches import cache_class
from caches.base import KVCache
from caches.frozen import FrozenPrefixCache, drop_room
from caches.prompt import Prompt, PromptRecorder
from model.attention import UnsupportedBackend
from model.compiled_decode import CompiledDecode
from model.config import Config
from model.generate import prefill
from model.gpt import GPT

_PRETRAINED: dict[tuple, tuple[GPT, object]] = {}


def build_model(spec, device: torch.device, keep: bool = True) -> tuple[GPT, object]:
    """(model, tokenizer or None): random weights of the named shape (seeded), the real ones (kept for the next job
    of this process unless keep=False), or a local checkpoint folder's."""
    if spec.weights not in ("random", "pretrained"):
        from model.load import load_hf_checkpoint

        model, tokenizer = load_hf_checkpoint(spec.weights, device=device, dtype=spec.torch_dtype)
        return model.eval().requires_grad_(False), tokenizer
    if spec.weights == "pretrained":
        if not keep:
            from model.load import load_pretrained

            model, tokenizer = load_pretrained(spec.model, device=device, dtype=spec.torch_dtype)
            return model.eval().requires_grad_(False), tokenizer
        return _load_pretrained(spec.model, device, spec.torch_dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(spec.torch_dtype)
    try:
        with torch.device(device):
            model = GPT(Config.from_name(spec.model), seed=spec.seed)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False), None


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype) -> tuple[GPT, object]:
    """Real weights, dequantized once per process and reused by later jobs."""
    from model.load import load_pretrained

    key = (name, str(device), dtype)
    if key not in _PRETRAINED:
        _PRETRAINED.clear()  # keep one model at most
        model, tokenizer = load_pretrained(name, device=device, dtype=dtype)
        _PRETRAINED[key] = model.eval().requires_grad_(False), tokenizer
    model, tokenizer = _PRETRAINED[key]
    model.clear_kv_caches()
    model.set_start_of_layer_hook(None)
    return model, tokenizer


def argmax(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1, keepdim=True)  # (B, 1)


class KvbenchSystem(System):
    name = "kvbench"
    evals: ClassVar[tuple[str, ...]] = ("fidelity", "tasks", "ppl")
    any_backend = True
    kvbench_caches = True
    shares_prompts = True
    decode_modes: ClassVar[tuple[str, ...]] = ("evict", "append")

    def __init__(self, spec, device: torch.device) -> None:
        model, tokenizer = build_model(spec, device)
        self.setup(model, tokenizer, spec.cache, spec.prefill_chunk)
        self.open(spec.batch, spec.ctx + spec.new_tokens)
        self.model.set_attention_backend(spec.sdpa)
        if spec.compile and self.cache.decode == "append":
            raise UnsupportedBackend(
                "cache.decode=append decodes eagerly (the prompt's caches read as caches/frozen.py does)"
            )
        self.decoder = CompiledDecode(self.model) if spec.compile else None  # raises UnsupportedBackend
        self.step = self.decoder or self.model

    def setup(self, model: GPT, tokenizer, cache: CacheSpec, prefill_chunk: int) -> None:
        self.model, self.tokenizer, self.cache, self.prefill_chunk = model, tokenizer, cache, prefill_chunk
        self.config = model.config
        self.kv_slots = cache.length
        self.opened, self.prompt_caches = 0, None  # tokens `open` made room for; the prompt's caches once frozen
        self.appends = False  # decoded tokens go after the prompt's caches (cache.decode=append, set by `open`)
        self.embedding_bytes = 0 if model.wte is None else model.wte.weight.nbytes
        self.decoder, self.step = None, model

    @classmethod
    def around(
        cls,
        model: GPT,
        tokenizer=None,
        cache: str = "dense",
        length: int = 0,
        prefill_chunk: int = 2048,
        decode: str = "evict",
        **kwargs,
    ) -> KvbenchSystem:
        """The system of a model already built (tests, benchmarks): caches `cache` with `length` slots (a dense
        cache grows to what it is asked to hold), knobs `kwargs`, decoded tokens evicted or appended (`decode`)."""
        system = cls.__new__(cls)
        system.setup(model, tokenizer, CacheSpec(cache, kwargs, length, length, decode=decode), prefill_chunk)
        return system

    @classmethod
    def compiled(cls, compile: str, device: str, cache_cls: type, sdpa: str) -> bool:
        """compile=auto: on CUDA, with sdpa=auto, for the caches whose compiled step a GPU run has shown giving the
        eager step's tokens (`compiled_by_default`); true: asks for it (a combination the compiled step cannot run is
        an `unsupported` row, model/compiled_decode.py `plan`); false: the eager decode step."""
        if compile == "auto":
            return device == "cuda" and cache_cls.compiled_by_default and sdpa == "auto"
        return compile == "true"

    @classmethod
    def label(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        """The cache, and its buffer where it is quantized (`h2o/int8`)."""
        buffer = cache_kwargs.get("buffer", "float")
        return cache if buffer == "float" else f"{cache}/{buffer}"

    @classmethod
    def method(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        return cls.label(cache, cache_kwargs, knobs)

    # ---- the timed path ----------------------------------------------------------------------------------------

    def prefill(self, ids: Tensor, desc: str | None = None) -> Tensor:
        """Chunked; only the last position goes through the output head."""
        return argmax(self.forward(ids, 0, desc))

    def decode(self, token: Tensor, pos: int) -> Tensor:
        self._append_after(pos)
        return argmax(self.step(token, input_pos=pos)[:, -1])

    # ---- cache.decode=append: the prompt compressed once, decoded tokens after it -----------------------------------

    def _append_after(self, start: int) -> None:
        """At the first decoded token (position `start`): with cache.decode=append, the caches the prompt left are read
        as they are from now on and every decoded token goes after them, into a cache of its own with room for the
        rest of what `open` asked (caches/frozen.py). No-op in the evict mode, once done, inside a `question`, and
        for caches `open` made of another kind than the job's (a fidelity run's dense reference)."""
        if not self.appends or self.prompt_caches is not None:
            return
        caches = self.model.kv_caches
        if any(isinstance(c, FrozenPrefixCache) for c in caches):
            return  # a question's caches, already appending
        self.prompt_caches = caches
        self.model.assign_kv_caches([FrozenPrefixCache(c, max(1, self.opened - start)) for c in caches])

    def release_decoded(self) -> None:
        self._thaw()

    def _thaw(self) -> None:
        """The prompt's caches back in the model, for the next prompt (which resets them)."""
        if self.prompt_caches is not None:
            self.model.assign_kv_caches(self.prompt_caches)
            for cache in self.prompt_caches:
                drop_room(cache)  # the room the decoded tokens took, given back before the next prefill
            self.prompt_caches = None

    # ---- the task suite's path ---------------------------------------------------------------------------------

    def open(self, batch: int, tokens: int, cache: str | None = None) -> None:
        """Caches of the job's kind (or `cache`, with its defaults) for `batch` sequences of up to `tokens` tokens;
        a dense cache grows to hold them all."""
        c = self.cache
        name, kwargs, allocation = (cache, {}, None) if cache else (c.name, c.kwargs, c.allocation)
        length = max(c.length, tokens) if cache_class(name).keeps_every_token else c.length
        self.model.set_kv_caches(batch, name, length, allocation, tokens, **kwargs)
        self.opened, self.prompt_caches = tokens, None
        self.appends = cache is None and c.decode == "append"

    def forward(self, ids: Tensor, start: int, desc: str | None = None) -> Tensor:
        def bar(bounds: list) -> list:
            show = desc is not None and len(bounds) >= 4
            return tqdm(bounds, desc=desc, leave=False, disable=None if show else True)

        if ids.shape[1] == 1 and start > 0:
            self._append_after(start)
            return self.model(ids, input_pos=start)[:, -1]
        if start == 0:
            self._thaw()
        return prefill(self.model, ids, self.prefill_chunk, start, bar)

    def use_cache(self, cache: CacheSpec, knobs: dict | None = None) -> None:
        """Another configuration's caches from the next `open` on (one model serving a sweep's caches)."""
        self.cache, self.kv_slots = cache, cache.length

    def shares_prompt(self, length: int) -> bool:
        """A prompt of `length` tokens goes in one call, into caches that a recorded prompt loads (caches/prompt.py)."""
        return cache_class(self.cache.name).shares_prefill and self.prefill_chunk >= length

    def record(self, ids: Tensor) -> tuple[Tensor, list[Prompt]]:
        """ids (B, T) through the model in one call, each layer's prompt kept: (the last position's logits (B,
        vocab), a Prompt per layer)."""
        B, T = ids.shape
        self._thaw()
        opened = self.model.kv_caches  # put back afterwards: recording leaves the caches `open` made as they were
        recorders = [PromptRecorder(self.model.kv_cache_params(B, T)) for _ in self.model.blocks]
        self.model.assign_kv_caches(recorders)
        try:
            logits = prefill(self.model, ids, T, 0)
        finally:
            if opened:
                self.model.assign_kv_caches(opened)
        return logits, [r.prompt for r in recorders]

    def load(self, prompts: list[Prompt]) -> None:
        """The caches `open` made, each given its layer's recorded prompt: the state their own prefill leaves."""
        self._thaw()
        for cache, prompt in zip(self.model.kv_caches, prompts):
            cache.load_prompt(prompt)

    def chunks_as_one(self) -> bool:
        return all(c.chunks_as_one for c in self.model.kv_caches)

    def causal_prefix(self) -> int:
        self._thaw()
        return min(c.causal_prefix for c in self.model.kv_caches)

    def snapshot(self) -> tuple[CacheSpec, list[KVCache]]:
        self._thaw()
        return self.cache, [self._copy(c) for c in self.model.kv_caches]

    def restore(self, state: tuple[CacheSpec, list[KVCache]]) -> bool:
        cache, caches = state
        self._thaw()
        if cache != self.cache or any(s.cache_length < c.cache_length for s, c in zip(caches, self.model.kv_caches)):
            return False
        self.model.assign_kv_caches([self._copy(c) for c in caches])
        return True

    def _copy(self, cache: KVCache) -> KVCache:
        """A copy of a cache's buffers and state (its link to the model's RoPE kept, not copied)."""
        ropes = [self.model.rope, self.model.rope_local]
        return copy.deepcopy(cache, memo={id(r): r for r in ropes if r is not None})

    @contextmanager
    def question(self, tokens: int):
        """The context's caches read as they are, the question and its answer appended after them in caches of their
        own (caches/frozen.py) and dropped at the end."""
        base = self.model.kv_caches
        self.model.assign_kv_caches([FrozenPrefixCache(c, tokens) for c in base])
        try:
            yield
        finally:
            self.model.assign_kv_caches(base)

    # ---- memory and what ran -----------------------------------------------------------------------------------

    def cache_bytes(self) -> int:
        return sum(c.size_estimate() for c in self.model.kv_caches)

    def resident_bytes(self) -> int:
        tensors = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        tensors.update((id(b), b) for c in self.model.kv_caches for b in c.buffers())
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def columns(self) -> dict:
        if self.decoder is None:
            return {"compile": False}
        plan = self.decoder.plan
        return {
            "compile": True,
            "cuda_graphs": plan.graphs,
            "decode_attention": plan.form,
            "decode_kernel": plan.kernel,
        }

    def eager_steps(self):
        if self.decoder is None:
            return super().eager_steps()
        return swapped(self, "step", CompiledDecode(self.model, compile=False))
