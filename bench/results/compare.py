"""Compare results with a committed baseline (the rules of `python -m bench.regress`).

Rows are matched by configuration (the `KEY` columns), not by hash or file name. What is checked:

* deterministic columns must be equal: bytes of weights, analytic dense KV and caches (`exact`), and the CPU's
  tracked peak of live tensors (`exact_tracked`: peak_alloc_bytes where its source is the tensor tracker);
* quality columns within an absolute tolerance (`quality`);
* timings only as ratios to dense within the same results (absolute seconds are never compared): a cache's decode
  step / dense's, and its prefill / dense's, may grow by the larger of `ratio` (a floor) and the noise both runs
  recorded, the sum of the four rows' relative 95% half-widths (the p50 step's bootstrap interval; the prefill's
  2 x cv / sqrt(repeats)), so a change within what the rows themselves vary passes and one beyond it fails;
* rows timed under heavy contention (bench/measure/contention.py) are not judged on time: they are listed as such,
  neither passed nor failed (bytes and the tracked peak are still checked exactly);
* a row that was `ok` must still be `ok`, and every baseline row must have a counterpart.

Prints a table of what regressed and exits 1; exits 0 when everything holds, listing what could not be judged.
Reads parquet only (no torch).
Tolerances file (JSON): {"exact": [...], "exact_tracked": [...], "quality": {"col": abs_tol}, "ratio": {"col":
rel_tol}}; any part given replaces the default of that part.
"""

from __future__ import annotations

import pandas as pd

KEY = [
    "system",
    "system_kwargs",
    "model",
    "weights",
    "dtype",
    "device_kind",
    "cache",
    "cache_kwargs",
    "cache_budget",
    "ctx",
    "batch",
    "new_tokens",
    "sdpa_requested",
    "prefill_chunk",
    "repeats",
    "seed",
    "label",  # names a decode mode other than the system's own (`knorm+append`)
]
DEFAULT_TOLERANCES = {
    "exact": ["weights_bytes", "kv_bytes_dense", "cache_bytes"],
    "exact_tracked": ["peak_alloc_bytes", "peak_alloc_prefill_bytes", "peak_alloc_decode_bytes"],
    "quality": {"kl_vs_dense": 1e-3, "top1_agree": 0.02, "passkey_acc": 0.0, "ppl": 0.05},
    # Floors: growth allowed however narrow the rows' noise. A committed baseline judges other machines, where the
    # tiny model's millisecond CPU steps move by more than their own noise says (results/baselines/ci-cpu/README.md):
    # a ratio fails only beyond twice the baseline's.
    "ratio": {"decode_ms_p50": 1.0, "prefill_s": 1.0},
}
# Rows sharing these with a dense row are timed against it: the configuration but the cache.
_PEERS = [k for k in KEY if k not in ("system_kwargs", "cache", "cache_kwargs", "cache_budget", "label")]


def _key(row: pd.Series) -> tuple:
    return tuple(None if pd.isna(row[k]) else row[k] for k in KEY)


# A timing and the columns that describe its spread: a configuration measured in several rounds is judged on
# its fastest round's (the least disturbed measurement, as timeit takes the minimum of its repeats).
_TIMING_GROUPS = {
    "decode_ms_p50": [
        "decode_ms_p50_low",
        "decode_ms_p50_high",
        "decode_ms_p90",
        "decode_ms_mean",
        "decode_cv",
        "contention",
    ],
    "prefill_s": ["prefill_cv", "prefill_s_min"],
}


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: the most recently started (a folder may hold rows of older code). Where the
    folder holds several rounds of the same code (same git commit; `make regress` runs the smoke sweep in rounds),
    each timing and its spread come from the round where that timing was fastest."""
    if df.empty:
        return df
    df = df.sort_values("started_at", kind="stable").reset_index(drop=True)
    keys = df.apply(_key, axis=1)
    rows = []
    for _, group in df.groupby(keys, sort=False):
        row = group.iloc[-1].copy()
        same_code = group[group["git_commit"].astype(str) == str(row["git_commit"])]
        for lead, spread in _TIMING_GROUPS.items():
            timed = same_code[same_code[lead].notna()] if lead in same_code else same_code.iloc[:0]
            if len(timed) > 1:
                fastest = timed.loc[timed[lead].idxmin()]
                for col in [lead, *spread]:
                    if col in fastest.index:
                        row[col] = fastest[col]
        rows.append(row)
    return pd.DataFrame(rows)


def noise(row: pd.Series, column: str) -> float:
    """A timing's relative 95% half-width as the row recorded it (0 where it recorded none)."""
    if column == "decode_ms_p50" and pd.notna(row.get("decode_ms_p50_low")) and row["decode_ms_p50"] > 0:
        return float(row["decode_ms_p50_high"] - row["decode_ms_p50_low"]) / 2 / float(row["decode_ms_p50"])
    if column == "prefill_s" and pd.notna(row.get("prefill_cv")) and row["repeats"] > 1:
        return 2 * float(row["prefill_cv"]) / float(row["repeats"]) ** 0.5
    return 0.0


