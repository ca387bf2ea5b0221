"""What a person at a terminal sees: one line per job and, after a multirun, a comparison table.
Reads rows only (pandas), no torch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - the table is also usable without hydra
    Callback = object


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
    """`h2o`, or `h2o/int8` when the cache runs on a quantized buffer; another library's system by its name
    (`hf_static`)."""
    system = row.get("system") if hasattr(row, "get") else None
    if isinstance(system, str) and system != "kvbench":
        return system
    try:
        kwargs = json.loads(row["cache_kwargs"]) if isinstance(row["cache_kwargs"], str) else {}
    except (KeyError, ValueError):
        kwargs = {}
    buffer = kwargs.get("buffer", "float")
    return row["cache"] if buffer == "float" else f"{row['cache']}/{buffer}"


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
        for k in ("kl_vs_dense", "top1_agree", "passkey_acc", "ppl")
        if row.get(k) is not None and not pd.isna(row.get(k))
    ]
    if row.get("prefill_s") is None or pd.isna(row.get("prefill_s")):  # repeats=0: a quality-only row
        return f"[ok] {head}: quality only | cache {human_bytes(row.get('cache_bytes'))} | " + ", ".join(quality)
    return (
        f"[ok] {head} ({row.get('sdpa_used')}): prefill {_fmt(row.get('prefill_s'), '.3f')} s | decode "
        f"{_fmt(row.get('decode_ms_p50'), '.2f')} ms/step p50, {_fmt(row.get('decode_tok_s'), '.1f')} tok/s | "
        f"peak {human_bytes(peak)} ({src}) | cache {human_bytes(row.get('cache_bytes'))}"
        + (" | " + ", ".join(quality) if quality else "")
    )


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
                _fmt(r["decode_ms_p50"], ".2f"),
                human_bytes(r["peak_alloc_bytes"]),
                human_bytes(peak_other),
                human_bytes(r["cache_bytes"]),
                ratio,
            ]
        )
    widths = [max(len(h), *(len(str(line[i])) for line in lines)) for i, h in enumerate(TABLE_COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 6 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*TABLE_COLUMNS), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def quality_table(df: pd.DataFrame) -> str:
    """cache x budget x ctx: quality columns beside cache bytes (rows that have any quality figure)."""
    cols = ["kl_vs_dense", "top1_agree", "passkey_acc", "ppl"]
    df = df[df[cols].notna().any(axis=1)]
    if df.empty:
        return ""
    df = df.sort_values(["ctx", "cache", "cache_budget"], kind="stable")
    header = ["cache", "budget", "ctx", "kl_vs_dense", "top1_agree", "passkey_acc", "ppl", "cache bytes"]
    lines = []
    for _, r in df.iterrows():
        budget = "all" if r["cache"] == "dense" else f"{r['cache_budget'] / r['ctx']:.0%}"
        lines.append(
            [
                cache_label(r),
                budget,
                ctx_label(int(r["ctx"])),
                _fmt(r["kl_vs_dense"], ".4f"),
                _fmt(r["top1_agree"], ".3f"),
                _fmt(r["passkey_acc"], ".2f"),
                _fmt(r["ppl"], ".2f"),
                human_bytes(r["cache_bytes"]),
            ]
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines])


# Config hashes of the jobs this process ran or skipped, by sweep folder (filled by bench.run).
TOUCHED: dict[str, set[str]] = {}


class SweepSummary(Callback):
    """Hydra callback: after a multirun, print the comparison table of the jobs it ran (or skipped)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from bench.results import load

        sweep_dir = str(Path(config.results_dir) / config.sweep)
        df = load(sweep_dir)
        hashes = TOUCHED.get(sweep_dir)
        if hashes:
            df = df[df["config_hash"].isin(hashes)]
        print(f"\n{len(df)} rows in {sweep_dir}/\n{comparison_table(df)}", flush=True)
        quality = quality_table(df)
        if quality:
            print(f"\nquality:\n{quality}", flush=True)
