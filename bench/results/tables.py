"""What a person at a terminal sees: one line per job, the comparison table, the quality table and the leaderboard.
Reads rows only (pandas), no torch."""

from __future__ import annotations

import math

import pandas as pd


def human_bytes(n) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)) or n is pd.NA:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt(value, spec: str) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def ctx_label(ctx: int) -> str:
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)


def cache_label(row) -> str:
    """How tables and figures name a row: its `label` column, which its system's class wrote (`h2o/int8`,
    `hf_static`, `kvpress/knorm`, `hf_quantized/int4`)."""
    return str(row["label"])


def summary_line(row: dict, skipped: bool = False) -> str:
    ctx = ctx_label(int(row["ctx"]))
    head = f"{row['model']} {cache_label(row)} ctx={ctx} batch={row['batch']} sdpa={row['sdpa_requested']}"
    if skipped:
        return f"[skip] {head}: already in the sweep folder (config {row['config_hash']}; force=true reruns it)"
    if row.get("status") != "ok":
        return f"[{row.get('status')}] {head}: {row.get('error')}"
    peak = row.get("peak_alloc_bytes")
    src = "tensors" if row.get("peak_alloc_source") == "tensor_tracker" else "allocated"
    quality = [
        f"{k} {row[k]:.3g}"
        for k in ("kl_vs_dense", "top1_agree", "task_acc", "ppl")
        if row.get(k) is not None and not pd.isna(row.get(k))
    ]
    if row.get("prefill_s") is None or pd.isna(row.get("prefill_s")):  # repeats=0: a quality-only row
        return f"[ok] {head}: quality only | cache {human_bytes(row.get('cache_bytes'))} | " + ", ".join(quality)
    return (
        f"[ok] {head} ({row.get('sdpa_used')}): prefill {_fmt(row.get('prefill_s'), '.3f')} s | decode "
        f"{step_text(row)} ms/step p50, {_fmt(row.get('decode_tok_s'), '.1f')} tok/s | "
        f"peak {human_bytes(peak)} ({src}) | cache {human_bytes(row.get('cache_bytes'))}"
        + (" | " + ", ".join(quality) if quality else "")
        + contention_text(row)
    )


def _known(value) -> bool:
    return value is not None and value is not pd.NA and not (isinstance(value, float) and math.isnan(value))


def step_text(row) -> str:
    """The p50 decode step, with its 95% interval's half-width where that is over 5% of it."""
    p50, low, high = (row.get(k) for k in ("decode_ms_p50", "decode_ms_p50_low", "decode_ms_p50_high"))
    if not _known(p50):
        return "-"
    if _known(low) and _known(high) and (high - low) / 2 > 0.05 * p50:
        return f"{p50:.2f} ±{(high - low) / 2:.2f}"
    return f"{p50:.2f}"


def contention_text(row) -> str:
    """' | contention heavy: ...' when the machine was not quiet while timing (empty when it was)."""
    level = row.get("contention")
    if not _known(level) or level == "none":
        return ""
    parts = [f"others used {row['others_cpu']:.1f} of {row['cores']} cores"] if _known(row.get("others_cpu")) else []
    if row.get("oversubscribed") is True:
        parts.append(f"threads oversubscribed ({row.get('threads')} + others > {row.get('cores')})")
    if _known(row.get("gpu_others")) and row["gpu_others"]:
        parts.append(f"{row['gpu_others']} other processes on the GPU")
    return f" | contention {level}: " + ", ".join(parts)