def ratios_to_dense(df: pd.DataFrame, column: str) -> dict[tuple, tuple[float, float, bool]]:
    """Row key -> (row[column] / the matching dense row's, the ratio's relative noise, whether either row was timed
    under heavy contention); ok rows with a dense peer only."""
    ok = df[df["status"] == "ok"]
    dense = {tuple(r[p] for p in _PEERS): r for _, r in ok[ok["cache"] == "dense"].iterrows()}
    out = {}
    for _, r in ok.iterrows():
        base = dense.get(tuple(r[p] for p in _PEERS))
        if base is None or pd.isna(base[column]) or pd.isna(r[column]) or base[column] <= 0:
            continue
        heavy = any(row.get("contention") == "heavy" for row in (r, base) if pd.notna(row.get("contention")))
        out[_key(r)] = (float(r[column]) / float(base[column]), noise(r, column) + noise(base, column), heavy)
    return out


def compare(
    current: pd.DataFrame, baseline: pd.DataFrame, tolerances: dict | None = None, unjudged: list | None = None
) -> list[dict]:
    """Every regression as a dict: config, column, baseline, current, rule. Timings that cannot be judged (heavy
    contention) are appended to `unjudged` as (config, column)."""
    tol = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    current, baseline = latest(current), latest(baseline)
    cur = {_key(r): r for _, r in current.iterrows()}
    problems = []

    def flag(key: tuple, column: str, was, now, rule: str) -> None:
        problems.append({"config": _describe(key), "column": column, "baseline": was, "current": now, "rule": rule})

    for _, b in baseline.iterrows():
        key = _key(b)
        c = cur.get(key)
        if c is None:
            flag(key, "(row)", "present", "missing", "every baseline configuration must be measured")
            continue
        if b["status"] == "ok" and c["status"] != "ok":
            flag(key, "status", "ok", f"{c['status']}: {c['error']}", "must stay ok")
            continue
        tracked = str(b["peak_alloc_source"]) == "tensor_tracker"
        for col in tol["exact"] + (tol["exact_tracked"] if tracked else []):
            if col in b and pd.notna(b[col]) and (pd.isna(c[col]) or int(c[col]) != int(b[col])):
                flag(key, col, int(b[col]), None if pd.isna(c[col]) else int(c[col]), "exact")
        for col, atol in tol["quality"].items():
            if col in b and pd.notna(b[col]) and (pd.isna(c[col]) or abs(float(c[col]) - float(b[col])) > atol):
                flag(key, col, float(b[col]), None if pd.isna(c[col]) else float(c[col]), f"within {atol}")
    for col, floor in tol["ratio"].items():
        was, now = ratios_to_dense(baseline, col), ratios_to_dense(current, col)
        for key, (r_was, n_was, heavy_was) in was.items():
            if key[KEY.index("cache")] == "dense" or key not in now:
                continue
            r_now, n_now, heavy_now = now[key]
            if heavy_was or heavy_now:
                if unjudged is not None:
                    unjudged.append((_describe(key), f"{col} / dense"))
                continue
            allowed = max(floor, n_was + n_now)
            if r_now > r_was * (1 + allowed):
                rule = f"ratio may grow {allowed:.0%} (floor {floor:.0%}, recorded noise {n_was + n_now:.0%})"
                flag(key, f"{col} / dense", round(r_was, 3), round(r_now, 3), rule)
    return problems


def _describe(key: tuple) -> str:
    d = dict(zip(KEY, key))
    extra = "" if d["cache_kwargs"] in (None, "{}") else f" {d['cache_kwargs']}"
    return f"{d['model']} {d['cache']}{extra} ctx={d['ctx']} batch={d['batch']} sdpa={d['sdpa_requested']}"


def format_table(problems: list[dict]) -> str:
    cols = ["config", "column", "baseline", "current", "rule"]
    rows = [[str(p[c]) for c in cols] for p in problems]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([line.format(*cols), line.format(*("-" * w for w in widths))] + [line.format(*r) for r in rows])
