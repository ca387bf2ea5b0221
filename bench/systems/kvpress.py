"""NVIDIA kvpress's presses as a system (`system=kvpress press=<name> cache.budget=<ratio>`), on the same transformers
model as the HF systems (our weights), its cache a DynamicCache, as kvpress's own pipeline runs it.

A press is a context manager that hooks every attention layer: during a prefill, once a layer has written its K/V,
the press scores them and keeps `1 - compression_ratio` of them, the ratio set per prompt so that a press keeps the
same number of tokens as kvbench's cache of that budget (`compression_ratio` below). Decoding then runs on what was
kept, uncompressed. Presses:

* `knorm`: the keys of lowest L2 norm are kept;
* `streaming_llm`: 4 sink tokens and the most recent ones;
* `tova`: the last query's attention, averaged over heads;
* `snapkv`: the attention of the last 64 queries (pooled), computed by the press;
* `observed_attention`: the attention every query gave each key (H2O's score over the prompt); it reads the
  attention weights, so its model runs transformers' eager attention (the row says `hf_eager`);
* `expected_attention`: the attention expected from future queries' statistics;
* `adakv`: Ada-KV's head-wise budget around SnapKV's score. kvpress does not free the evicted slots: it masks them
  in attention, so the cache keeps every token, and the row's cache_bytes says so.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from bench.systems.base import ConfigProblem
from bench.systems.hf import HFSystem
from model.attention import UnsupportedBackend

if TYPE_CHECKING:
    from kvpress import BasePress

PRESSES = (
    "knorm",
    "streaming_llm",
    "tova",
    "snapkv",
    "observed_attention",
    "expected_attention",
    "adakv",
)
EAGER = ("observed_attention",)  # presses that read the attention weights
# press -> the prompt length it needs more than: SnapKV's observation window (kvpress's 64 queries), the sinks
LONGER_THAN = {"snapkv": 64, "adakv": 64, "streaming_llm": 4}
# press -> kvbench's cache with the same policy (the others share their cache's name)
PEERS = {"streaming_llm": "last_recent", "observed_attention": "h2o"}


@dataclass
class PressKnobs:
    press: str | None = "${press}"  # the top-level `press=` setting: which press


def make_press(name: str, ratio: float) -> BasePress:
    """kvpress's press `name` (PRESSES) removing a fraction `ratio` of the tokens, its other settings kvpress's
    defaults."""
    import kvpress

    if name == "adakv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
    cls = {
        "knorm": kvpress.KnormPress,
        "streaming_llm": kvpress.StreamingLLMPress,
        "tova": kvpress.TOVAPress,
        "snapkv": kvpress.SnapKVPress,
        "observed_attention": kvpress.ObservedAttentionPress,
        "expected_attention": kvpress.ExpectedAttentionPress,
    }[name]
    return cls(compression_ratio=ratio)


class KvpressSystem(HFSystem):
    name = "kvpress"
    Knobs = PressKnobs
    extras: ClassVar[tuple[tuple[str, str], ...]] = (("transformers", "hf"), ("kvpress", "peers"))
    own_policy = "press=<name>"

    def __init__(self, spec, device: torch.device) -> None:
        self.press_name = spec.system.knobs["press"]
        if spec.cache.length < spec.ctx <= LONGER_THAN.get(self.press_name, 0):
            raise UnsupportedBackend(
                f"kvpress's {self.press_name} press needs a prompt longer than {LONGER_THAN[self.press_name]} tokens "
                f"(got ctx={spec.ctx})"
            )
        self.budget = spec.cache.length  # tokens per sequence and layer the press keeps
        self.attention = "eager" if self.press_name in EAGER else "sdpa"
        super().__init__(spec, device)
        self.press = make_press(self.press_name, 0.0)  # its ratio is set for each prompt's length

    @classmethod
    def check_knobs(cls, knobs: dict) -> dict:
        if knobs["press"] is None:
            raise ConfigProblem(f"system=kvpress needs press=<name>; valid choices: {', '.join(PRESSES)}")
        return knobs

    @classmethod
    def cache_name(cls, cache: str, knobs: dict) -> str:
        return knobs["press"]

    @classmethod
    def label(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        return f"kvpress/{cache}"

    @classmethod
    def peer(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        return PEERS.get(cache, cache)

    def compressing(self, length: int) -> AbstractContextManager:
        self.press.compression_ratio = compression_ratio(self.budget, length)
        return self.press(self.model)

    def columns(self) -> dict:
        from importlib.metadata import version

        return {**super().columns(), "kvpress_version": version("kvpress")}


def compression_ratio(budget: int, length: int) -> float:
    """The ratio with which a press keeps `budget` of `length` tokens: kvpress keeps int(length x (1 - ratio)), so the
    ratio aims half a token above the budget, where float rounding cannot take it one below."""
    return max(0.0, (length - budget - 0.5) / length)
