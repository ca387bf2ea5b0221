"""Chunked prefill and the decode loop through the model's KV caches: the one prefill and the one greedy loop that
the harness, the task protocols and `generate` all run."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model.gpt import GPT


def prefill_chunks(model: GPT, length: int, prefill_chunk: int, start: int = 0) -> list[tuple[int, int]]:
    """(begin, end) offsets into `length` new tokens of each call: none longer than prefill_chunk nor than any cache
    takes in one call (max_tokens_forward); a prompt's first call (start 0) also within every max_prefill_length."""
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    caches = model.kv_caches
    later = min([prefill_chunk] + [c.max_tokens_forward for c in caches])
    first = later
    if start == 0:
        first = min([prefill_chunk] + [c.max_prefill_length for c in caches if c.max_prefill_length is not None])
    bounds, begin, size = [], 0, first
    while begin < length:
        end = min(length, begin + size)
        bounds.append((begin, end))
        begin, size = end, later
    return bounds


@torch.inference_mode()
def prefill(model: GPT, ids: Tensor, prefill_chunk: int = 2048, start: int = 0, progress=None) -> Tensor:
    """ids (B, T) through the caches at positions start.. (0: a new prompt, which resets every cache), in the chunks
    `prefill_chunks` allows; returns the last position's logits (B, vocab): only it goes through the output head.
    progress: wraps the list of chunks (a progress bar)."""
    bounds = prefill_chunks(model, ids.shape[1], prefill_chunk, start)
    hidden = None
    for begin, end in progress(bounds) if progress else bounds:
        hidden = model(ids[:, begin:end], input_pos=start + begin, skip_lm_head=True)  # (B, end - begin, n_embd)
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
def decode(
    step: Callable[[Tensor, int], Tensor],
    logits: Tensor,
    start: int,
    steps: int,
    eos: int | None = None,
    pick: Callable[[Tensor], Tensor] = sample,
) -> tuple[Tensor, int]:
    """Up to `steps` tokens after `logits` (B, vocab), the first at position `start`: (B, n) with n <= steps, and the
    position of the last one, which is not fed to the caches. `step(token (B, 1), pos)` feeds a token and returns
    the next logits (B, vocab); `pick` chooses a token from logits (greedy by default). With `eos`, a sequence that
    ended keeps emitting `eos` until all have ended, and the loop stops once they have."""
    tokens, done, pos = [], torch.zeros(logits.shape[0], 1, dtype=torch.bool), start
    for i in range(steps):
        token = pick(logits)  # (B, 1)
        if eos is not None:
            token = token.masked_fill(done.to(token.device), eos)
            done |= (token == eos).cpu()
        tokens.append(token)
        if i == steps - 1 or bool(done.all()):
            break
        logits = step(token, pos)
        pos += 1
    return torch.cat(tokens, dim=1), pos


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
        logits = prefill(model, prompt, prefill_chunk)
        tokens, _ = decode(
            lambda token, pos: model(token, input_pos=pos)[:, -1],
            logits,
            T,
            max_new_tokens,
            eos_id,
            lambda logits: sample(logits, temperature, top_k, generator),
        )
        return torch.cat([prompt, tokens], dim=1)
    finally:
        if own_caches:
            model.clear_kv_caches()
