"""What HF transformers' caches share as systems: a transformers model holding exactly kvbench's weights (Llama,
Qwen2 where q/k/v have biases, Mistral for a sliding window), driven one call at a time the way `generate` drives it,
and their bytes measured on the tensors the cache holds. Each system is a class of its own in the modules beside
this one (hf_dynamic, hf_static, hf_static_compiled, hf_quantized, hf_offloaded, hf_sliding, kvpress).

Each step is what `generate`'s loop calls for one token (the model's forward on the cache, the token's position),
driven by bench/harness/job.py's loop instead of `generate`'s so that every step is timed the same way as kvbench's.
The prefill is one call over the whole prompt, as `generate` makes it, so the `prefill_chunk` of these rows is ctx.
HF's SDPA integration picks the attention kernel itself: these systems run with sdpa=auto only.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from bench.systems.base import System, swapped
from bench.systems.kvbench import argmax, build_model
from model.attention import UnsupportedBackend, record
from model.load import to_hf_state_dict

if TYPE_CHECKING:
    from transformers import Cache


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
    """A transformers model on our weights and one of its caches (`new_cache`), compiled or not."""

    extras: ClassVar[tuple[tuple[str, str], ...]] = (("transformers", "hf"),)
    protocols: ClassVar[tuple[str, ...]] = ("aware", "agnostic")
    allocates_up_front = False
    attention = "sdpa"  # transformers' attention implementation
    compiled_step = False  # the decode step compiled as `generate` compiles it
    window: int | None = None  # a sliding window over the last `window` positions (a Mistral model)

    def __init__(self, spec, device: torch.device) -> None:
        import transformers

        self.knobs = dict(spec.system.knobs)
        ours, self.tokenizer = build_model(spec, device, keep=False)  # the process holds one model: HF's
        self.check_model(ours.config)
        self.model = hf_model(ours, spec.ctx + spec.new_tokens, self.window, self.attention)
        self.config = ours.config
        del ours
        self.version = transformers.__version__
        self.kv_slots = spec.ctx + spec.new_tokens
        self.prefill_chunk = spec.ctx  # one call over the prompt, as its `generate` makes it
        self.embedding_bytes = 0 if self.config.tie_embeddings else self.model.model.embed_tokens.weight.nbytes
        self.cache = None
        self.eager_forward = self.model.__call__
        self.step = self.model.get_compiled_call(None) if self.compiled_step else self.eager_forward
        # transformers >= 5.2x names the argument `cache` (`past_key_values` is deprecated); older ones do not
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.device = device

    @classmethod
    def compiled(cls, compile: str, device: str, cache_cls: type, sdpa: str) -> bool:
        return cls.compiled_step

    def check_model(self, config) -> None:
        """Raises UnsupportedBackend for a model shape this system cannot hold: it builds a Llama, Qwen2 or Mistral."""
        features = ["qk_norm", "norm_offset", "sandwich_norms", "embed_scale", "layer_windows", "attn_scale"]
        held = [f for f in features if getattr(config, f)] + (["gelu_tanh"] if config.mlp_act != "silu" else [])
        if held:
            raise UnsupportedBackend(
                f"system {self.name} builds a Llama-family model; {config.name} has {', '.join(held)} (Qwen3, Gemma 3)"
            )

    def new_cache(self, length: int) -> Cache:
        """An empty cache of this system's kind for `length` tokens per sequence."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def compressing(self, length: int) -> AbstractContextManager:
        """Around a prefill of `length` tokens: what compresses the cache as it fills (kvpress's press)."""
        return nullcontext()

    def call(self, ids: Tensor, start: int, logits_to_keep: int = 1, step=None) -> Tensor:
        """ids (B, T) at positions start.. through the cache; the last position's logits (B, vocab). A compressed cache
        holds fewer tokens than the positions seen: positions go to RoPE, the cache's own length to its slots."""
        held = self.held(start)
        out = (step or self.model)(
            input_ids=ids,
            position_ids=torch.arange(start, start + ids.shape[1], device=ids.device)[None],
            cache_position=torch.arange(held, held + ids.shape[1], device=ids.device),
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_arg: self.cache},
        )
        record(f"hf_{self.attention}")  # HF's attention (its SDPA integration picks the kernel)
        return out.logits[:, -1]

    def held(self, start: int) -> int:
        """The slot of the cache where a call at position `start` writes its first token."""
        return self.cache.get_seq_length()

    # ---- the timed path ----------------------------------------------------------------------------------------

    def prefill(self, ids: Tensor, desc: str | None = None) -> Tensor:
        self.open(ids.shape[0], ids.shape[1])
        return argmax(self.forward(ids, 0))

    def decode(self, token: Tensor, pos: int) -> Tensor:
        if self.compiled_step and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return argmax(self.call(token, pos, logits_to_keep=0, step=self.step))

    # ---- the task suite's path ---------------------------------------------------------------------------------

    def open(self, batch: int, tokens: int) -> None:
        self.cache = self.new_cache(tokens)

    def forward(self, ids: Tensor, start: int) -> Tensor:
        if start == 0:
            with self.compressing(ids.shape[1]):
                return self.call(ids, 0)
        return self.call(ids, start)

    @contextmanager
    def question(self, tokens: int):
        """The question and its answer are appended after the context and cut off again at the end, as kvpress's own
        pipeline does."""
        held = [(layer.keys.shape[-2], layer) for layer in self.cache.layers]
        try:
            yield
        finally:
            for length, layer in held:  # back to the (compressed) context
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    # ---- memory and what ran -----------------------------------------------------------------------------------

    def cache_tensors(self, cache: Cache | None = None) -> list[Tensor]:
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
        return tensor_bytes(self.cache_tensors(), self.device)

    def resident_bytes(self) -> int:
        return tensor_bytes([*self.model.parameters(), *self.model.buffers()])

    def columns(self) -> dict:
        return {"compile": self.compiled_step, "transformers_version": self.version}

    def eager_steps(self) -> AbstractContextManager:
        return swapped(self, "step", self.eager_forward)
