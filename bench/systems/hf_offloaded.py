"""`hf_offloaded`: HF transformers' DynamicCache with offloading: each layer's K/V go to the CPU once the layer has run
and come back (prefetched) for the next step. GPU only: on the CPU there is nowhere to offload to."""

from __future__ import annotations

from typing import ClassVar

from bench.systems.hf import HFSystem


class HFOffloaded(HFSystem):
    name = "hf_offloaded"
    devices: ClassVar[tuple[str, ...]] = ("cuda",)

    def new_cache(self, length: int):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config, offloading=True)
