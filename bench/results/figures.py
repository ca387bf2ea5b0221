"""Figures of result rows (`python -m bench.plot RESULTS_DIR` draws them all into PNG files).

Reads parquet rows only (pandas + matplotlib, no torch). Every figure function takes a DataFrame from
`bench.results.load` and returns a matplotlib Figure (None when the rows have nothing to show), so notebooks can
call them directly:

    memory_time_vs_ctx(df)   per model: peak memory, cache bytes and decode ms/step against ctx, a line per cache
    memory_breakdown(df)     per model: each cache's peak split into weights, cache bytes and transient, per ctx
    throughput_vs_batch(df)  decode tokens/s against batch, a line per cache and ctx
    backend_matrix(df)       which SDPA backend ran which phase: ok / unsupported / oom / error
    quality_vs_bytes(df)     each quality column against cache bytes, a marker per cache and budget, Pareto front
    task_accuracy(df, x)     the task suite's accuracy against cache bytes (x="bytes") or the fraction of the context
                             kept (x="kept"), a line per cache, a panel per protocol, dense as the ceiling
    systems_side_by_side(df) several systems (system=...): decode ms/step and peak memory / (weights + KV), per system
    peers_side_by_side(df)   one eviction policy in several libraries (tova in kvbench and kvpress): bytes held, peak,
                             decode ms/step and task accuracy, a bar per system

Another library's system (system=hf_static, ...) is a line of its own in every figure, labelled by its name (a press
by its library and name, kvpress/knorm); on the task figures it takes the colour of its kvbench peer, dashed.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bench.results.tables import cache_label, ctx_label

MIB = 2**20
STATUS_CODE = {"ok": 0, "unsupported": 1, "oom": 2, "error": 3}
STATUS_COLORS = ["#4caf50", "#ffb300", "#e53935", "#757575"]


def _backend_choice(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the systems that ran under more than one SDPA backend (another library's picks its own)."""
    return df[df.groupby("system")["sdpa_requested"].transform("nunique") > 1]


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that ran, labelled by cache (or system)."""
    df = df[df["status"] == "ok"].copy()
    df["cache_label"] = [cache_label(r) for _, r in df.iterrows()]
    return df


def _title(df: pd.DataFrame, what: str) -> str:
    devices = ", ".join(sorted(set(df["device_name"].dropna().astype(str)))) or "unknown device"
    models = ", ".join(sorted(set(df["model"].dropna().astype(str))))
    return f"{what}: {models} on {devices}"


def _log_if_wide(ax, values: pd.Series, axis: str = "y") -> None:
    """Log scale when the positive values span more than a decade."""
    v = values[values > 0]
    if len(v) and v.max() / v.min() > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        plain = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}")
        target = ax.yaxis if axis == "y" else ax.xaxis
        target.set_major_formatter(plain)
        target.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _ctx_axis(ax, ctxs) -> None:
    ctxs = sorted(set(int(c) for c in ctxs))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ctxs)
    ax.set_xticklabels([ctx_label(c) for c in ctxs])
    ax.set_xlabel("context length (tokens)")


def memory_time_vs_ctx(df: pd.DataFrame, model: str | None = None) -> plt.Figure | None:
    """Three panels against ctx for one model (the first, or `model`): peak memory, cache bytes, decode ms/step."""
    ok = _ok(df)
    ok = ok[ok["decode_ms_p50"].notna()]  # quality-only rows (repeats=0) have no timings
    if ok.empty:
        return None
    model = model or sorted(ok["model"].unique())[0]
    ok = ok[ok["model"] == model]
    batch = int(ok["batch"].min())
    ok = ok[ok["batch"] == batch]
    # One attention setting per line: the most common backend and chunk (a backend sweep is another figure).
    for col in ("sdpa_requested", "prefill_chunk"):
        common = ok[col].mode()
        ok = ok[ok[col] == common.iloc[0]] if len(common) else ok
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("peak_alloc_bytes", "peak memory (MiB)", MIB),
        ("cache_bytes", "cache bytes (MiB)", MIB),
        ("decode_ms_p50", "decode step, p50 (ms)", 1.0),
    ]
    for ax, (col, label, unit) in zip(axes, panels):
        for name, group in ok.groupby("cache_label"):
            group = group.groupby("ctx", as_index=False)[col].median().sort_values("ctx")
            ax.plot(group["ctx"], group[col] / unit, marker="o", label=name)
        _ctx_axis(ax, ok["ctx"])
        _log_if_wide(ax, ok[col] / unit)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    source = ok["peak_alloc_source"].dropna()
    if len(source) and (source == "tensor_tracker").all():
        axes[0].set_ylabel("peak live tensor memory (MiB)")
    axes[0].legend(title="cache")
    fig.suptitle(_title(ok, f"Memory and decode time against context (batch {batch})"))
    fig.tight_layout()
    return fig


def memory_breakdown(df: pd.DataFrame, model: str | None = None) -> plt.Figure | None:
    """Stacked bars, one per cache (or system) at each ctx, of one model at its smallest batch: weights, the caches'
    bytes, and the transient (the larger of the prefill's and the decode's peak beyond them), so that where a peak
    goes reads without arithmetic."""
    ok = _ok(df)
    ok = ok[ok["transient_prefill_bytes"].notna()]
    if ok.empty:
        return None
    model = model or sorted(ok["model"].unique())[0]
    ok = ok[ok["model"] == model]
    if ok.empty:  # this model's rows hold no peak split
        return None
    ok = ok[ok["batch"] == ok["batch"].min()]
    ok = ok.assign(transient=ok[["transient_prefill_bytes", "transient_decode_bytes"]].astype("float64").max(axis=1))
    labels = sorted(ok["cache_label"].unique())
    ctxs = sorted(int(c) for c in ok["ctx"].unique())
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(labels) * len(ctxs)), 4.5))
    width = 0.8 / len(labels)
    parts = [
        ("weights_bytes", "weights", "#9e9e9e"),
        ("cache_bytes", "cache bytes", "#1e88e5"),
        ("transient", "transient", "#fb8c00"),
    ]
    for i, label in enumerate(labels):
        rows = ok[ok["cache_label"] == label].groupby("ctx")[["weights_bytes", "cache_bytes", "transient"]].median()
        x = np.array([ctxs.index(int(c)) for c in rows.index]) + i * width
        bottom = np.zeros(len(rows))
        for col, name, color in parts:
            values = rows[col].astype("float64").to_numpy() / MIB
            ax.bar(x, values, width, bottom=bottom, color=color, edgecolor="white", label=name if i == 0 else None)
            bottom += values
        for xi, top in zip(x, bottom):
            ax.text(xi, top, label, rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(ctxs)) + 0.4 - width / 2, [ctx_label(c) for c in ctxs])
    ax.set_xlabel("context length (tokens)")
    source = "peak live tensor memory" if (ok["peak_alloc_source"] == "tensor_tracker").all() else "peak allocated"
    ax.set_ylabel(f"{source} (MiB)")
    ax.margins(y=0.25)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(_title(ok, "Where the peak goes"), fontsize=10)
    fig.tight_layout()
    return fig


def throughput_vs_batch(df: pd.DataFrame) -> plt.Figure | None:
    ok = _ok(df)
    if ok.empty or ok["batch"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, ctx), group in ok.groupby(["cache_label", "ctx"]):
        group = group.groupby("batch", as_index=False)["decode_tok_s"].median().sort_values("batch")
        ax.plot(group["batch"], group["decode_tok_s"], marker="o", label=f"{name}, ctx {ctx_label(int(ctx))}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ok["batch"].unique()))
    ax.set_xticklabels([str(b) for b in sorted(ok["batch"].unique())])
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("decode throughput (tokens/s)")
    _log_if_wide(ax, ok["decode_tok_s"])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(_title(ok, "Decode throughput against batch"))
    fig.tight_layout()
    return fig


def _failed_phase(error: str) -> str:
    """The phase an UnsupportedBackend message names."""
    text = str(error)
    if "T=1" in text or "unmasked" in text:
        return "decode"
    if "masked chunk" in text or "T<S" in text:
        return "chunked prefill"
    return "prefill"


def backend_phase_table(df: pd.DataFrame) -> pd.DataFrame:
    """sdpa backend x phase -> worst status seen (ok < unsupported < oom < error), with the kernel that ran."""
    phases = ["prefill", "chunked prefill", "decode"]
    cells: dict[tuple[str, str], tuple[int, str]] = {}

    def put(backend: str, phase: str, status: str, note: str) -> None:
        code = STATUS_CODE.get(status, 3)
        if (backend, phase) not in cells or code > cells[(backend, phase)][0]:
            cells[(backend, phase)] = (code, note)

    df = _backend_choice(df)
    for _, r in df.iterrows():
        backend = r["sdpa_requested"]
        prefill_phase = (
            "chunked prefill" if pd.notna(r["prefill_chunk"]) and r["prefill_chunk"] < r["ctx"] else "prefill"
        )
        if r["status"] == "ok":
            put(backend, prefill_phase, "ok", str(r["sdpa_used_prefill"]))
            put(backend, "decode", "ok", str(r["sdpa_used_decode"]))
        elif r["status"] == "unsupported":
            put(backend, _failed_phase(r["error"]), "unsupported", "no kernel")
        else:
            put(backend, prefill_phase, r["status"], f"at ctx {ctx_label(int(r['ctx']))}")
    backends = [b for b in ["auto", "flash", "efficient", "cudnn", "math", "eager"] if b in set(df["sdpa_requested"])]
    table = pd.DataFrame(index=backends, columns=phases, dtype=object)
    for (b, p), value in cells.items():
        table.loc[b, p] = value
    return table


def backend_matrix(df: pd.DataFrame) -> plt.Figure | None:
    df = _backend_choice(df)
    if df.empty or df["sdpa_requested"].nunique() < 2:
        return None
    table = backend_phase_table(df)
    codes = np.array([[np.nan if not isinstance(v, tuple) else v[0] for v in row] for row in table.values])
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(table) + 1.8))
    cmap = matplotlib.colors.ListedColormap(STATUS_COLORS)
    ax.imshow(np.ma.masked_invalid(codes), cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto")
    for i, row in enumerate(table.values):
        for j, v in enumerate(row):
            label = "not run" if not isinstance(v, tuple) else f"{list(STATUS_CODE)[v[0]]}\n{v[1]}"
            ax.text(j, i, label, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(table.columns)), table.columns)
    ax.set_yticks(range(len(table.index)), table.index)
    ax.set_xlabel("phase")
    ax.set_ylabel("SDPA backend requested")
    ax.set_title(_title(df, "Which attention kernel runs which phase"), fontsize=10)
    fig.tight_layout()
    return fig


QUALITY = {
    "kl_vs_dense": ("KL(dense || cache), nats/token", "low"),
    "top1_agree": ("top-1 agreement", "high"),
    "passkey_acc": ("pass-key accuracy", "high"),
    "task_acc": ("task suite accuracy", "high"),
    "ppl": ("perplexity", "low"),
}


def quality_vs_bytes(df: pd.DataFrame) -> plt.Figure | None:
    ok = _ok(df)
    cols = [c for c in QUALITY if c in ok and ok[c].notna().any()]
    if ok.empty or not cols:
        return None
    fig, axes = plt.subplots(1, len(cols), figsize=(5.5 * len(cols), 4.2), squeeze=False)
    for ax, col in zip(axes[0], cols):
        label, better = QUALITY[col]
        rows = ok[ok[col].notna()]
        rows = rows.assign(budget_label=[_budget_label(r) for _, r in rows.iterrows()])
        groups = list(rows.groupby("budget_label"))
        colors = plt.cm.tab20(np.linspace(0, 1, max(2, len(groups))))  # distinct colours beyond ten series
        for (name, group), color in zip(groups, colors):
            ax.scatter(group["cache_bytes"] / MIB, group[col], label=name, color=color)
        front = rows.sort_values("cache_bytes")
        best, xs, ys = None, [], []
        for _, r in front.iterrows():  # Pareto front: fewer bytes and better quality than everything to the left
            if best is None or (r[col] < best if better == "low" else r[col] > best):
                best = r[col]
                xs.append(r["cache_bytes"] / MIB)
                ys.append(r[col])
        ax.step(xs, ys, where="post", color="black", alpha=0.5, label="Pareto front")
        ax.set_xlabel("cache bytes (MiB)")
        ax.set_ylabel(label)
        _log_if_wide(ax, rows["cache_bytes"] / MIB, axis="x")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(ok, "Quality against cache memory"))
    fig.tight_layout()
    return fig


def _budget_label(r: pd.Series) -> str:
    return (
        f"{cache_label(r)} (all)" if r["cache"] == "dense" else f"{cache_label(r)} {r['cache_budget'] / r['ctx']:.0%}"
    )


def _own(rows: pd.DataFrame) -> pd.Series:
    """Rows of the system whose cache bears the policy's name (`label == peer`, or `peer+<decode mode>`)."""
    decode = rows["decode"].fillna("") if "decode" in rows else pd.Series("", index=rows.index)
    return (rows["label"] == rows["peer"]) | (rows["label"] == rows["peer"] + "+" + decode)