def aligned(header: list[str], lines: list[list[str]], left: int) -> str:
    """A plain-text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(str(line[i])) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < left else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    return "\n".join(out + [fmt.format(*line) for line in lines])


def markdown(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---"] * len(header), *lines]
    return "\n".join("| " + " | ".join(str(x) for x in row) + " |" for row in rows)


TABLE_COLUMNS = [
    "model",
    "cache",
    "ctx",
    "batch",
    "sdpa",
    "status",
    "prefill s",
    "decode tok/s",
    "ms/step p50",
    "peak alloc",
    "peak rss/nvml",
    "cache bytes",
    "vs dense KV",
    "contention",
]


def comparison_table(df: pd.DataFrame) -> str:
    """cache x ctx (and any other axis that varies): prefill s, decode tok/s, peak memory, cache bytes, status."""
    if df.empty:
        return "(no rows)"
    df = df.sort_values(["model", "batch", "ctx", "cache", "sdpa_requested"], kind="stable")
    lines = []
    for _, r in df.iterrows():
        peak_other = r["peak_nvml_bytes"] if r["device_kind"] == "cuda" else r["peak_rss_bytes"]
        ratio = (
            f"{r['cache_bytes'] / r['kv_bytes_dense']:.2f}x"
            if pd.notna(r["cache_bytes"]) and pd.notna(r["kv_bytes_dense"]) and r["kv_bytes_dense"]
            else "-"
        )
        sdpa = str(r["sdpa_used"] if pd.notna(r["sdpa_used"]) else r["sdpa_requested"])
        lines.append(
            [
                r["model"],
                cache_label(r),
                ctx_label(int(r["ctx"])),
                str(r["batch"]),
                sdpa,
                r["status"],
                _fmt(r["prefill_s"], ".3f"),
                _fmt(r["decode_tok_s"], ".1f"),
                step_text(r),
                human_bytes(r["peak_alloc_bytes"]),
                human_bytes(peak_other),
                human_bytes(r["cache_bytes"]),
                ratio,
                r["contention"] if _known(r["contention"]) else "-",
            ]
        )
    return aligned(TABLE_COLUMNS, lines, 6)


def quality_table(df: pd.DataFrame) -> str:
    """cache x budget x ctx: quality columns beside cache bytes (rows that have fidelity or perplexity figures)."""
    cols = ["kl_vs_dense", "top1_agree", "ppl"]
    df = df[df[cols].notna().any(axis=1)]
    if df.empty:
        return ""
    df = df.sort_values(["ctx", "cache", "cache_budget"], kind="stable")
    header = ["cache", "budget", "ctx", "kl_vs_dense", "top1_agree", "ppl", "cache bytes"]
    lines = [
        [
            cache_label(r),
            budget_label(r),
            ctx_label(int(r["ctx"])),
            _fmt(r["kl_vs_dense"], ".4f"),
            _fmt(r["top1_agree"], ".3f"),
            _fmt(r["ppl"], ".2f"),
            human_bytes(r["cache_bytes"]),
        ]
        for _, r in df.iterrows()
    ]
    return aligned(header, lines, 3)


def budget_label(r) -> str:
    """The budget as a fraction of the context ("all" for a cache that keeps every token)."""
    return "all" if r["cache"] == "dense" else f"{r['cache_budget'] / r['ctx']:.1%}".replace(".0%", "%")


def leaderboard(df: pd.DataFrame) -> str:
    """Markdown: method x system x budget, the task suite's mean accuracy per protocol beside cost (cache bytes after
    the prefill where rows have them and after decoding, peak memory, decode step), best first within each budget;
    then each task's accuracy. Empty when no row has task scores."""
    from bench.eval.protocols import PROTOCOLS
    from bench.eval.tasks import TASKS

    df = df[(df["status"] == "ok") & df["task_acc"].notna()].copy()
    if df.empty:
        return ""
    df["budget"] = [budget_label(r) for _, r in df.iterrows()]
    df["fraction"] = [1.0 if r["cache"] == "dense" else r["cache_budget"] / r["ctx"] for _, r in df.iterrows()]
    protocols = [p for p in PROTOCOLS if p in set(df["task_protocol"])]
    tasks = [t for t in TASKS if f"acc_{t}" in df and df[f"acc_{t}"].notna().any()]
    after_prefill = "cache_bytes_prefill" in df and df["cache_bytes_prefill"].notna().any()
    header = ["method", "system", "budget", *protocols, *(["after prefill"] if after_prefill else []), "cache bytes"]
    header += ["peak memory", "decode ms/step"]
    lines, detail = [], []
    groups = df.groupby(["method", "system", "budget", "fraction"], sort=False)
    order = sorted(groups, key=lambda g: (-g[0][3], -g[1]["task_acc"].mean(), g[0][0], g[0][1]))
    for (method, system, budget, _), group in order:
        by_protocol = group.set_index("task_protocol")
        accs = [_fmt(by_protocol["task_acc"].get(p), ".2f") for p in protocols]
        first = group.iloc[0]
        lines.append(
            [
                method,
                system,
                budget,
                *accs,
                *([human_bytes(first["cache_bytes_prefill"])] if after_prefill else []),
                human_bytes(first["cache_bytes"]),
                human_bytes(first["peak_alloc_bytes"]),
                _fmt(group["decode_ms_p50"].median(), ".2f"),
            ]
        )
        for _, r in group.iterrows():
            detail.append([method, system, budget, r["task_protocol"], *(_fmt(r[f"acc_{t}"], ".2f") for t in tasks)])
    models = ", ".join(sorted(set(df["model"].astype(str))))
    ctxs = ", ".join(ctx_label(int(c)) for c in sorted(set(df["ctx"])))
    samples = ", ".join(str(int(x)) for x in sorted(set(df["task_samples"].dropna())))
    head = (
        f"Task suite, mean accuracy (RULER's string_match_all) per protocol: {models}, ctx {ctxs}, {samples} "
        f"samples per task; tasks: {', '.join(tasks)}."
    )
    per_task = markdown(["method", "system", "budget", "protocol", *tasks], detail)
    return "\n\n".join([head, markdown(header, lines), per_task])


