"""`python -m bench.compare_hf`: kvbench and HF transformers on the same shape, one results folder, a `system`
column. On CPU with the tiny shape; the GPU figures come from benchmarks/gpu_decode.sh on the device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import results
from model.config import Config

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("transformers")


def compare(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.compare_hf", "--results-dir", str(tmp_path), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_kvbench_and_hf_rows_side_by_side(tmp_path):
    proc = compare(tmp_path, "--model", "tiny", "--case", "512:2", "--systems", "kvbench,hf_static,hf_dynamic",
                   "--new-tokens", "4", "--repeats", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = results.load(tmp_path / "compare_hf")
    assert sorted(df["system"]) == ["hf_dynamic", "hf_static", "kvbench"]
    assert (df["status"] == "ok").all(), df[["system", "error"]]
    assert (df["ctx"] == 512).all() and (df["batch"] == 2).all() and (df["device_kind"] == "cpu").all()
    tiny = Config.from_name("tiny")
    assert (df["n_params"] == tiny.n_params).all()  # the same shape: HF's parameter count equals ours
    assert (df["kv_bytes_dense"] == tiny.kv_bytes(2, 512 + 4, 4)).all()
    hf = df[df["system"] != "kvbench"].set_index("system")
    # HF's caches hold what they should: the static one its ctx + new_tokens slots, the dynamic one the 512 prompt
    # tokens and the 4 decode steps' inputs
    assert hf.loc["hf_static", "cache_bytes"] == hf.loc["hf_dynamic", "cache_bytes"] == tiny.kv_bytes(2, 516, 4)
    for col in ("prefill_s", "decode_ms_p50", "decode_tok_s", "peak_rss_bytes"):
        assert (df[col] > 0).all(), col
    assert "hf_static" in proc.stdout and "ms/step p50" in proc.stdout  # the side-by-side table
    from bench.report import human_bytes

    bound = human_bytes(int(df["weights_bytes"].iloc[0]) + tiny.kv_bytes(2, 516, 4))  # what peaks are held against
    assert "w+KV" in proc.stdout and proc.stdout.count(f" {bound} ") == 3, proc.stdout

    from bench.plot import systems_side_by_side

    fig = systems_side_by_side(df)
    time_ax, memory_ax = fig.axes
    heights = [bar.get_height() for bar in time_ax.patches]
    assert sorted(heights) == sorted(df["decode_ms_p50"])  # one bar per system
    assert memory_ax.get_ylabel() == "peak RSS / (weights + KV)" and len(memory_ax.patches) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--systems", "kvbench,vllm"], "--systems 'vllm' is not valid; valid choices: kvbench, hf_static_compiled"),
        (["--case", "8k"], "--case '8k' is not valid; valid: CTX:BATCH"),
        (["--case", "abc:1"], "ctx='abc' is not a context length"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    proc = compare(tmp_path, *args)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())
