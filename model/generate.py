"""Chunked prefill and batched decode through the model's KV caches."""

from __future__ import annotations

import torch
from torch import Tensor

from model.gpt import GPT


def prefill_chunks(model: GPT, prompt_length: int, prefill_chunk: int) -> list[tuple[int, int]]:
    """(start, end) of each prefill call: the first within every cache's max_prefill_length, the later ones
    within every cache's max_tokens_forward, none longer than prefill_chunk."""
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    caches = model.kv_caches
    first = min([prefill_chunk] + [c.max_prefill_length for c in caches if c.max_prefill_length is not None])
    later = min([prefill_chunk] + [c.max_tokens_forward for c in caches])
    bounds, start, size = [], 0, first
    while start < prompt_length:
        end = min(prompt_length, start + size)
        bounds.append((start, end))
        start, size = end, later
    return bounds


@torch.inference_mode()
def prefill(model: GPT, prompt: Tensor, prefill_chunk: int = 2048) -> Tensor:
    """Run prompt (B, T) through the caches in chunks; returns the logits of the last position (B, vocab).
    Only the last position goes through the output head."""
    hidden = None
    for start, end in prefill_chunks(model, prompt.shape[1], prefill_chunk):
        hidden = model(prompt[:, start:end], input_pos=start, skip_lm_head=True)  # (B, end - start, n_embd)
    return model.lm_head(hidden[:, -1])  # (B, vocab)


def sample(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, generator=None) -> Tensor:
    """logits (B, vocab) -> next token ids (B, 1): greedy at temperature 0, else softmax sampling (top-k)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    prefill_chunk: int = 2048,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """prompt (B, T) -> (B, T + n) with n <= max_new_tokens new tokens per sequence.

    Uses the caches assigned to the model, or dense caches sized for prompt + new tokens (removed again at the
    end) when none are. With eos_id, a finished sequence keeps emitting eos_id until all are finished.
    """
    B, T = prompt.shape
    own_caches = not model.kv_caches
    if own_caches:
        model.set_kv_caches(batch_size=B, cache="dense", cache_length=T + max_new_tokens)
    try:
        out = [prompt]
        logits = prefill(model, prompt, prefill_chunk)
        done = torch.zeros(B, 1, dtype=torch.bool, device=prompt.device)
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, generator)  # (B, 1)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            out.append(token)
            if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            logits = model(token, input_pos=T + i)[:, -1]  # (B, vocab)
        return torch.cat(out, dim=1)
    finally:
        if own_caches:
            model.clear_kv_caches()
