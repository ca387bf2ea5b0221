"""`hf_static_compiled`: HF transformers' StaticCache with the decode step compiled the way `generate` compiles it
(the model's `get_compiled_call` with transformers' default CompileConfig: inductor, mode reduce-overhead, so CUDA
graphs on CUDA); the prefill eager, as in `generate`."""

from __future__ import annotations

from bench.systems.hf_static import HFStatic


class HFStaticCompiled(HFStatic):
    name = "hf_static_compiled"
    compiled_step = True
