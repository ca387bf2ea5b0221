"""The task suite's protocols (bench/eval/protocols.py) on another library's system: the same samples, the same padded
questions, the same greedy answers cut at the end-of-turn token, through the system's own caches.

* `aware`: per question, a fresh cache; the context and the question prefilled together (compressed together, for
  a press), then the answer.
* `agnostic`: the context prefilled alone (and compressed, for a press) into one cache; each question and its answer
  are appended after it and cut off again before the next question: kvpress's own pipeline does the same (a
  static cache needs no cut: the next question overwrites the slots after the context, which is all it reads).

Positions go on from the context's length whatever the cache kept, as in kvpress's pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bench.eval import protocols
from bench.eval.tasks import Sample

if TYPE_CHECKING:
    from bench.systems.hf import HFSystem


@torch.inference_mode()
def run(system: HFSystem, samples: list[Sample], protocol: str) -> list[list[str]]:
    """The answers, per sample and question, of a batch of samples under `protocol` through `system` (an HFSystem)."""
    tokenizer = system.tokenizer
    context, questions = protocols.inputs(tokenizer, samples, system.model.device)
    steps, eos = samples[0].max_new_tokens, tokenizer.eos_id
    n = context.shape[1]
    replies: list[Tensor] = []
    cache = None

    def step(token: Tensor, pos: int) -> Tensor:
        return system.call(token, pos, cache)

    if protocol == "aware":
        for q in questions:
            prompt = torch.cat([context, q], dim=1)  # (B, n + q)
            cache = system.new_cache(prompt.shape[1] + steps)
            with system.compressing(prompt.shape[1]):
                logits = system.call(prompt, 0, cache)
            replies.append(protocols.answer(step, logits, prompt.shape[1], steps, eos)[0])
    elif protocol == "agnostic":
        cache = system.new_cache(n + max(q.shape[1] for q in questions) + steps)
        with system.compressing(n):
            system.call(context, 0, cache)
        held = [] if cache is system.static else [(layer.keys.shape[-2], layer) for layer in cache.layers]
        for q in questions:
            logits = system.call(q, n, cache)
            replies.append(protocols.answer(step, logits, n + q.shape[1], steps, eos)[0])
            for length, layer in held:  # back to the compressed context
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
    else:
        raise ValueError(f"protocol={protocol!r}: system {system.name} answers under aware or agnostic only")
    return protocols.texts(tokenizer, replies, eos)
