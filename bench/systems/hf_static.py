"""`hf_static`: HF transformers' StaticCache, eager, on kvbench's weights: ctx + new_tokens slots per layer allocated
once, a token written into the slot of its position."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from bench.systems.hf import HFSystem, tensor_bytes


class HFStatic(HFSystem):
    name = "hf_static"
    allocates_up_front = True

    def __init__(self, spec, device: torch.device) -> None:
        super().__init__(spec, device)
        self.static = self.new_cache(self.kv_slots)

    def new_cache(self, length: int):
        """The one static cache, reset, and allocated again only for a longer sequence than it holds."""
        from transformers import StaticCache

        static = getattr(self, "static", None)
        if static is None or length > static.max_cache_len:
            self.static = static = StaticCache(config=self.model.config, max_cache_len=length)
        static.reset()
        return static

    def held(self, start: int) -> int:
        return start  # slot i holds position i

    def question(self, tokens: int) -> AbstractContextManager:
        """Nothing to cut: the next question overwrites the slots after the context, which is all it reads."""
        return nullcontext()

    def resident_bytes(self) -> int:
        return tensor_bytes([*self.model.parameters(), *self.model.buffers(), *self.cache_tensors(self.static)])
