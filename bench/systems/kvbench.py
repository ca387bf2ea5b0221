"""kvbench's own core as a system: the GPT of model/ with a cache of caches/ per layer, chunked prefill, and the
decode step eager or compiled (model/compiled_decode.py)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor
from tqdm.auto import tqdm

from bench.systems import System
from model.compiled_decode import CompiledDecode
from model.config import Config
from model.generate import prefill_chunks
from model.gpt import GPT

_PRETRAINED: dict[tuple, tuple[GPT, object]] = {}


def build_model(spec, device: torch.device, keep: bool = True) -> tuple[GPT, object]:
    """(model, tokenizer or None): random weights of the named shape (seeded), the real ones (kept for the next job
    of this process unless keep=False), or a local checkpoint folder's."""
    if spec.weights not in ("random", "pretrained"):
        from model.load import load_hf_checkpoint

        model, tokenizer = load_hf_checkpoint(spec.weights, device=device, dtype=spec.torch_dtype)
        return model.eval().requires_grad_(False), tokenizer
    if spec.weights == "pretrained":
        if not keep:
            from model.load import load_pretrained

            model, tokenizer = load_pretrained(spec.model, device=device, dtype=spec.torch_dtype)
            return model.eval().requires_grad_(False), tokenizer
        return _load_pretrained(spec.model, device, spec.torch_dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(spec.torch_dtype)
    try:
        with torch.device(device):
            model = GPT(Config.from_name(spec.model), seed=spec.seed)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False), None


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype) -> tuple[GPT, object]:
    """Real weights, dequantized once per process (7 s for SmolLM2 on 2 cores) and reused by later jobs."""
    from model.load import load_pretrained

    key = (name, str(device), dtype)
    if key not in _PRETRAINED:
        _PRETRAINED.clear()  # keep one model at most
        model, tokenizer = load_pretrained(name, device=device, dtype=dtype)
        _PRETRAINED[key] = model.eval().requires_grad_(False), tokenizer
    model, tokenizer = _PRETRAINED[key]
    model.clear_kv_caches()
    model.set_start_of_layer_hook(None)
    return model, tokenizer


def argmax(logits: Tensor) -> Tensor:
    return logits.argmax(dim=-1, keepdim=True)  # (B, 1)


class KvbenchSystem(System):
    name = "kvbench"

    def __init__(self, spec, device: torch.device) -> None:
        self.model, self.tokenizer = build_model(spec, device)
        self.config = self.model.config
        longest = spec.ctx + spec.new_tokens
        self.model.set_kv_caches(
            spec.batch, spec.cache, spec.cache_length, spec.allocation, longest, **spec.cache_kwargs
        )
        self.model.set_attention_backend(spec.sdpa)
        self.kv_slots = spec.cache_length
        self.chunk = spec.prefill_chunk
        self.embedding_bytes = 0 if self.model.wte is None else self.model.wte.weight.nbytes
        self.decoder = CompiledDecode(self.model) if spec.compile else None  # raises UnsupportedBackend
        self.step = self.decoder or self.model

    def prefill(self, ids: Tensor, desc: str | None = None) -> Tensor:
        """Chunked; only the last position goes through the output head."""
        bounds = prefill_chunks(self.model, ids.shape[1], self.chunk)
        show = desc is not None and len(bounds) >= 4
        hidden = None
        for start, end in tqdm(bounds, desc=desc, leave=False, disable=None if show else True):
            hidden = self.model(ids[:, start:end], input_pos=start, skip_lm_head=True)  # (B, end - start, n_embd)
        return argmax(self.model.lm_head(hidden[:, -1]))

    def decode(self, token: Tensor, pos: int) -> Tensor:
        return argmax(self.step(token, input_pos=pos)[:, -1])

    def cache_bytes(self) -> int:
        return sum(c.size_estimate() for c in self.model.kv_caches)

    def resident_bytes(self) -> int:
        tensors = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        tensors.update((id(b), b) for c in self.model.kv_caches for b in c.buffers())
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def columns(self) -> dict:
        if self.decoder is None:
            return {"compile": False}
        plan = self.decoder.plan
        return {
            "compile": True,
            "cuda_graphs": plan.graphs,
            "decode_attention": plan.form,
            "decode_kernel": plan.kernel,
        }

    @contextmanager
    def eager_steps(self):
        if self.decoder is None:
            yield
            return
        self.step = CompiledDecode(self.model, compile=False)
        try:
            yield
        finally:
            self.step = self.decoder
