"""StreamingLLM's two prefill rules on the task suite, answer by answer: is the prefill what sets kvbench's
last_recent and kvpress's streaming_llm apart?

last_recent and kvpress's press keep the same tokens after a prompt: the first `sinks` and the most recent
`budget - sinks`. They differ in how the prompt was read; three variants:

* `last_recent` (kvbench's cache): StreamingLLM throughout. Each prompt token attends only the sinks and its window,
  so the K/V it keeps were computed from that window alone.
* `after_prefill` (defined here, on kvbench's scored-cache machinery): the prompt attends all of itself in one causal
  call, then everything but the sinks and the most recent tokens is dropped, the older token first. kvpress's press
  does this; decoding then evicts the oldest non-sink, as last_recent does.
* `kvpress`: kvpress's own streaming_llm press (bench/systems/kvpress.py), when the `peers` extra is installed.

Same model (SmolLM2-135M, real weights), same samples and positions, the `agnostic` protocol, the prompt prefilled in
one call. Prints each variant's accuracy per task and, for each pair, how many answers are the same string:

    python benchmarks/streaming_prefill.py                   # 2k context, 512 slots, 4 sinks, 8 samples per task
    python benchmarks/streaming_prefill.py --samples 16 --no-kvpress
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch import Tensor

from bench.config.spec import JobSpec
from bench.eval import protocols, tasks
from bench.harness.sweep import compose_job
from bench.systems import create, missing_extra
from bench.systems.kvbench import KvbenchSystem
from caches.base import KVCacheParams, register
from caches.scored import Candidates, ScoredCache


class RecentAfterPrefill(ScoredCache):
    """Sinks and the most recent tokens, chosen after the call that brought them: a token's score is its position,
    the first `sink_tokens` positions are evicted last. Registered by main() only, not by importing this file."""

    name = "after_prefill"

    def __init__(
        self, params: KVCacheParams, sink_tokens: int = 4, buffer: str = "float", group_size: int = 32
    ) -> None:
        super().__init__(params, buffer, group_size)
        if not 0 <= sink_tokens < params.cache_length:
            raise ValueError(f"sink_tokens must be in [0, cache_length={params.cache_length}), got {sink_tokens}")
        self.sink_tokens = sink_tokens

    def weights_from(self, T: int) -> None:
        return None  # no attention weights: positions decide

    def candidate_scores(self, c: Candidates) -> Tensor:
        return c.pos.float()  # (B, G, n + T)

    def protected(self, cand_pos: Tensor, end: int, T: int) -> Tensor:
        return (cand_pos >= 0) & (cand_pos < self.sink_tokens)


def _spec(ctx: str, samples: int, *overrides: str) -> JobSpec:
    fixed = ["experiment=leaderboard", f"ctx={ctx}", "eval.protocol=agnostic", f"eval.samples={samples}", "repeats=0"]
    return compose_job([*fixed, "device=cpu", *overrides])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", default="2k")
    parser.add_argument("--slots", type=int, default=512, help="tokens each cache keeps (sinks included)")
    parser.add_argument("--sinks", type=int, default=4, help="kvbench's sinks (kvpress's press keeps its own 4)")
    parser.add_argument("--samples", type=int, default=8, help="samples per task")
    parser.add_argument("--no-kvpress", action="store_true", help="skip kvpress's press")
    args = parser.parse_args()

    register(RecentAfterPrefill.name)(RecentAfterPrefill)
    spec = _spec(args.ctx, args.samples, "cache=dense")
    kvbench = create(spec, torch.device("cpu"))
    model, tokenizer, knobs = kvbench.model, kvbench.tokenizer, spec.eval
    ctx = spec.ctx
    variants = {
        name: KvbenchSystem.around(model, tokenizer, name, args.slots, ctx, sink_tokens=args.sinks)
        for name in ("last_recent", "after_prefill")
    }
    answer = {
        name: (lambda samples, system=system: protocols.run(system, samples, "agnostic"))
        for name, system in variants.items()
    }
    if not args.no_kvpress:
        if missing_extra("kvpress"):
            raise SystemExit(f"streaming_prefill: {missing_extra('kvpress')} (or pass --no-kvpress)")
        press = create(
            _spec(args.ctx, args.samples, "system=kvpress", "press=streaming_llm", f"cache.budget={args.slots}"),
            torch.device("cpu"),
        )
        answer["kvpress"] = lambda samples: protocols.run(press, samples, "agnostic")

    replies: dict[str, list[tuple[str, str, str]]] = {name: [] for name in answer}  # (task, reply, expected)
    seconds = dict.fromkeys(answer, 0.0)
    for task in knobs.suite:
        for start in range(0, knobs.samples, knobs.batch):
            indices = range(start, min(knobs.samples, start + knobs.batch))
            seed, n_q = knobs.seed, knobs.questions
            first = [tasks.build(task, tokenizer, ctx, seed, i, n_q) for i in indices]
            width = max(len(s.questions[0]) for s in first)  # the batch's contexts share one length
            samples = [tasks.build(task, tokenizer, ctx, seed, i, n_q, question_tokens=width) for i in indices]
            for name, fn in answer.items():
                t0 = time.perf_counter()
                out = fn(samples)
                seconds[name] += time.perf_counter() - t0
                for sample, texts in zip(samples, out):
                    replies[name] += [(task, reply, want) for reply, want in zip(texts, sample.answers)]

    report: dict = {"ctx": ctx, "slots": args.slots, "sinks": args.sinks, "samples": knobs.samples}
    for name, rows in replies.items():
        per_task = {}
        for task in knobs.suite:
            scores = [tasks.score(reply, want) for t, reply, want in rows if t == task]
            per_task[task] = sum(scores) / len(scores)
        report[name] = {
            "task_acc": sum(per_task.values()) / len(per_task),
            **{f"acc_{t}": a for t, a in per_task.items()},
            "seconds": round(seconds[name], 1),
        }
    for a, b in itertools.combinations(replies, 2):
        same = sum(ra[1] == rb[1] for ra, rb in zip(replies[a], replies[b]))
        report[f"same_answers {a}/{b}"] = f"{same} of {len(replies[a])}"
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
