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
from torch import Tensor

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


@dataclass
class LayerPrompt:
    """What a press's hook sees of one layer during a prompt's prefill: the layer's input (normed), the RoPE cos/sin
    and cache positions of the call, and the keys and values the layer wrote, (B, G, T, hs) each."""

    hidden: Tensor
    position_embeddings: tuple[Tensor, Tensor]
    cache_position: Tensor
    keys: Tensor
    values: Tensor

    def prefix(self, n: int) -> LayerPrompt:
        """The first n positions: under causal attention what a prefill of the first n tokens records (views)."""
        cos, sin = self.position_embeddings
        return LayerPrompt(
            self.hidden[:, :n],
            (cos[:, :n], sin[:, :n]),
            self.cache_position[:n],
            self.keys[:, :, :n],
            self.values[:, :, :n],
        )


class KvpressSystem(HFSystem):
    name = "kvpress"
    Knobs = PressKnobs
    extras: ClassVar[tuple[tuple[str, str], ...]] = (("transformers", "hf"), ("kvpress", "peers"))
    own_policy = "press=<name>"
    # A press compresses each layer once its prefill has written it, from what the layer saw: the prefill itself is
    # dense's, so one prefill, its layers' inputs kept, serves every press and budget (`record`, `load`); not the
    # presses that read the prompt's attention weights (observed_attention) or mask heads inside attention (adakv).
    shares_prompts = True
    OWN_PREFILL: ClassVar[tuple[str, ...]] = ("observed_attention", "adakv")

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

    # ---- one prefill, many presses -------------------------------------------------------------------------------

    @classmethod
    def shares_config(cls, knobs: dict) -> bool:
        return knobs.get("press") not in cls.OWN_PREFILL

    def use_cache(self, cache, knobs: dict | None = None) -> None:
        self.press_name = (knobs or {}).get("press", self.press_name)
        self.press, self.budget = make_press(self.press_name, 0.0), cache.length

    def shares_prompt(self, length: int) -> bool:
        return self.press_name not in self.OWN_PREFILL

    def record(self, ids: Tensor) -> tuple[Tensor, list[LayerPrompt]]:
        """ids (B, T) through the model once, uncompressed, each attention layer's input kept by a hook where the
        press's would run: (the last position's logits, a LayerPrompt per layer)."""
        seen: dict[int, tuple] = {}

        def keep(module, args, kwargs, output):
            seen[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"], kwargs["cache_position"])

        layers = self.model.model.layers
        hooks = [layer.self_attn.register_forward_hook(keep, with_kwargs=True) for layer in layers]
        try:
            self.cache = self.new_cache(ids.shape[1])
            logits = self.call(ids, 0)
        finally:
            for hook in hooks:
                hook.remove()
        held = self.cache.layers
        return logits, [LayerPrompt(*seen[i], held[i].keys, held[i].values) for i in range(len(layers))]

    def load(self, prompts: list[LayerPrompt]) -> None:
        """A fresh cache holding what the press keeps of each layer, compressed as its hook would have (`compress` on
        the same inputs, the ratio set for the prompt's length)."""
        model = self.model
        self.press.compression_ratio = compression_ratio(self.budget, prompts[0].keys.shape[2])
        self.press.post_init_from_model(model)
        self.cache = self.new_cache(prompts[0].keys.shape[2])
        for i, (layer, p) in enumerate(zip(model.model.layers, prompts)):
            module = layer.self_attn
            module.rotary_emb = model.model.rotary_emb  # as the press's context manager sets it
            kwargs = {
                "hidden_states": p.hidden,
                "position_embeddings": p.position_embeddings,
                "cache_position": p.cache_position,
                "past_key_values": self.cache,
            }
            keys, values = self.press.compress(module, p.hidden, p.keys, p.values, None, kwargs)
            self.cache.update(keys, values, i)

    def columns(self) -> dict:
        from importlib.metadata import version

        return {**super().columns(), "kvpress_version": version("kvpress")}


def compression_ratio(budget: int, length: int) -> float:
    """The ratio with which a press keeps `budget` of `length` tokens: kvpress keeps int(length x (1 - ratio)), so the
    ratio aims half a token above the budget, where float rounding cannot take it one below."""
    return max(0.0, (length - budget - 0.5) / length)
