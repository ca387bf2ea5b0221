"""`hf_sliding`: HF transformers' sliding-window attention layers (the model run as a Mistral, its `sliding_window` =
cache.budget) on kvbench's weights: a token attends the last `budget` positions, itself included, so the cache keeps
budget - 1 tokens (a slice of what the step attended). The peer of kvbench's last_recent without sinks:

    python -m bench.run system=hf_sliding cache.budget=0.25

It answers the task suite under `aware` only (its cache cannot be cut back to the context)."""

from __future__ import annotations

from typing import ClassVar

import torch

from bench.systems.hf import HFSystem
from model.attention import UnsupportedBackend

PEER = "last_recent"


class HFSliding(HFSystem):
    name = "hf_sliding"
    own_policy = "a window"
    protocols: ClassVar[tuple[str, ...]] = ("aware",)
    decode_modes: ClassVar[tuple[str, ...]] = ("evict",)  # the window slides at every decoded token

    def __init__(self, spec, device: torch.device) -> None:
        self.window = spec.cache.length
        super().__init__(spec, device)
        self.kv_slots = spec.cache.length

    def check_model(self, config) -> None:
        super().check_model(config)
        if config.qkv_bias:
            raise UnsupportedBackend("system hf_sliding runs the model as a Mistral: models without q/k/v biases only")

    @classmethod
    def cache_name(cls, cache: str, knobs: dict) -> str:
        return "sliding_window"

    @classmethod
    def peer(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        return PEER
