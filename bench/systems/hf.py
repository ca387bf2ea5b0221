"""HF transformers' KV caches as systems, on a transformers model holding exactly kvbench's weights:

* `hf_dynamic`: DynamicCache (what `generate` uses by default), eager;
* `hf_static`: StaticCache, eager;
* `hf_static_compiled`: StaticCache with the decode step compiled the way `generate` compiles it (the model's
  `get_compiled_call` with transformers' default CompileConfig: inductor, mode reduce-overhead, so CUDA graphs on
  CUDA); the prefill eager, as in `generate`;
* `hf_quantized`: QuantizedCache on optimum-quanto (`system.nbits` 2 or 4, `system.q_group_size` values per scale,
  the newest `system.residual_length` tokens kept unquantized until they are quantized together);
* `hf_offloaded`: DynamicCache with offloading (each layer's K/V go back to the CPU once the layer has run, the next
  layer's are prefetched): GPU only;
* `hf_sliding`: sliding-window attention layers (the model as a Mistral, its `sliding_window` = cache.budget: a
  token attends the last `budget` positions, itself included, so the cache keeps budget - 1 tokens, a slice of what
  the step attended), the peer of kvbench's last_recent without sinks.

Each step is what `generate`'s loop calls for one token (the model's forward on the cache, the token's position),
driven by bench/harness/job.py's loop instead of `generate`'s so that every step is timed the same way as kvbench's.
The prefill is one call over the whole prompt, as `generate` makes it, so the `prefill_chunk` of these rows is ctx.
HF's SDPA integration picks the attention kernel itself: these systems run with sdpa=auto only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bench.systems import System
from bench.systems.kvbench import argmax, build_model
from model.attention import UnsupportedBackend, record
from model.load import to_hf_state_dict

if TYPE_CHECKING:
    from transformers import Cache

# Protocols of the task suite each system answers (bench/systems/hf_protocols.py): `agnostic` reads one cache of the
# context for every question, which needs a cache that can be cut back to the context after an answer.
PROTOCOLS = {
    "hf_dynamic": ("aware", "agnostic"),
    "hf_static": ("aware", "agnostic"),
    "hf_static_compiled": ("aware", "agnostic"),
    "hf_quantized": ("aware",),
    "hf_offloaded": ("aware", "agnostic"),
    "hf_sliding": ("aware",),
    "kvpress": ("aware", "agnostic"),
}
QUANTO_BITS = (2, 4)


def hf_config(cfg, max_positions: int, sliding_window: int | None = None):
    """A transformers config of the same shape as our Config: Llama, Qwen2 where q/k/v have biases, Mistral (Llama's
    layers with sliding-window attention) where a window is given."""
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
    if sliding_window is not None:
        return transformers.MistralConfig(sliding_window=sliding_window, **common)
    return transformers.Qwen2Config(**common) if cfg.qkv_bias else transformers.LlamaConfig(**common)


def hf_model(ours, max_positions: int, sliding_window: int | None = None, attention: str = "sdpa"):
    """A transformers model of our model's shape, dtype and device, holding our weights (SDPA attention unless
    `attention` says otherwise)."""
    import transformers

    cfg = hf_config(ours.config, max_positions, sliding_window)
    cfg._attn_implementation = attention
    if sliding_window is not None:
        cls = transformers.MistralForCausalLM
    else:
        cls = transformers.Qwen2ForCausalLM if ours.config.qkv_bias else transformers.LlamaForCausalLM
    weight = ours.lm_head.weight
    with torch.device(weight.device):
        model = cls._from_config(cfg, dtype=weight.dtype)
    model.load_state_dict(to_hf_state_dict(ours))
    return model.eval().requires_grad_(False)


def tensor_bytes(tensors: list[Tensor], device: torch.device | None = None) -> int:
    """Bytes the memory behind `tensors` takes (on `device` only, if given): a view counts its whole storage, once
    however many views share it (a sliding window's slice of the prompt's K/V holds the prompt until it is copied);
    a tensor subclass (quanto's packed, quantized tensors) counts the inner tensors it holds."""
    storages: dict[tuple, int] = {}

    def visit(t: Tensor) -> None:
        if hasattr(t, "__tensor_flatten__") and type(t) is not Tensor and not isinstance(t, torch.nn.Parameter):
            for name in t.__tensor_flatten__()[0]:
                visit(getattr(t, name))
        elif device is None or t.device.type == device.type:
            storage = t.untyped_storage()
            storages[(t.device, storage.data_ptr())] = storage.nbytes()

    for t in tensors:
        visit(t)
    return sum(storages.values())


class HFSystem(System):
    attention = "sdpa"  # transformers' attention implementation

    def __init__(self, spec, device: torch.device) -> None:
        import transformers

        self.name = spec.system
        self.knobs = dict(spec.system_kwargs)
        self._refuse(spec, device)
        ours, self.tokenizer = build_model(spec, device, keep=False)  # the process holds one model: HF's
        if self.name == "hf_sliding" and ours.config.qkv_bias:
            raise UnsupportedBackend("system hf_sliding runs the model as a Mistral: models without q/k/v biases only")
        window = spec.cache_length if self.name == "hf_sliding" else None
        self.model = hf_model(ours, spec.ctx + spec.new_tokens, window, self.attention)
        self.config = ours.config
        del ours
        self.version = transformers.__version__
        self.kv_slots = spec.cache_length if self.name == "hf_sliding" else spec.ctx + spec.new_tokens
        self.embedding_bytes = 0 if self.config.tie_embeddings else self.model.model.embed_tokens.weight.nbytes
        self.static = None
        if "static" in self.name:
            self.static = transformers.StaticCache(config=self.model.config, max_cache_len=self.kv_slots)
        self.cache = self.static
        self.compiled = self.name.endswith("_compiled")
        self.eager_forward = self.model.__call__
        self.forward = self.model.get_compiled_call(None) if self.compiled else self.eager_forward
        # transformers >= 5.2x names the argument `cache` (`past_key_values` is deprecated); older ones do not
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.device = device

    def _refuse(self, spec, device: torch.device) -> None:
        """An `unsupported` row, with the reason, for what this system cannot run."""
        if spec.cache != "dense" and self.name not in ("hf_sliding", "kvpress"):
            raise UnsupportedBackend(
                f"system {self.name} is HF's cache, which keeps every token: cache=dense only "
                f"(cache={spec.cache} runs with system=kvbench)"
            )
        if spec.sdpa != "auto":
            raise UnsupportedBackend(
                f"system {self.name} runs HF's attention, which picks its kernel itself: "
                f"sdpa=auto only (got sdpa={spec.sdpa})"
            )
        if self.name == "hf_offloaded" and device.type != "cuda":
            raise UnsupportedBackend(
                "system hf_offloaded moves each layer's K/V from the GPU to the CPU and back; on the CPU there is "
                "nowhere to offload to (it runs with device=cuda)"
            )
        other = [e for e in spec.evals if e != "tasks"]
        if other:
            raise UnsupportedBackend(
                f"eval {'+'.join(other)} runs on kvbench's caches (system=kvbench); system {self.name} answers the "
                "task suite (eval=tasks)"
            )
        protocol = spec.eval_knobs.get("protocol")
        if "tasks" in spec.evals and protocol not in PROTOCOLS[self.name]:
            raise UnsupportedBackend(
                f"system {self.name} answers the task suite under eval.protocol={' or '.join(PROTOCOLS[self.name])} "
                f"(got {protocol}): "
                + (
                    "agnostic cuts the cache back to the context after each answer, which its cache cannot"
                    if protocol == "agnostic"
                    else "one conversation through one cache is kvbench's protocol"
                )
            )

    def new_cache(self, length: int = 0) -> Cache:
        """An empty cache of this system's kind for `length` tokens per sequence (the static one is allocated once,
        reset, and allocated again only for a longer sequence than it holds)."""
        from transformers import DynamicCache, QuantizedCache, StaticCache

        if self.static is not None:
            if length > self.static.max_cache_len:
                self.static = self.cache = StaticCache(config=self.model.config, max_cache_len=length)
            self.static.reset()
            return self.static
        if self.name == "hf_quantized":
            return QuantizedCache(backend="quanto", config=self.model.config, **self.knobs)
        return DynamicCache(config=self.model.config, offloading=self.name == "hf_offloaded")

    def compressing(self, length: int) -> AbstractContextManager:
        """Around a prefill of `length` tokens: what compresses the cache as it fills (kvpress's press)."""
        return nullcontext()

    def call(
        self, ids: Tensor, start: int, cache: Cache, logits_to_keep: int = 1, step: Callable | None = None
    ) -> Tensor:
        """ids (B, T) at positions start.. through `cache`; the last position's logits (B, vocab). A compressed cache
        holds fewer tokens than the positions seen: positions go to RoPE, the cache's own length to its slots."""
        held = start if cache is self.static else cache.get_seq_length()
        out = (step or self.model)(
            input_ids=ids,
            position_ids=torch.arange(start, start + ids.shape[1], device=ids.device)[None],
            cache_position=torch.arange(held, held + ids.shape[1], device=ids.device),
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_arg: cache},
        )
        return out.logits[:, -1]

    def prefill(self, ids: Tensor, desc: str | None = None) -> Tensor:
        self.cache = self.new_cache()
        with self.compressing(ids.shape[1]):
            logits = self.call(ids, 0, self.cache)
        record(f"hf_{self.attention}")  # HF's attention (its SDPA integration picks the kernel)
        return argmax(logits)

    def decode(self, token: Tensor, pos: int) -> Tensor:
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.call(token, pos, self.cache, logits_to_keep=0, step=self.forward)
        record(f"hf_{self.attention}")
        return argmax(logits)

    def answers(self, samples: list, protocol: str) -> list[list[str]]:
        from bench.systems.hf_protocols import run

        return run(self, samples, protocol)

    def _cache_tensors(self, cache: Cache | None = None) -> list[Tensor]:
        """The K and V tensors (quantized or not) of every layer of `cache` (default: the current one)."""
        tensors = []
        for layer in getattr(self.cache if cache is None else cache, "layers", []):
            for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
                if isinstance(getattr(layer, name, None), Tensor):
                    tensors.append(getattr(layer, name))
        return tensors

    def cache_bytes(self) -> int:
        """The bytes the cache's layers hold on the model's device, measured on the memory behind their tensors
        (quantized ones by their packed data, scales and offsets), whatever the cache or a press says it keeps. An
        offloaded cache's layers waiting on the CPU are not on the device."""
        return tensor_bytes(self._cache_tensors(), self.device)

    def resident_bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        if self.static is not None:  # allocated once; the other caches are new with every prefill
            tensors += self._cache_tensors(self.static)
        return tensor_bytes(tensors)

    def columns(self) -> dict:
        cols = {"compile": self.compiled, "transformers_version": self.version}
        if self.name == "hf_quantized":
            from importlib.metadata import version

            cols["quant_backend"] = f"quanto {version('optimum-quanto')}"
        return cols

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
