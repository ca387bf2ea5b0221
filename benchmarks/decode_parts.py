"""Where an eager decode step's time goes, cache by cache: the model (its weights: projections, MLP, norms, output
head), and inside the caches the attention, the K/V read and write, the policy's scoring and the eviction.

    python benchmarks/decode_parts.py                                 # SmolLM2-135M shape, ctx 2k, budget 1/4
    python benchmarks/decode_parts.py --ctx 8k --budget 0.125 --caches dense,knorm,snapkv

Random weights of the model's shape (a step's cost does not depend on the values), batch 1, float32, 2 threads, eager
steps. One prefill per cache (a shared recording, as the harness loads it, for the caches that can load one) and one
untimed step; then `--rounds` rounds, each running `--steps` steps of every cache in turn (so that a disturbance of
the machine falls on all of them alike). Each part is timed by wrapping the functions that do it (exclusive time: a
part nested in another counts once, in itself); on the CPU every call is synchronous, so a call's wall time is its
cost. `name:grouped` runs a cache whose policy reads no weights at decode through the grouped step instead of its
fused call, for the comparison. Prints one JSON line per cache: ms per step (median and fastest of the rounds' means,
the mean) and per part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from bench.config.spec import parse_ctx
from bench.eval.protocols import SharedPrompts
from bench.systems.kvbench import KvbenchSystem
from caches import adakv, base, buffers, cache_class, frozen, scored
from caches.scored import ScoredCache
from model.config import Config
from model.gpt import GPT

PARTS = ("attention", "kv_read", "kv_write", "scoring", "eviction", "cache_other")


class PartTimer:
    """Exclusive wall time per part of the functions wrapped with `wrap`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._children: list[float] = []
        self.on = False

    def wrap(self, owner, name: str, part: str) -> None:
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on:
                return real(*args, **kwargs)
            self._children.append(0.0)
            t = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                inner = self._children.pop()
                self.seconds[part] += dt - inner
                if self._children:
                    self._children[-1] += dt

        setattr(owner, name, timed)

    @contextmanager
    def timing(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False


def instrument(timer: PartTimer) -> None:
    """Every cache's forward (its own time: bookkeeping), its attention calls, its buffer's reads and writes, the
    policies' scoring and selection."""
    timer.wrap(base.KVCache, "forward", "cache_other")
    for module, name in [
        (base, "attention"),
        (scored, "grouped_attention"),
        (scored, "static_weighted_decode"),
        (buffers, "static_decode_attention"),
        (adakv, "grouped_attention"),
        (frozen, "grouped_attention"),
    ]:
        timer.wrap(module, name, "attention")
    for name in ("read",):
        timer.wrap(buffers.KVBuffer, name, "kv_read")
    timer.wrap(adakv.AdaKVCache, "_gather", "kv_read")
    timer.wrap(adakv.AdaKVCache, "_attend_flat", "attention")
    for name in ("write_range", "write_slots", "put", "put_where", "move_slot", "write_at"):
        timer.wrap(buffers.KVBuffer, name, "kv_write")
    classes = {cache_class(n) for n in ("h2o", "qh2o", "tova", "snapkv", "knorm", "keydiff", "random")}
    classes |= {cache_class("expected_attention"), ScoredCache}
    for cls in classes:
        if "candidate_scores" in cls.__dict__:
            timer.wrap(cls, "candidate_scores", "scoring")
    for name in ("_select_one", "_select", "_admit"):
        timer.wrap(ScoredCache, name, "eviction")
    for name in ("_select", "_keep", "_drop"):
        timer.wrap(adakv.AdaKVCache, name, "eviction")


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=parse_ctx, default=2048)
    ap.add_argument("--budget", type=float, default=0.25)
    caches = (
        "dense,last_recent,knorm,knorm:grouped,keydiff,random,snapkv,snapkv:grouped,expected_attention,tova,h2o,adakv"
    )
    ap.add_argument("--caches", default=caches, help="name[:grouped]: :grouped decodes through the grouped step")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="timed steps per cache and round")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = GPT(Config.from_name(args.model)).eval().requires_grad_(False)
    ids = torch.randint(0, model.config.vocab_size, (1, args.ctx))  # (1, ctx)
    timer = PartTimer()
    instrument(timer)
    shared = SharedPrompts()
    room = 2 + args.rounds * args.steps
    state = {}  # name -> [its caches, next token, next position]
    for entry in args.caches.split(","):
        name, _, how = entry.partition(":")
        slots = args.ctx + room if name == "dense" else int(args.ctx * args.budget)
        system = KvbenchSystem.around(model, None, name, slots, args.ctx)
        system.open(1, args.ctx + room)
        if how == "grouped":  # the step before the fused call: every decode through grouped_attention
            for cache in model.kv_caches:
                cache.fused_decode = False
        token = shared.start(system, ids).argmax(-1, keepdim=True)  # (1, 1)
        token = system.forward(token, args.ctx).argmax(-1, keepdim=True)  # one untimed step: first-call costs
        state[entry] = [model.kv_caches, token, args.ctx + 1]
    steps = defaultdict(list)  # name -> ms per step of each round
    parts = defaultdict(lambda: defaultdict(float))  # name -> part -> seconds
    for _ in range(args.rounds):  # the caches in turn each round: each sees the machine as the others do
        for entry, (caches, token, pos) in state.items():
            model.assign_kv_caches(caches)
            with timer.timing():
                t = time.perf_counter()
                for _ in range(args.steps):
                    token = model(token, input_pos=pos)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
                    pos += 1
                steps[entry].append(1e3 * (time.perf_counter() - t) / args.steps)
            for part, seconds in timer.seconds.items():
                parts[entry][part] += seconds
            timer.seconds.clear()
            state[entry][1:] = [token, pos]
    for entry, per_round in steps.items():
        n = args.rounds * args.steps
        per_step = {part: 1e3 * parts[entry][part] / n for part in PARTS}
        total = statistics.mean(per_round)
        row = {
            "cache": entry,
            "slots": state[entry][0][0].cache_length if entry.split(":")[0] != "dense" else args.ctx + room,
            "ctx": args.ctx,
            "step_ms_median_of_rounds": round(statistics.median(per_round), 2),
            "step_ms_min_round": round(min(per_round), 2),
            "step_ms_mean": round(total, 2),
            "model_ms": round(total - sum(per_step.values()), 2),
            **{f"{part}_ms": round(ms, 2) for part, ms in per_step.items()},
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
