"""How a task's samples meet a system's caches: three protocols, each a batch of samples through any system's caches
(the calls of bench/systems/base.py: `open`, `forward`, `question`).

* `aware`: the context and the question in one prompt (a single chat turn), prefilled and compressed together,
  then the answer generated through the same cache. One prompt per question.
* `agnostic`: the context prefilled and compressed alone; then each question is asked of that same compressed
  cache, read as it is, the question and its answer appended after it without eviction, and dropped before the next
  question. What a cache reused across requests faces, and how NVIDIA's kvpress evaluates.
* `multiturn`: the questions one after another in one conversation through one cache, each answer staying in it,
  eviction going on throughout (SCBench's shared-context setting, Li et al., 2024).

Samples of one batch have contexts of one length (bench/eval/tasks.py builds them so); each question is padded on
the left with newlines to the longest of the batch. Answers are greedy (model/generate.py `decode`), up to the batch's
longest answer budget (a sample's `max_new_tokens`), cut at the end-of-turn token; a batch stops once every sequence
has ended. Positions go on from
the context's length whatever the cache kept, as in kvpress's pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench.config.schema import PROTOCOLS
from bench.eval.tasks import Sample
from model.generate import decode


def padded(samples: list[Sample], newline: list[int]) -> list[Tensor]:
    """Question j of every sample, left-padded with newline tokens to the longest: a (batch, length) tensor per j."""
    out = []
    for j in range(len(samples[0].questions)):
        width = max(len(s.questions[j]) for s in samples)
        rows = [(newline * width)[: width - len(s.questions[j])] + s.questions[j] for s in samples]
        out.append(torch.tensor(rows))
    return out


class SharedPrompts:
    """Prompts recorded once and loaded into every cache that can take them (bench/systems/base.py `shares_prompt`):
    one prefill of a batch serving every cache and budget a sweep runs on it. `paths`: which ran ("shared": loaded
    from a recording, "own": the cache's own prefill)."""

    def __init__(self) -> None:
        self.recorded: dict[tuple, tuple[Tensor, list]] = {}
        self.paths: set[str] = set()

    def start(self, system, ids: Tensor) -> Tensor:
        """ids (B, T) at position 0 into the caches `system.open` made; returns the last position's logits."""
        if not system.shares_prompt(ids.shape[1]):
            self.paths.add("own")
            return system.forward(ids, 0)
        key = (tuple(ids.shape), hash(ids.cpu().numpy().tobytes()))
        if key not in self.recorded:
            self.recorded[key] = system.record(ids)
        logits, prompts = self.recorded[key]
        system.load(prompts)
        self.paths.add("shared")
        return logits


@torch.inference_mode()
def run(system, samples: list[Sample], protocol: str, shared: SharedPrompts | None = None) -> list[Reply]:
    """The replies, per sample and question, of a batch of samples under `protocol` through `system`'s caches. With
    `shared`, a prompt (the aware and agnostic protocols' first call) it recorded before is loaded, not prefilled."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not valid; valid choices: {', '.join(PROTOCOLS)}")
    tokenizer = system.tokenizer
    context = torch.tensor([s.context for s in samples], device=next(system.model.parameters()).device)  # (B, n)
    questions = [q.to(context.device) for q in padded(samples, tokenizer.encode("\n"))]
    steps, eos = max(s.max_new_tokens for s in samples), tokenizer.eos_id  # the batch's longest answer budget
    B, n = context.shape
    replies: list[Tensor] = []

    def answer(logits: Tensor, start: int) -> tuple[Tensor, int]:
        return decode(system.forward, logits, start, steps, eos)

    def begin(ids: Tensor) -> Tensor:
        return shared.start(system, ids) if shared is not None else system.forward(ids, 0)

    if protocol == "aware":
        for q in questions:
            system.open(B, n + q.shape[1] + steps)
            logits = begin(torch.cat([context, q], dim=1))
            replies.append(answer(logits, n + q.shape[1])[0])
    elif protocol == "agnostic":
        system.open(B, n + max(q.shape[1] for q in questions) + steps)
        begin(context)
        for q in questions:
            with system.question(q.shape[1] + steps):
                logits = system.forward(q, n)
                replies.append(answer(logits, n + q.shape[1])[0])
    else:
        system.open(B, n + sum(q.shape[1] + steps for q in questions))
        pos = 0
        for j, q in enumerate(questions):
            logits = system.forward(torch.cat([context, q], dim=1) if j == 0 else q, pos)
            pos += q.shape[1] + (n if j == 0 else 0)
            tokens, pos = answer(logits, pos)
            replies.append(tokens)
            if j < len(questions) - 1:  # the answer's last token goes into the cache before the next question
                system.forward(tokens[:, -1:], pos)
                pos += 1
    return texts(tokenizer, replies, eos, steps)


@dataclass(frozen=True)
class Reply:
    """A generated answer: its text (up to the end-of-turn token), how many tokens it took (the end-of-turn token not
    counted) of the `allowed` ones, and whether it was `cut` (it took them all without ending)."""

    text: str
    tokens: int
    allowed: int
    cut: bool


def texts(tokenizer, replies: list[Tensor], eos: int | None, steps: int) -> list[list[Reply]]:
    """Per sample, its reply to each question (replies: one (B, n) tensor per question, n <= steps)."""
    return [[_reply(tokenizer, r[b], eos, steps) for r in replies] for b in range(replies[0].shape[0])]


def _reply(tokenizer, tokens: Tensor, eos: int | None, steps: int) -> Reply:
    ids = tokens.tolist()
    ended = eos is not None and eos in ids
    if ended:
        ids = ids[: ids.index(eos)]
    return Reply(tokenizer.decode(ids, skip_special=True), len(ids), steps, not ended and len(ids) >= steps)
