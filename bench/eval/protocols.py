"""How a task's samples meet a cache: three protocols, each a batch of samples through the model's caches.

* `aware`: the context and the question in one prompt (a single chat turn), prefilled and compressed together,
  then the answer generated through the same cache. One prompt per question.
* `agnostic`: the context prefilled and compressed alone; then each question is asked of that same compressed
  cache, read as it is, the question and its answer appended after it without eviction (caches/frozen.py), and
  dropped before the next question. What a cache reused across requests faces, and how NVIDIA's kvpress evaluates.
* `multiturn`: the questions one after another in one conversation through one cache, each answer staying in it,
  eviction going on throughout (SCBench's shared-context setting, Li et al., 2024).

Samples of one batch have contexts of one length (bench/eval/tasks.py builds them so); each question is padded on the
left with newlines to the longest of the batch. Answers are greedy, up to the task's `max_new_tokens`, cut at the
end-of-turn token; a batch stops once every sequence has ended.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bench.eval.tasks import Sample
from caches.frozen import FrozenPrefixCache
from model.generate import prefill_chunks
from model.gpt import GPT

PROTOCOLS = ("aware", "agnostic", "multiturn")


def padded(samples: list[Sample], newline: list[int]) -> list[Tensor]:
    """Question j of every sample, left-padded with newline tokens to the longest: a (batch, length) tensor per j."""
    out = []
    for j in range(len(samples[0].questions)):
        width = max(len(s.questions[j]) for s in samples)
        rows = [(newline * width)[: width - len(s.questions[j])] + s.questions[j] for s in samples]
        out.append(torch.tensor(rows))
    return out


@torch.inference_mode()
def prefill(model: GPT, ids: Tensor, start: int, chunk: int) -> Tensor:
    """ids (B, T) through the caches from position `start` (0: a new prefill), in chunks the caches accept; returns
    the last position's logits (B, vocab)."""
    hidden = None
    for a, b in prefill_chunks(model, ids.shape[1], chunk) if start == 0 else _chunks(model, ids.shape[1], chunk):
        hidden = model(ids[:, a:b], input_pos=start + a, skip_lm_head=True)  # (B, b - a, n_embd)
    return model.lm_head(hidden[:, -1])


def _chunks(model: GPT, length: int, chunk: int) -> list[tuple[int, int]]:
    size = min([chunk] + [c.max_tokens_forward for c in model.kv_caches])
    return [(a, min(length, a + size)) for a in range(0, length, size)]


@torch.inference_mode()
def answer(
    step: Callable[[Tensor, int], Tensor], logits: Tensor, start: int, steps: int, eos: int | None
) -> tuple[Tensor, int]:
    """Greedy tokens after `logits` (B, vocab), the first at position `start`: (B, n) with n <= steps, and the position
    of the last one, which is not fed to the caches. `step(token (B, 1), pos)` feeds a token and returns the next
    logits (B, vocab). A sequence that ended keeps feeding its end token until all have ended."""
    tokens, done, pos = [], torch.zeros(logits.shape[0], 1, dtype=torch.bool), start
    for i in range(steps):
        token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
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
def run(model: GPT, tokenizer, setup, samples: list[Sample], protocol: str, chunk: int) -> list[list[str]]:
    """The answers, per sample and question, of a batch of samples under `protocol` through caches `setup` makes
    (bench.eval.quality.CacheSetup)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not valid; valid choices: {', '.join(PROTOCOLS)}")
    context, questions = inputs(tokenizer, samples, model.lm_head.weight.device)
    steps = samples[0].max_new_tokens
    eos = tokenizer.eos_id
    B, n = context.shape
    replies: list[list[Tensor]] = []

    def step(token: Tensor, pos: int) -> Tensor:
        return model(token, input_pos=pos)[:, -1]

    if protocol == "aware":
        for q in questions:
            setup.assign(model, n + q.shape[1] + steps, B)
            logits = prefill(model, torch.cat([context, q], dim=1), 0, chunk)
            replies.append(answer(step, logits, n + q.shape[1], steps, eos)[0])
    elif protocol == "agnostic":
        setup.assign(model, n + max(q.shape[1] for q in questions) + steps, B)
        prefill(model, context, 0, chunk)
        base = model.kv_caches
        for q in questions:
            model.assign_kv_caches([FrozenPrefixCache(c, q.shape[1] + steps) for c in base])
            logits = model(q, input_pos=n)[:, -1]
            replies.append(answer(step, logits, n + q.shape[1], steps, eos)[0])
        model.assign_kv_caches(base)
    else:
        setup.assign(model, n + sum(q.shape[1] + steps for q in questions), B)
        logits = prefill(model, torch.cat([context, questions[0]], dim=1), 0, chunk)
        pos = n + questions[0].shape[1]
        for j, q in enumerate(questions):
            if j:  # the next question, after the previous answer, in the same cache
                logits = prefill(model, q, pos, chunk)
                pos += q.shape[1]
            tokens, pos = answer(step, logits, pos, steps, eos)
            replies.append(tokens)
            if j < len(questions) - 1:  # the answer's last token goes into the cache before the next question
                model(tokens[:, -1:], input_pos=pos)
                pos += 1
    model.clear_kv_caches()
    return texts(tokenizer, replies, eos)


def texts(tokenizer, replies: list[Tensor], eos: int | None) -> list[list[str]]:
    """Per sample, the text of its reply to each question (replies: one (B, n) tensor per question)."""
    return [[_text(tokenizer, r[b], eos) for r in replies] for b in range(replies[0].shape[0])]


def inputs(tokenizer, samples: list[Sample], device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """The batch's contexts (B, n) and its questions, each (B, q_j), on `device`."""
    context = torch.tensor([s.context for s in samples], device=device)  # (B, n)
    return context, [q.to(device) for q in padded(samples, tokenizer.encode("\n"))]


def _text(tokenizer, tokens: Tensor, eos: int | None) -> str:
    ids = tokens.tolist()
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special=True)
