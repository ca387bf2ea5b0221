"""`hf_quantized`: HF transformers' QuantizedCache on optimum-quanto, eager, on kvbench's weights: K and V quantized
per group of `q_group_size` values (a scale and an offset each) to `nbits`, the newest `residual_length` tokens
kept in full precision until they are quantized together. It answers the task suite under `aware` only (`agnostic`
cuts the cache back to the context after each answer, which a quantized cache cannot)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from bench.systems.base import ConfigProblem
from bench.systems.hf import HFSystem

BITS = (2, 4)  # optimum-quanto's


@dataclass
class QuantizedKnobs:
    nbits: int = 4  # 2 | 4
    q_group_size: int = 64  # values per scale and offset
    residual_length: int = 128  # newest tokens kept unquantized


class HFQuantized(HFSystem):
    name = "hf_quantized"
    Knobs = QuantizedKnobs
    extras: ClassVar[tuple[tuple[str, str], ...]] = (("transformers", "hf"), ("optimum.quanto", "hf"))
    protocols: ClassVar[tuple[str, ...]] = ("aware",)

    @classmethod
    def check_knobs(cls, knobs: dict) -> dict:
        if knobs["nbits"] not in BITS:
            raise ConfigProblem(f"system.nbits={knobs['nbits']!r} is not valid; valid choices: 2, 4")
        for key in ("q_group_size", "residual_length"):
            if knobs[key] < 1:
                raise ConfigProblem(f"system.{key}={knobs[key]!r} is not valid; it must be an integer >= 1")
        return knobs

    @classmethod
    def label(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        return f"{cls.name}/int{knobs['nbits']}"

    @classmethod
    def method(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        return f"dense/int{knobs['nbits']}"

    def new_cache(self, length: int):
        from transformers import QuantizedCache

        return QuantizedCache(backend="quanto", config=self.model.config, **self.knobs)

    def columns(self) -> dict:
        from importlib.metadata import version

        return {**super().columns(), "quant_backend": f"quanto {version('optimum-quanto')}"}
