"""Timings on a shared machine (bench/measure/contention.py): a row says what else ran while it was timed, a job that
starts on a busy machine says so (or waits, or refuses), each timing carries its spread, and bench.regress judges
timings by the noise the rows recorded and refuses to judge those timed under heavy contention."""

import subprocess
import sys

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from bench.config.spec import resolve
from bench.harness.job import run_job
from bench.measure.contention import classify
from bench.measure.timing import median_interval
from bench.results import compare, rows
from bench.run import CONF_DIR

HOG = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass"


def _spec(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["ctx=512", "new_tokens=8", "repeats=2", "threads=2", "track_tensors=false", *overrides],
        )
    return resolve(cfg)


def test_a_hog_beside_a_job_shows_in_its_row_and_a_warning(capsys):
    """Two busy-looping processes on a 2-core machine: the job's row says the others used most of the cores, the
    job printed one line at its start; the same job after them sees their cores given back."""
    hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(s=30)]) for _ in range(2)]
    try:
        busy = run_job(_spec(), "test", "busy", progress=False)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    out = capsys.readouterr().out
    assert busy["status"] == "ok" and busy["contention"] != "none" and busy["others_cpu"] > 0.5, busy
    assert busy["oversubscribed"] and out.count("[busy] the machine is busy") == 1, out
    quiet = run_job(_spec(), "test", "quiet", progress=False)
    # the hogs' cores come back to the job: the others' share falls to the machine's background, whatever it is
    # (a shared CI runner's can be half a core, so the drop is only bounded below by zero)
    assert quiet["others_cpu"] < busy["others_cpu"], (quiet["others_cpu"], busy["others_cpu"])


def test_refuse_writes_a_busy_row_and_measures_nothing():
    hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(s=20)]) for _ in range(2)]
    try:
        row = run_job(_spec("idle_policy=refuse"), "test", "refused", progress=False)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert row["status"] == "busy" and "other processes use" in row["error"] and "decode_ms_p50" not in row


def test_classify_thresholds():
    assert classify(0.05, 2, 2, None) == ("none", False)
    assert classify(0.2, 2, 2, None) == ("some", False)
    assert classify(1.2, 2, 2, None) == ("heavy", True)
    assert classify(0.0, 2, 2, 1)[0] == "heavy"  # another process computing on the GPU
    assert classify(0.0, 2, 2, None, steal=0.7)[0] == "heavy"  # another guest of the hypervisor


def test_the_median_interval_contains_the_median_and_narrows_with_more_steps():
    wide = median_interval([1.0, 1.2, 0.8, 1.5, 0.7, 1.1, 0.9])
    narrow = median_interval([1.0, 1.2, 0.8, 1.5, 0.7, 1.1, 0.9] * 20)
    assert wide[0] <= 1.0 <= wide[1] and narrow[0] <= 1.0 <= narrow[1]
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert median_interval([2.0] * 10) == (2.0, 2.0)


def _rows(h2o_ms: float, half: float, contention: str = "none") -> pd.DataFrame:
    """A dense row at 1.0 ms/step and an h2o row at `h2o_ms`, each with a 95% interval of +-half (relative)."""
    base = {
        "system": "kvbench",
        "model": "tiny",
        "weights": "random",
        "dtype": "float32",
        "device_kind": "cpu",
        "cache_kwargs": "{}",
        "ctx": 1024,
        "batch": 1,
        "new_tokens": 16,
        "sdpa_requested": "auto",
        "prefill_chunk": 512,
        "repeats": 3,
        "seed": 0,
        "status": "ok",
        "started_at": "2026-01-01T00:00:00",
        "prefill_s": 1.0,
        "contention": contention,
    }
    made = []
    for cache, ms in (("dense", 1.0), ("h2o", h2o_ms)):
        made.append(
            {
                **base,
                "cache": cache,
                "cache_budget": 256,
                "decode_ms_p50": ms,
                "decode_ms_p50_low": ms * (1 - half),
                "decode_ms_p50_high": ms * (1 + half),
            }
        )
    return rows.to_frame(made)


def test_regress_judges_timings_by_their_recorded_noise():
    was = _rows(1.2, half=0.3)
    assert compare.compare(_rows(2.5, half=0.3), was) == []  # +108%, within 0.3 x 4 of recorded noise
    flagged = compare.compare(_rows(2.5, half=0.01), _rows(1.2, half=0.01))  # the same change, narrow intervals
    assert [p["column"] for p in flagged] == ["decode_ms_p50 / dense"] and "recorded noise" in flagged[0]["rule"]
    unjudged: list = []
    assert compare.compare(_rows(3.0, half=0.01, contention="heavy"), _rows(1.2, half=0.01), unjudged=unjudged) == []
    assert [column for _, column in unjudged] == ["decode_ms_p50 / dense", "prefill_s / dense"]
    assert "h2o" in unjudged[0][0]


def test_regress_says_what_it_cannot_judge(tmp_path):
    for name, df in (("current", _rows(3.0, 0.01, "heavy")), ("baseline", _rows(1.2, 0.01))):
        for _, row in df.iterrows():
            rows.write_row(tmp_path / name, {**row.to_dict(), "config_hash": f"{name}-{row['cache']}"})
    proc = subprocess.run(
        [sys.executable, "-m", "bench.regress", str(tmp_path / "current"), "--baseline", str(tmp_path / "baseline")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "cannot judge decode_ms_p50 / dense of tiny h2o" in proc.stdout, proc.stdout
    assert "2 timing(s) not judged" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["nvml_period_ms=-1"], "nvml_period_ms=-1.0 is not valid; it must be >= 0"),
        (["results_dir=/proc/kvbench"], "results_dir: /proc is not writable"),
        (["idle_policy=later"], "idle_policy='later' is not valid; valid choices: warn, wait, refuse"),
    ],
)
def test_bad_settings_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    from bench.run import cli

    monkeypatch.setattr(sys, "argv", ["bench.run"])
    with pytest.raises(SystemExit) as exit_:
        cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0], err