def task_accuracy(df: pd.DataFrame, x: str = "bytes", records: pd.DataFrame | None = None) -> plt.Figure | None:
    """The task suite's mean accuracy against cache bytes (MiB) or the fraction of the context kept, one line per cache
    (and system) through its budgets, one panel per protocol, dense's accuracy as a dashed line (the ceiling), its
    95% interval shaded. Another library's policy shares the colour of its kvbench peer, dashed with square markers
    (kvpress/knorm beside knorm). With the per-sample records (bench/results/records.py) every point carries its 95%
    interval as an error bar (bench/results/stats.py)."""
    from bench.results import stats

    ok = _ok(df)
    ok = ok[ok["task_acc"].notna()] if "task_acc" in ok else ok.iloc[:0]
    if ok.empty:
        return None
    ok["low"] = ok["high"] = np.nan
    if records is not None and len(records):
        for h, group in records.groupby("config_hash"):
            _, low, high, _ = stats.accuracy(group)
            ok.loc[ok["config_hash"] == h, ["low", "high"]] = [low, high]
    ok["kept"] = [1.0 if r["cache"] == "dense" else r["cache_budget"] / r["ctx"] for _, r in ok.iterrows()]
    ok["other"] = ~_own(ok)  # another library's implementation of a kvbench policy
    protocols = [p for p in ("aware", "agnostic", "multiturn") if p in set(ok["task_protocol"])]
    fig, axes = plt.subplots(1, len(protocols), figsize=(6 * len(protocols), 4.5), squeeze=False, sharey=True)
    others = ok[ok["cache_label"] != "dense"]  # every row but kvbench's float dense cache, the ceiling
    peers = sorted(set(others["peer"]))
    colors = dict(zip(peers, plt.cm.tab20(np.linspace(0, 1, max(2, len(peers))))))  # one colour per policy
    lines = others[["cache_label", "peer", "other"]].drop_duplicates().sort_values(["peer", "other"])
    for ax, protocol in zip(axes[0], protocols):
        rows = ok[ok["task_protocol"] == protocol]
        dense = rows[rows["cache_label"] == "dense"]
        if len(dense):
            ax.axhline(dense["task_acc"].mean(), color="black", linestyle="--", label="dense (every token)")
            if dense["low"].notna().any():
                ax.axhspan(dense["low"].mean(), dense["high"].mean(), color="black", alpha=0.08)
        for label, peer, other in lines.itertuples(index=False):
            group = rows[rows["cache_label"] == label].sort_values("kept")
            xs = group["cache_bytes"] / MIB if x == "bytes" else group["kept"]
            style = dict(marker="s", linestyle="--", markerfacecolor="none") if other else dict(marker="o")
            ax.plot(xs, group["task_acc"], label=label, color=colors[peer], **style)
            if group["low"].notna().any():
                below, above = group["task_acc"] - group["low"], group["high"] - group["task_acc"]
                ax.errorbar(xs, group["task_acc"], yerr=[below, above], fmt="none", ecolor=colors[peer], capsize=2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache bytes (MiB)" if x == "bytes" else "fraction of the context kept")
        ax.set_title(f"protocol: {protocol}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("task suite accuracy (mean over tasks)")
    axes[0][0].set_ylim(-0.05, 1.05)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(_title(ok, "Which cache keeps what the tasks need"), fontsize=10 if len(protocols) == 1 else 12)
    fig.tight_layout()
    return fig


def peers_side_by_side(df: pd.DataFrame) -> plt.Figure | None:
    """Each eviction policy that more than one system ran at a budget (kvbench's tova and kvpress's tova, last_recent
    and kvpress's streaming_llm): a bar per system of cache bytes held, peak memory, decode ms/step, and the task
    suite's accuracy where it ran."""
    ok = _ok(df)
    ok = ok[ok["cache"] != "dense"].copy()
    if ok.empty:
        return None
    ok["fraction"] = ok["cache_budget"] / ok["ctx"]
    ok["protocol"] = ok["task_protocol"].fillna("")
    # a bar per system, and per decode mode where a system ran another than its own (`knorm+append`)
    ok["series"] = ok["system"] + ok["label"].str.extract(r"(\+\w+)$")[0].fillna("")
    case_key = ["peer", "fraction", "model", "ctx", "batch", "protocol"]
    shared = ok.groupby(case_key)["series"].transform("nunique") > 1
    ok = ok[shared]
    if ok.empty:
        return None
    cases = sorted(set(ok[case_key].itertuples(index=False, name=None)), key=lambda c: (-c[1], *c[2:], c[0]))
    reference = set(ok[_own(ok)]["series"])  # the system whose cache is the policy's name: first
    systems = sorted(set(ok["series"]), key=lambda s: (s not in reference, s))
    panels = [("cache_bytes", "cache bytes held (MiB)", MIB), ("peak_alloc_bytes", "peak memory (MiB)", MIB)]
    panels.append(("decode_ms_p50", "decode ms/step (p50)", 1))
    if ok["task_acc"].notna().any():
        panels.append(("task_acc", "task suite accuracy", 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        rows = ok[ok["series"] == system].drop_duplicates(case_key, keep="last").set_index(case_key)
        for ax, (col, _, scale) in zip(axes[0], panels):
            values = [rows[col].astype("float64").get(case, np.nan) / scale for case in cases]  # NA: not measured
            ax.bar(np.arange(len(cases)) + i * width, values, width, label=system)
    names = ok.drop_duplicates([*case_key, "series"]).groupby(case_key)["method"]
    varies = [k for k in ("model", "ctx", "batch", "protocol") if ok[k].nunique() > 1]  # said in the label

    def label(case: tuple) -> str:
        where = dict(zip(case_key, case))
        extra = "".join(f", {k} {ctx_label(int(where[k])) if k == 'ctx' else where[k]}" for k in varies)
        return " / ".join(dict.fromkeys(names.get_group(case))) + f"\n{case[1]:.0%}{extra}"

    labels = [label(case) for case in cases]
    for ax, (_, ylabel, _) in zip(axes[0], panels):
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(_title(ok, "The same policy, each library's implementation"))
    fig.tight_layout()
    return fig


def systems_side_by_side(df: pd.DataFrame) -> plt.Figure | None:
    """Several systems with a dense cache: for each (ctx, batch), a bar per system of decode ms/step and of peak
    memory over weights + dense KV (torch's allocated peak on CUDA, the exact tracked tensor peak on CPU)."""
    df = df[(df["status"] == "ok") & (df["cache"] == "dense")].copy()
    if df["system"].nunique() < 2:
        return None
    cases = sorted({(int(c), int(b)) for c, b in zip(df["ctx"], df["batch"])})
    reference = set(df[df["label"] == df["peer"]]["system"])  # kvbench's own dense cache first
    systems = sorted(set(df["system"]), key=lambda s: (s not in reference, s))
    cuda = df["device_kind"] == "cuda"
    df["peak_ratio"] = df["peak_alloc_bytes"].astype("float64") / (df["weights_bytes"] + df["kv_bytes_dense"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        rows = df[df["system"] == system].drop_duplicates(["ctx", "batch"], keep="last").set_index(["ctx", "batch"])
        for ax, col in zip(axes, ["decode_ms_p50", "peak_ratio"]):
            values = [rows[col].astype("float64").get(case, np.nan) for case in cases]  # NA: not timed
            ax.bar(np.arange(len(cases)) + i * width, values, width, label=system)
    labels = [f"ctx {ctx_label(c)}, batch {b}" for c, b in cases]
    memory = "peak allocated" if cuda.all() else "peak tensor bytes" if not cuda.any() else "peak (allocated | tensors)"
    for ax, ylabel in zip(axes, ["decode ms/step (p50)", f"{memory} / (weights + KV)"]):
        ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
        ax.set_xticklabels(labels)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(_title(df, "kvbench and HF transformers"))
    fig.tight_layout()
    return fig


def capacity_figure(found: list[dict], find: str = "ctx") -> plt.Figure:
    """bench.capacity's result: the longest context (or largest batch) fitting against the memory budget, a line per
    cache (and batch); an open marker where the search stopped at its maximum (it fits further)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in sorted({f["label"] for f in found}):
        points = sorted((f["memory"] / MIB, f[find], f["at_max"]) for f in found if f["label"] == label)
        line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)[0]
        capped = [p for p in points if p[2]]
        if capped:
            ax.scatter(
                [p[0] for p in capped], [p[1] for p in capped], s=90, facecolors="none", edgecolors=line.get_color()
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    budgets = sorted({f["memory"] / MIB for f in found})
    ax.set_xticks(budgets, [f"{b:g}" if b < 1024 else f"{b / 1024:g} GiB" for b in budgets])
    values = sorted({f[find] for f in found if f[find] > 0})
    if find == "ctx":
        ax.set_yticks(values, [ctx_label(int(v)) for v in values], fontsize=7)
    ax.set_xlabel("memory budget (MiB)")
    ax.set_ylabel("longest context fitting (tokens)" if find == "ctx" else "largest batch fitting")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("What fits in a memory budget (measured peaks)", fontsize=10)
    fig.tight_layout()
    return fig


def save_all(df: pd.DataFrame, out: str | Path, records: pd.DataFrame | None = None) -> list[Path]:
    """Every figure the rows allow, as PNG files in `out` (accuracies with error bars where `records` has the
    per-sample answers); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    timed = _ok(df)
    models = sorted(timed[timed["decode_ms_p50"].notna()]["model"].unique())
    figures = [(f"memory_time_vs_ctx_{m}", memory_time_vs_ctx(df, m)) for m in models]
    figures += [(f"memory_breakdown_{m}", memory_breakdown(df, m)) for m in models]
    figures += [
        ("throughput_vs_batch", throughput_vs_batch(df)),
        ("backend_matrix", backend_matrix(df)),
        ("quality_vs_bytes", quality_vs_bytes(df)),
        ("task_accuracy_vs_bytes", task_accuracy(df, "bytes", records)),
        ("task_accuracy_vs_kept", task_accuracy(df, "kept", records)),
        ("systems_side_by_side", systems_side_by_side(df)),
        ("peers_side_by_side", peers_side_by_side(df)),
    ]
    for name, fig in figures:
        if fig is not None:
            path = out / f"{name}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
