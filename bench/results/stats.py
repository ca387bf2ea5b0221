"""An accuracy is a sample mean: its 95% interval, and whether two configurations answered the same samples
differently more often than chance allows.

* `wilson`: the Wilson score interval of a proportion (scores each 0 or 1: one task's, or equal-sized tasks' pooled).
* `bootstrap`: a percentile interval of a mean over tasks, resampling the samples within each task (seeded), where
  scores are fractional (several expected strings) or tasks differ in size.
* `sign_test`: the exact two-sided sign test on paired scores (on 0/1 scores it is the exact McNemar test): only the
  samples where the two differ count; under "no difference" each is a fair coin.
* `rank`: per model, context, protocol and budget, the configurations by accuracy, the ones a sign test cannot
  separate from the best (or from dense) at the 5% level marked as tied with it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
ALPHA = 0.05
KEY = ["task", "sample", "question"]  # a record's place: the same in every configuration of a sweep


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of successes / n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap(by_task: dict[str, np.ndarray], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over tasks of each task's mean score, the samples of each task drawn
    again with replacement."""
    rng = np.random.default_rng(seed)
    means = np.zeros(resamples)
    for scores in by_task.values():
        draws = rng.integers(0, len(scores), size=(resamples, len(scores)))
        means += scores[draws].mean(axis=1)
    means /= len(by_task)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def interval(by_task: dict[str, np.ndarray]) -> tuple[float, float]:
    """Wilson where every score is 0 or 1 and the tasks have as many each (the mean over tasks is then one proportion
    of all the answers), the bootstrap otherwise (fractional scores, tasks of different sizes)."""
    sizes = {len(s) for s in by_task.values()}
    scores = np.concatenate(list(by_task.values()))
    if len(sizes) == 1 and np.isin(scores, (0.0, 1.0)).all():
        return wilson(float(scores.sum()), len(scores))
    return bootstrap(by_task)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided p-value of `wins` against `losses` (ties left out) under a fair coin."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(a: pd.Series, b: pd.Series) -> tuple[int, int, float]:
    """(samples where a scored higher, where b did, the sign test's p) over the places both answered."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner")
    wins, losses = int((both["a"] > both["b"]).sum()), int((both["a"] < both["b"]).sum())
    return wins, losses, sign_test(wins, losses)


def accuracy(records: pd.DataFrame) -> tuple[float, float, float, int]:
    """(mean over tasks of each task's mean score, its 95% interval, samples x questions) of one configuration."""
    by_task = {task: g["score"].to_numpy(float) for task, g in records.groupby("task")}
    mean = float(np.mean([s.mean() for s in by_task.values()]))
    low, high = interval(by_task)
    return mean, low, high, len(records)


def rank(records: pd.DataFrame) -> pd.DataFrame:
    """One line per configuration (config_hash) with its accuracy and interval, ordered by model, context, protocol,
    fraction kept (dense first) and accuracy; `best_p`/`tied_best`: the sign test against the most accurate
    configuration of its model, context, protocol and budget (the same samples); `dense_p`/`vs_dense`: against dense
    there (`wins-losses`). Another model or context answers other samples: it is never compared."""
    records = records.copy()
    records["kept"] = [
        1.0 if c == "dense" else b / x for c, b, x in zip(records["cache"], records["cache_budget"], records["ctx"])
    ]
    records["model"] = records["model"].astype(str) if "model" in records else "-"
    scores = {h: g.set_index(KEY)["score"] for h, g in records.groupby("config_hash")}
    lines = []
    for (model, ctx, protocol, kept), group in records.groupby(["model", "ctx", "protocol", "kept"], sort=False):
        stats = {h: accuracy(g) for h, g in group.groupby("config_hash")}
        best = max(stats, key=lambda h: stats[h][0])
        setting = (records["model"] == model) & (records["ctx"] == ctx) & (records["protocol"] == protocol)
        dense = records[setting & (records["cache"] == "dense")]["config_hash"]
        dense = dense.iloc[0] if len(dense) else None
        for h, (mean, low, high, n) in stats.items():
            first = group[group["config_hash"] == h].iloc[0]
            _, _, best_p = paired(scores[h], scores[best])
            line = {
                "model": model,
                "ctx": int(ctx),
                "protocol": protocol,
                "kept": kept,
                "config_hash": h,
                "label": first["label"],
                "method": first["method"],
                "system": first["system"],
                "accuracy": mean,
                "low": low,
                "high": high,
                "n": n,
                "best_p": best_p,
                "tied_best": h == best or best_p >= ALPHA,
            }
            if dense is not None and h != dense:
                wins, losses, p = paired(scores[h], scores[dense])
                line.update(dense_p=p, vs_dense=f"{wins}-{losses}", tied_dense=p >= ALPHA)
            lines.append(line)
    out = pd.DataFrame(lines)
    if out.empty:
        return out
    order = ["model", "ctx", "protocol", "kept", "accuracy"]
    return out.sort_values(order, ascending=[True, True, True, False, False], ignore_index=True)


def implementations(records: pd.DataFrame) -> pd.DataFrame:
    """One line per configuration of a policy run by another system than its reference (the system whose cache bears
    the policy's name: `label == peer`, or `peer+<decode mode>`), beside the reference's configuration of that policy
    under the same protocol and budget and, under `aware`, the same decode mode (`agnostic` appends the question and
    its answer after the compressed context in either mode): both accuracies on the places both answered, and the sign
    test on those answers (`wins-losses` of the other)."""
    if "peer" not in records:
        return pd.DataFrame()
    scores = {h: g.set_index(KEY)["score"] for h, g in records.groupby("config_hash")}
    configs = records.drop_duplicates("config_hash").copy()
    # the mode a row ran (records.load fills it from the row's system; a frame without it: evict); the mode does not
    # matter under agnostic, nor for a cache that keeps every token
    decode = configs["decode"].fillna("evict") if "decode" in configs else pd.Series("evict", index=configs.index)
    either = (configs["protocol"] == "agnostic") | (configs["cache"] == "dense")
    configs["mode"] = decode.where(~either, "either")
    plain = configs["label"] == configs["peer"]
    own = plain | (configs["label"] == configs["peer"] + "+" + decode)
    # where two of the reference's modes answer alike, the one its label does not name (its own mode) stands for both
    candidates = configs[own].assign(plain=plain[own]).sort_values("plain", ascending=False, kind="stable")
    keys = ["peer", "cache_budget", "protocol", "mode"]
    reference = candidates.drop_duplicates(keys).set_index(keys)["config_hash"]
    lines = []
    for c in configs[~own].itertuples(index=False):
        mine = reference.get((c.peer, c.cache_budget, c.protocol, c.mode))
        if mine is None:
            continue
        wins, losses, p = paired(scores[c.config_hash], scores[mine])
        places = scores[c.config_hash].index.intersection(scores[mine].index)

        def on_places(h: str, places: pd.Index = places) -> float:
            answers = records[records["config_hash"] == h]
            return accuracy(answers[answers.set_index(KEY).index.isin(places)])[0]

        lines.append(
            {
                "protocol": c.protocol,
                "kept": c.cache_budget / c.ctx,
                "policy": c.peer,
                "system": c.system,
                "label": c.label,
                "accuracy": on_places(c.config_hash),
                "reference": on_places(mine),
                "wins_losses": f"{wins}-{losses}",
                "p": p,
            }
        )
    return pd.DataFrame(lines)
