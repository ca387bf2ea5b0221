"""Figures, the notebook and the regression check, on the committed baselines."""

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.results import compare, figures, rows, tables
from bench.results.schema import COLUMNS, SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[1]
CI_BASELINE = ROOT / "results" / "baselines" / "ci-cpu"
H200 = ROOT / "results" / "baselines" / "h200"


def regress_cli(current: Path, baseline: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.regress", str(current), "--baseline", str(baseline), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _doctored(tmp_path: Path, edit) -> Path:
    """A copy of the CI baseline with `edit(df)` applied."""
    df = rows.load(CI_BASELINE)
    edit(df)
    out = tmp_path / "doctored"
    for row in df.to_dict("records"):
        rows.write_row(out, row)
    return out


def test_untouched_baseline_passes():
    proc = regress_cli(CI_BASELINE, CI_BASELINE)
    assert proc.returncode == 0 and "no regression: 6 baseline configurations" in proc.stdout, proc.stdout + proc.stderr


def test_cache_bytes_10_percent_lower_in_baseline_fails(tmp_path):
    def edit(df):
        df.loc[df["cache"] == "h2o", "cache_bytes"] = (df.loc[df["cache"] == "h2o", "cache_bytes"] * 0.9).round()

    proc = regress_cli(CI_BASELINE, _doctored(tmp_path, edit))
    assert proc.returncode == 1
    assert "cache_bytes" in proc.stdout and "h2o" in proc.stdout and "exact" in proc.stdout


def test_decode_ratio_3x_better_in_baseline_fails(tmp_path):
    def edit(df):  # the baseline's h2o decoded three times as fast relative to dense
        df.loc[df["cache"] == "h2o", ["decode_ms_p50", "decode_ms_p50_low", "decode_ms_p50_high"]] /= 3

    proc = regress_cli(CI_BASELINE, _doctored(tmp_path, edit))
    assert proc.returncode == 1 and "decode_ms_p50 / dense" in proc.stdout, proc.stdout


def test_absolute_times_are_not_compared(tmp_path):
    def edit(df):  # a machine twice as fast: every time halved, ratios unchanged
        df["decode_ms_p50"] /= 2
        df["prefill_s"] /= 2

    assert regress_cli(CI_BASELINE, _doctored(tmp_path, edit)).returncode == 0


def test_missing_rows_and_status_changes_fail(tmp_path):
    current = tmp_path / "current"
    shutil.copytree(CI_BASELINE, current)
    df = rows.load(current)
    row = df[df["cache"] == "last_recent"].iloc[0].to_dict()
    for round_row in current.rglob(f"{row['config_hash']}.parquet"):  # the configuration, from every round
        round_row.unlink()
    broken = df[df["cache"] == "h2o"].iloc[0].to_dict()
    rows.write_row(current, {**broken, "status": "oom", "error": "OutOfMemoryError", "started_at": "2999-01-01"})
    problems = compare.compare(rows.load(current), rows.load(CI_BASELINE))
    kinds = {(p["column"], p["current"].split(":")[0] if isinstance(p["current"], str) else None) for p in problems}
    assert ("(row)", "missing") in kinds and ("status", "oom") in kinds


def test_tolerances_file(tmp_path):
    def edit(df):
        df.loc[df["cache"] == "h2o", ["decode_ms_p50", "decode_ms_p50_low", "decode_ms_p50_high"]] /= 3

    loose = tmp_path / "tol.json"
    loose.write_text('{"ratio": {"decode_ms_p50": 5.0, "prefill_s": 5.0}}')
    assert regress_cli(CI_BASELINE, _doctored(tmp_path, edit), "--tolerances", str(loose)).returncode == 0


def test_bad_paths_exit_2(tmp_path):
    assert regress_cli(tmp_path / "nope", CI_BASELINE).returncode == 2


def test_figures_from_the_baselines(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.plot", str(H200), "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == [
        "backend_matrix.png",
        "memory_time_vs_ctx_llama-3.2-1b.png",
        "systems_side_by_side.png",
        "throughput_vs_batch.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in tmp_path.glob("*.png"))


def test_every_committed_baseline_loads_as_the_current_schema():
    """Every committed row, of every folder, reads as the current schema: its version, its columns and nothing else,
    the labels its system's class gives it (the figures of these folders are drawn by the tests below and above)."""
    df = rows.load(ROOT / "results" / "baselines")
    assert len(df) > 300 and (df["schema_version"] == SCHEMA_VERSION).all()
    assert list(df.columns) == list(COLUMNS) and df["label"].notna().all() and df["system"].notna().all()


def test_figure_axes_have_units_and_titles_name_device():
    fig = figures.memory_time_vs_ctx(rows.load(H200 / "caches"))
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == ["peak memory (MiB)", "cache bytes (MiB)", "decode step, p50 (ms)"]
    assert "NVIDIA H200" in fig._suptitle.get_text() and "llama-3.2-1b" in fig._suptitle.get_text()
    assert fig.axes[1].get_yscale() == "log"  # cache bytes span more than a decade


def test_backend_phase_table_names_what_ran():
    table = figures.backend_phase_table(rows.load(H200 / "backend_matrix"))
    assert table.loc["flash", "chunked prefill"][1] == "no kernel"
    assert table.loc["efficient", "decode"][1] == "no kernel"
    assert table.loc["auto", "decode"] == (0, "flash")


def test_quality_figure_appears_only_with_quality_columns():
    df = rows.load(CI_BASELINE)
    assert figures.quality_vs_bytes(df) is None
    df["kl_vs_dense"] = pd.Series([0.0, 0.1, 0.2, 0.0, 0.05, 0.3], dtype="float64")
    assert figures.quality_vs_bytes(df) is not None


@pytest.mark.slow
def test_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "compare_caches.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4


def test_the_newest_row_of_a_configuration_is_compared(tmp_path):
    """A results folder holding a rerun (say, after a change of the config hash) is judged by its newest row."""
    base = rows.load(CI_BASELINE)
    row = base[base["cache"] == "h2o"].iloc[0].to_dict()
    stale = {**row, "config_hash": "stale", "started_at": "2000-01-01T00:00:00+00:00", "cache_bytes": 1}
    current = tmp_path / "current"
    shutil.copytree(CI_BASELINE, current)
    rows.write_row(current, stale)  # an old, wrong row for the same configuration
    assert compare.compare(rows.load(current), base) == []
    newest = {**row, "config_hash": "newer", "started_at": "2999-01-01T00:00:00+00:00", "cache_bytes": 1}
    rows.write_row(current, newest)
    assert [p["column"] for p in compare.compare(rows.load(current), base)] == ["cache_bytes"]


def test_each_timing_is_judged_on_its_fastest_round(tmp_path):
    """`make regress` measures in rounds: a round disturbed by another process does not decide, unless it is the
    only round of the newest code."""
    base = rows.load(CI_BASELINE)
    row = base[base["cache"] == "h2o"].iloc[0].to_dict()
    current = tmp_path / "current"
    shutil.copytree(CI_BASELINE, current)
    slow = {"decode_ms_p50": row["decode_ms_p50"] * 3, "decode_ms_p50_low": row["decode_ms_p50_low"] * 3}
    slow["decode_ms_p50_high"] = row["decode_ms_p50_high"] * 3
    disturbed = {**row, **slow, "config_hash": "round9", "started_at": "2999-01-01T00:00:00+00:00"}
    rows.write_row(current / "round9", disturbed)
    assert compare.compare(rows.load(current), base) == []
    rows.write_row(current / "round9", {**disturbed, "git_commit": "newer code"})
    flagged = compare.compare(rows.load(current), base)
    assert [p["column"] for p in flagged] == ["decode_ms_p50 / dense"] and "h2o" in flagged[0]["config"]


def test_the_committed_leaderboard_draws_a_line_per_cache():
    """Twelve caches, more than a ten-colour cycle: each gets its own line and colour in each protocol's panel."""
    df = rows.load(ROOT / "results" / "baselines" / "leaderboard-cpu")
    fig = figures.task_accuracy(df)
    caches = set(df["cache"]) - {"dense"}
    for ax in fig.axes:
        lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("dense")]
        assert len(lines) == len(caches) >= 11
        assert len({tuple(ln.get_color()) for ln in lines}) == len(lines)


def test_the_committed_peers_stand_side_by_side():
    """kvbench's caches and kvpress's presses of the same policy at the same budget: the leaderboard names each row's
    system, the peers figure puts their bars next to each other (streaming_llm beside last_recent), and on the
    accuracy figure a press takes its peer's colour, dashed."""
    df = rows.load(ROOT / "results" / "baselines" / "peers-cpu")
    board = tables.leaderboard(df)
    header = board.split("\n\n")[1].splitlines()[0]
    assert header.startswith("| method | system | budget |")
    for method, system in [
        ("tova", "kvbench"),
        ("tova", "kvpress"),
        ("streaming_llm", "kvpress"),
        ("dense", "hf_dynamic"),
    ]:
        assert f"| {method} | {system} |" in board, (method, system)
    fig = figures.peers_side_by_side(df)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "last_recent / streaming_llm\n25%" in labels and "tova\n25%" in labels
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["kvbench", "kvpress"]
    assert [ax.get_ylabel() for ax in fig.axes][-1] == "task suite accuracy"
    lines = {ln.get_label(): ln for ln in figures.task_accuracy(df).axes[0].get_lines()}
    assert tuple(lines["kvpress/tova"].get_color()) == tuple(lines["tova"].get_color())
    assert lines["kvpress/tova"].get_linestyle() == "--" and lines["tova"].get_linestyle() == "-"
