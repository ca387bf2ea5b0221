"""How a task's samples meet a system's caches: three protocols, each a batch of samples through any system's caches
(the calls of bench/systems/base.py: `open`, `forward`, `question`).

* `aware`: the context and the question in one prompt (a single chat turn), prefilled and compressed together,
  then the answer generated through the same cache. One prompt per question.
* `agnostic`: the context prefilled and compressed alone; then each question is asked of that same compressed
  cache, read as it is, the question and its answer appended after it without eviction, and dropped before the next
  question. What a cache reused across requests faces, and how NVIDIA's kvpress evaluates.
* `multiturn`: the questions one after another in one conversation through one cache, each answer staying in it,
  eviction going on throughout (SCBench's shared-context setting, Li et al., 2024).

Samples of one batch have contexts of one length (bench/eval/tasks.py builds them so); each question is padded on the
left with newlines to the longest of the batch. Answers are greedy (model/generate.py `decode`), generated up to the
batch's longest answer budget and read up to each sample's own (`max_new_tokens`), cut at the end-of-turn token; a batch
stops once every sequence has ended. Positions go on from the context's length whatever the cache kept, as in kvpress's
pipeline.
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
    """What one batch's prompts leave, kept for every configuration a sweep answers on them.

    * A cache that a recorded prompt loads (bench/systems/base.py `shares_prompt`): the prompt is recorded once and
      loaded into every such cache and budget ("shared"). A prompt that begins a recorded one (agnostic's context,
      when aware's context and question were recorded) is loaded from the recording's first positions: under causal
      attention they are what a prefill of the shorter prompt computes.
    * A cache that runs its own prefill ("own"), and leaves the same state whether a prompt comes in one call or
      several (`snapshot`: dense, last_recent's window): its prefill of the context is copied, and serves both the
      agnostic protocol's context and the aware protocol's context and question (the question then one more call).
      Where its own prefill attends its first positions as plain causal attention (`causal_prefix`: last_recent's
      first cache_length) and a recording holds them, they are loaded from it and only the rest is prefilled
      ("resumed").
    """

    def __init__(self) -> None:
        self.recorded: dict[tuple, tuple[Tensor, Tensor, list]] = {}  # key -> (ids, last logits, prompts)
        self.contexts: list[tuple[Tensor, object, str]] = []  # (context ids, the caches' state after them, path)
        self.paths: set[str] = set()

    def start(self, system, ids: Tensor, logits: bool = True, context: int | None = None) -> Tensor | None:
        """ids (B, T) at position 0 into the caches `system.open` made, the first `context` of them the context
        (default all); returns the last position's logits (None where `logits` is False: then a longer recording
        that begins with ids may serve)."""
        if not system.shares_prompt(ids.shape[1]):
            n = ids.shape[1] if context is None else context
            if not system.chunks_as_one() or (n == ids.shape[1] and logits):
                self.paths.add("own")
                return system.forward(ids, 0)
            return self._own(system, ids, n)
        self.paths.add("shared")
        if not logits:
            for longer, _, prompts in self.recorded.values():
                if longer.shape[1] >= ids.shape[1] and torch.equal(longer[:, : ids.shape[1]], ids):
                    system.load([p.prefix(ids.shape[1]) for p in prompts])
                    return None
        key = (tuple(ids.shape), hash(ids.cpu().numpy().tobytes()))
        if key not in self.recorded:
            self.recorded[key] = (ids, *system.record(ids))
        _, last, prompts = self.recorded[key]
        system.load(prompts)
        return last

    def _own(self, system, ids: Tensor, n: int) -> Tensor | None:
        """The caches' own prefill of ids in two calls, the context (its first n tokens) then the rest; the caches'
        state after the context copied, or taken from a copy kept. Returns the last logits (None: ids are the
        context alone)."""
        head = ids[:, :n]
        found = None
        for seen, state, path in self.contexts:
            if seen.shape == head.shape and torch.equal(seen, head) and system.restore(state):
                found = path
                break
        if found is None:
            found = self._prefill(system, head)
            self.contexts.append((head, system.snapshot(), found))
        self.paths.add(found)
        return system.forward(ids[:, n:], n) if n < ids.shape[1] else None

    def _prefill(self, system, head: Tensor) -> str:
        """The caches' own prefill of head (B, n), its first `causal_prefix` positions loaded from a recording that
        begins with them where there is one ("resumed": the rest prefilled from there), else whole ("own")."""
        m = min(system.causal_prefix(), head.shape[1])
        for longer, _, prompts in self.recorded.values() if m else ():
            if longer.shape[1] >= m and torch.equal(longer[:, :m], head[:, :m]):
                system.load([p.prefix(m) for p in prompts])
                if m < head.shape[1]:
                    system.forward(head[:, m:], m)
                return "resumed"
        system.forward(head, 0)
        return "own"


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

    def begin(ids: Tensor, logits: bool = True) -> Tensor | None:
        return shared.start(system, ids, logits, context=n) if shared is not None else system.forward(ids, 0)

    if protocol == "aware":
        for q in questions:
            system.open(B, n + q.shape[1] + steps)
            logits = begin(torch.cat([context, q], dim=1))
            replies.append(answer(logits, n + q.shape[1])[0])
    elif protocol == "agnostic":
        system.open(B, n + max(q.shape[1] for q in questions) + steps)
        begin(context, logits=False)
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
    return texts(tokenizer, replies, eos, [s.max_new_tokens for s in samples])


@dataclass(frozen=True)
class Reply:
    """A generated answer: its text (up to the end-of-turn token), how many tokens it took (the end-of-turn token not
    counted) of the `allowed` ones, and whether it was `cut` (it took them all without ending)."""

    text: str
    tokens: int
    allowed: int
    cut: bool


def texts(tokenizer, replies: list[Tensor], eos: int | None, budgets: list[int]) -> list[list[Reply]]:
    """Per sample, its reply to each question (replies: one (B, n) tensor per question), each read up to its own
    sample's budget, whatever its batch generated: a reply is the same in any batch."""
    return [[_reply(tokenizer, r[b, : budgets[b]], eos, budgets[b]) for r in replies] for b in range(len(budgets))]


def _reply(tokenizer, tokens: Tensor, eos: int | None, steps: int) -> Reply:
    ids = tokens.tolist()
    ended = eos is not None and eos in ids
    if ended:
        ids = ids[: ids.index(eos)]
    return Reply(tokenizer.decode(ids, skip_special=True), len(ids), steps, not ended and len(ids) >= steps)