def ranked_leaderboard(df: pd.DataFrame, records: pd.DataFrame) -> str:
    """Markdown from the per-sample records: per protocol and budget, each configuration's accuracy (mean over tasks)
    with its 95% interval, whether a paired sign test separates it from the budget's best and from dense, and its
    cost; then each task's accuracy with its Wilson interval. Empty when there are no records."""
    from bench.results import stats

    ok = df[df["status"] == "ok"]
    records = records[records["config_hash"].isin(set(ok["config_hash"]))]
    if records.empty:
        return ""
    ranking = stats.rank(records)
    cost = ok.set_index("config_hash")
    # several models or contexts: each line says which (each is ranked apart: other samples)
    where = [c for c in ("model", "ctx") if ranking[c].nunique() > 1]
    header = [*where, "protocol", "budget", "method", "system", "accuracy [95% CI]", "vs best", "vs dense (W-L, p)"]
    header += ["cache bytes", "peak memory", "decode ms/step"]
    lines = []
    for r in ranking.itertuples(index=False):
        row = cost.loc[r.config_hash]
        vs_best = "best" if r.best_p == 1.0 and r.tied_best else ("tied" if r.tied_best else f"below, p={r.best_p:.3f}")
        vs_dense = "-" if pd.isna(getattr(r, "dense_p", float("nan"))) else f"{r.vs_dense}, p={r.dense_p:.3f}"
        if vs_dense != "-" and not r.tied_dense:
            vs_dense = f"**{vs_dense}**"
        lines.append(
            [
                *(ctx_label(r.ctx) if c == "ctx" else r.model for c in where),
                r.protocol,
                "all" if r.kept == 1.0 and row["cache"] == "dense" else f"{r.kept:.1%}".replace(".0%", "%"),
                r.method,
                r.system,
                f"{r.accuracy:.2f} [{r.low:.2f}, {r.high:.2f}]",
                vs_best,
                vs_dense,
                human_bytes(row["cache_bytes"]),
                human_bytes(row["peak_alloc_bytes"]),
                _fmt(row["decode_ms_p50"], ".2f"),
            ]
        )
    tasks = sorted(set(records["task"]))
    detail = []
    for r in ranking.itertuples(index=False):
        mine = records[records["config_hash"] == r.config_hash]
        cells = []
        for task in tasks:
            scores = mine[mine["task"] == task]["score"].to_numpy(float)
            if len(scores) == 0:
                cells.append("-")
                continue
            low, high = stats.interval({task: scores})
            cells.append(f"{scores.mean():.2f} [{low:.2f}, {high:.2f}]")
        detail.append(lines[len(detail)][: len(where) + 4] + cells)
    n = records.groupby(["config_hash", "task"]).size()
    models = ", ".join(sorted(set(ok["model"].astype(str))))
    ctxs = ", ".join(ctx_label(int(c)) for c in sorted(set(records["ctx"])))
    head = (
        f"Task suite, mean accuracy over tasks (RULER's string_match_all) from {len(records)} kept answers: {models}, "
        f"ctx {ctxs}, {int(n.min())}-{int(n.max())} answers per task and configuration; tasks: {', '.join(tasks)}. "
        "Intervals: 95%, Wilson for a task's 0/1 scores, a bootstrap over samples for means over tasks. `vs best`: "
        f"the exact sign test (McNemar on 0/1 scores) on the same answers against the budget's most accurate "
        f"configuration, tied where p >= {stats.ALPHA}; `vs dense`: answers it got better-worse than dense and the "
        "test's p, in bold where the difference is significant."
        + (" Each model and context is ranked apart (its own samples)." if where else "")
    )
    per_task = markdown([*where, "protocol", "budget", "method", "system", *tasks], detail)
    parts = [head, markdown(header, lines), per_task]
    pairs = stats.implementations(records)
    if not pairs.empty:
        rows = [
            [
                r.protocol,
                f"{r.kept:.1%}".replace(".0%", "%"),
                r.policy,
                r.label,
                f"{r.accuracy:.2f}",
                f"{r.reference:.2f}",
            ]
            + [r.wins_losses, f"**{r.p:.3f}**" if r.p < stats.ALPHA else f"{r.p:.3f}"]
            for r in pairs.sort_values(["protocol", "kept", "policy"], ascending=[True, False, True]).itertuples()
        ]
        parts.append(
            "One policy, two implementations, on the same samples: the other system's accuracy, the reference's (the "
            "system whose cache bears the policy's name), and the sign test on their answers (W-L: the other's "
            "better-worse answers; bold where p < 0.05)."
        )
        parts.append(markdown(["protocol", "budget", "policy", "system", "accuracy", "reference", "W-L", "p"], rows))
    return "\n\n".join(parts)
