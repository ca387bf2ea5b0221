"""HF transformers' KV caches as systems, on a transformers model holding exactly kvbench's weights:

* `hf_dynamic`: DynamicCache (what `generate` uses by default), eager;
* `hf_static`: StaticCache, eager;
* `hf_static_compiled`: StaticCache with the decode step compiled the way `generate` compiles it (the model's
  `get_compiled_call` with transformers' default CompileConfig: inductor, mode reduce-overhead, so CUDA graphs on
  CUDA); the prefill eager, as in `generate`.

Each step is what `generate`'s loop calls for one token (the model's forward on the cache, the token's position),
driven by bench/job.py's loop instead of `generate`'s so that every step is timed the same way as kvbench's.
The prefill is one call over the whole prompt, as `generate` makes it, so the `prefill_chunk` of these rows is ctx.
These caches keep every token: they run with cache=dense only, and with HF's own choice of attention kernel.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from bench.systems import System
from bench.systems.kvbench import argmax, build_model
from model.attention import UnsupportedBackend, record
from model.load import to_hf_state_dict


def hf_config(cfg, max_positions: int):
    """A transformers config of the same shape as our Config (Llama, or Qwen2 where q/k/v have biases)."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_query_groups,
        head_dim=cfg.head_size,
        max_position_embeddings=max(max_positions, cfg.block_size),
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_base,
    )
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        common["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": r["factor"],
            "low_freq_factor": r["low_freq_factor"],
            "high_freq_factor": r["high_freq_factor"],
            "original_max_position_embeddings": r["original_max_seq_len"],
        }
    return transformers.Qwen2Config(**common) if cfg.qkv_bias else transformers.LlamaConfig(**common)


def hf_model(ours, max_positions: int):
    """A transformers model of our model's shape, dtype and device, holding our weights (SDPA attention)."""
    import transformers

    cfg = hf_config(ours.config, max_positions)
    cfg._attn_implementation = "sdpa"
    cls = transformers.Qwen2ForCausalLM if ours.config.qkv_bias else transformers.LlamaForCausalLM
    weight = ours.lm_head.weight
    with torch.device(weight.device):
        model = cls._from_config(cfg, dtype=weight.dtype)
    model.load_state_dict(to_hf_state_dict(ours))
    return model.eval().requires_grad_(False)


class HFSystem(System):
    def __init__(self, spec, device: torch.device) -> None:
        import transformers
        from transformers import DynamicCache, StaticCache

        self.name = spec.system
        if spec.cache != "dense":
            raise UnsupportedBackend(
                f"system {self.name} is HF's cache, which keeps every token: cache=dense only "
                f"(cache={spec.cache} runs with system=kvbench)"
            )
        if spec.sdpa != "auto":
            raise UnsupportedBackend(
                f"system {self.name} runs HF's SDPA attention, which picks its kernel itself: "
                f"sdpa=auto only (got sdpa={spec.sdpa})"
            )
        if spec.evals:
            raise UnsupportedBackend(
                f"the quality evaluations run on kvbench's caches (system=kvbench), not on system {self.name}"
            )
        ours, self.tokenizer = build_model(spec, device, keep=False)  # the process holds one model: HF's
        self.model = hf_model(ours, spec.ctx + spec.new_tokens)
        self.config = ours.config
        del ours
        self.version = transformers.__version__
        self.kv_slots = spec.ctx + spec.new_tokens
        self.embedding_bytes = 0 if self.config.tie_embeddings else self.model.model.embed_tokens.weight.nbytes
        self.static = (
            StaticCache(config=self.model.config, max_cache_len=self.kv_slots) if "static" in spec.system else None
        )
        self.new_dynamic = DynamicCache
        self.cache = self.static
        self.compiled = spec.system.endswith("_compiled")
        self.eager_forward = self.model.__call__
        self.forward = self.model.get_compiled_call(None) if self.compiled else self.eager_forward
        # transformers >= 5.2x names the argument `cache` (`past_key_values` is deprecated); older ones do not
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.device = device

    def prefill(self, ids: Tensor, desc: str | None = None) -> Tensor:
        if self.static is not None:
            self.static.reset()
        else:
            self.cache = self.new_dynamic()
        positions = torch.arange(ids.shape[1], device=ids.device)
        out = self.model(
            input_ids=ids, cache_position=positions, use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache}
        )
        record("hf_sdpa")  # HF's attention (its SDPA integration picks the kernel)
        return argmax(out.logits[:, -1])

    def decode(self, token: Tensor, pos: int) -> Tensor:
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        position = torch.tensor([pos], device=token.device)
        out = self.forward(input_ids=token, cache_position=position, use_cache=True, **{self.cache_arg: self.cache})
        record("hf_sdpa")
        return argmax(out.logits[:, -1])

    def _cache_tensors(self) -> list[Tensor]:
        tensors = []
        for layer in getattr(self.cache, "layers", []):
            tensors += [
                t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, Tensor)
            ]
        return tensors

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._cache_tensors())

    def resident_bytes(self) -> int:
        tensors = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        if self.static is not None:  # allocated once; a DynamicCache is new with every prefill
            tensors.update((id(t), t) for t in self._cache_tensors())
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def columns(self) -> dict:
        return {"compile": self.compiled, "transformers_version": self.version, "cache": "dense"}

    def eager_steps(self):
        return _swap(self, "forward", self.eager_forward)


class _swap:
    """Set obj.attr to value inside the block."""

    def __init__(self, obj, attr: str, value) -> None:
        self.obj, self.attr, self.value = obj, attr, value

    def __enter__(self):
        self.saved = getattr(self.obj, self.attr)
        setattr(self.obj, self.attr, self.value)

    def __exit__(self, *exc) -> None:
        setattr(self.obj, self.attr, self.saved)
