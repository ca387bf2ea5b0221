"""`hf_dynamic`: HF transformers' DynamicCache (what `generate` uses by default), eager, on kvbench's weights: every
token's K/V appended to one tensor per layer, grown by concatenation."""

from __future__ import annotations

from bench.systems.hf import HFSystem


class HFDynamic(HFSystem):
    name = "hf_dynamic"
