import mmap
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from bench.measure import memory
from bench.results import rows
from bench.results.schema import COLUMNS
from bench.results.tables import comparison_table, summary_line


def test_tensor_tracker_counts_live_bytes_exactly():
    x = torch.zeros(1000)  # allocated before the mode: not counted
    with memory.TensorTracker(baseline=123) as tracker:
        a = torch.ones(1000)  # +4000
        b = a.view(10, 100)  # a view: no new memory
        c = a * 2  # +4000 -> 8000 live
        del a  # still viewed by b
        assert tracker.live == 8000
        x.add_(1)  # in place on old memory: nothing
        del b, c
        assert tracker.live == 0
        d = torch.empty(250, dtype=torch.float64)  # +2000
        assert tracker.live == 2000
    assert tracker.peak_dynamic == 8000 and tracker.peak == 8123
    tracker.reset_peak()
    assert tracker.peak_dynamic == 2000
    del d


def test_peak_rss_resets_and_sees_a_big_allocation():
    if not memory.reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    mib = 2**20
    big = torch.ones(256 * mib // 4)  # 256 MiB, touched, then freed (returned to the OS: it was mmapped)
    del big
    high = memory.peak_rss()
    memory.reset_peak_rss()
    low = memory.peak_rss()
    assert low <= high - 200 * mib  # the reset forgot the freed 256 MiB
    big = torch.ones(256 * mib // 4)
    assert memory.peak_rss() >= low + 200 * mib
    del big


def _file_backed_rss_from_smaps() -> int:
    """Independent count of RssFile: per mapping of a regular file, resident bytes less its copied-on-write pages."""
    total, is_file = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
                path = parts[5] if len(parts) > 5 else ""
                is_file = path.startswith("/") and not path.startswith(("/dev/", "/memfd:", "/SYSV"))  # not shmem
            elif is_file and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
            elif is_file and parts[0] == "Anonymous:":
                total -= int(parts[1]) * 1024
    return total


def test_rss_file_matches_smaps_and_sees_a_mapped_file(tmp_path):
    """rss_file is the file-backed part of the resident set: the part of peak_rss set by the page cache."""
    if memory.rss_file() is None or not memory.reset_peak_rss():
        pytest.skip("no /proc/self/status or clear_refs here")
    mib = 2**20
    assert abs(memory.rss_file() - _file_backed_rss_from_smaps()) < mib
    path = tmp_path / "blob"
    path.write_bytes(b"\1" * (64 * mib))
    memory.reset_peak_rss()
    before, low = memory.rss_file(), memory.peak_rss()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert sum(m[i] for i in range(0, len(m), mmap.PAGESIZE)) == len(m) // mmap.PAGESIZE  # touch every page
        assert memory.rss_file() >= before + 63 * mib
        assert abs(memory.rss_file() - _file_backed_rss_from_smaps()) < mib
        assert memory.peak_rss() >= low + 63 * mib  # file pages count in the peak resident set too
    assert memory.rss_file() < before + mib  # unmapped: gone from this process's resident set


# An eager job of every cache kind in one process, then the modules it loaded (run where no test imported any).
# The CPU's exact-bytes pass runs too: its dispatch mode must load no compiler.
_EAGER_JOBS = """
import sys
from hydra import compose, initialize_config_dir
from bench.harness.job import run_job
from bench.run import CONF_DIR
from bench.config.spec import resolve
for cache in ("dense", "last_recent", "h2o", "qh2o"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"cache={cache}", "ctx=1k", "new_tokens=4", "repeats=1"])
    row = run_job(resolve(cfg, cuda_available=False), "s", cache, progress=False)
    assert row["status"] == "ok", row.get("error")
print(",".join(m for m in ("torch._dynamo", "torch._inductor", "triton", "pandas", "pyarrow") if m in sys.modules))
from model import attention
attention._causal_bias_takes_gqa()  # forced flash's bottom-right causal chunks do load the compiler: seen here
print("torch._dynamo" in sys.modules)
"""


def test_an_eager_job_loads_no_compiler_and_no_dataframes():
    """peak_rss_bytes counts every library the job's process loaded. torch._dynamo (and triton and inductor with
    it) added about 175 MiB to an eager CPU job's peak RSS (607 against 432 MiB: `make bench`'s dense 8k row, fresh
    clones before and after), pandas and pyarrow 68 MiB (a ci_smoke row), for code the job never ran: an eager job,
    its tensor-tracked pass included, imports neither (the launcher writes the row)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", _EAGER_JOBS], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, flex_loads_it = proc.stdout.splitlines()[-2:]
    assert loaded == ""
    assert flex_loads_it == "True"


def test_write_is_atomic_and_load_reads_a_tree(tmp_path):
    row = {"config_hash": "abc123", "model": "tiny", "ctx": 1024, "status": "ok", "prefill_s": 0.5, "new_col": 7}
    path = rows.write_row(tmp_path / "sweep" / "a", row)
    rows.write_row(tmp_path / "sweep" / "b", {**row, "config_hash": "def456", "ctx": 2048})
    assert path.name == "abc123.parquet" and rows.has_row(tmp_path / "sweep" / "a", "abc123")
    assert not [p for p in tmp_path.rglob("*") if p.suffix == ".tmp"]
    df = rows.load(tmp_path / "sweep")
    assert sorted(df["ctx"].tolist()) == [1024, 2048]
    assert list(df.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert str(df["ctx"].dtype) == "Int64" and df["mbu"].isna().all() and "new_col" in df
    assert rows.load(tmp_path / "nothing").empty


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, path, **kw):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OSError):
        rows.write_row(tmp_path, {"config_hash": "x1"})
    assert os.listdir(tmp_path) == []


def test_config_hash_is_stable_and_sensitive():
    a = {"ctx": 1024, "cache": "dense", "cache_kwargs": {}}
    assert rows.config_hash(a) == rows.config_hash(dict(reversed(a.items())))
    assert rows.config_hash(a) != rows.config_hash({**a, "ctx": 2048})


def test_summary_and_table_render():
    row = {
        "model": "tiny",
        "cache": "dense",
        "label": "dense",
        "ctx": 8192,
        "batch": 1,
        "sdpa_requested": "auto",
        "status": "ok",
        "sdpa_used": "flash",
        "prefill_s": 0.5,
        "decode_ms_p50": 1.25,
        "decode_tok_s": 800.0,
        "peak_alloc_bytes": 3 * 2**20,
        "peak_alloc_source": "tensor_tracker",
        "cache_bytes": 2**20,
        "kv_bytes_dense": 2**20,
        "device_kind": "cpu",
        "peak_rss_bytes": 2**30,
    }
    line = summary_line(row)
    assert line.startswith("[ok] tiny dense ctx=8k") and "1.25 ms/step" in line and "3.0 MiB" in line
    table = comparison_table(
        rows.to_frame([row, {**row, "cache": "last_recent", "label": "last_recent", "cache_bytes": 2**18}])
    )
    assert "last_recent" in table and "0.25x" in table and "1.0 GiB" in table


def test_mbu_is_bytes_per_step_over_step_time_over_bandwidth(monkeypatch):
    import torch

    from bench.harness import job

    monkeypatch.setattr(job.trackers, "measured_bandwidth", lambda device: 4e12)  # an H200-like 4 TB/s
    result = job.roofline(step_bytes=6e9, step_ms=2.5, device=torch.device("cuda"))
    assert (result.bandwidth_bytes_s, result.mbu) == (4e12, pytest.approx(0.6))  # 6 GB in 2.5 ms = 2.4 TB/s


def test_the_copy_bandwidth_is_timed_on_the_device_in_batches(monkeypatch):
    """measured_bandwidth's CUDA path on the CPU, with fake CUDA events that read a fake device clock advanced by
    each copy: the figure is bytes read + written per copy over the best batch's time per copy; the host's time
    between copies does not count."""
    import torch

    from bench.measure import memory

    clock = {"s": 0.0, "copies": 0}
    per_copy = [2.5e-4, 2.0e-4, 3.0e-4]  # seconds per copy in successive batches (warm-up copies: the first)

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.t = None

        def record(self, stream=None) -> None:
            self.t = clock["s"]

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end) -> float:
            return (end.t - self.t) * 1e3  # milliseconds, as CUDA's

    class Tensor:
        def __init__(self, n: int) -> None:
            self.n = n

        def numel(self) -> int:
            return self.n

        def copy_(self, src) -> None:
            clock["s"] += per_copy[min(len(per_copy) - 1, max(0, (clock["copies"] - 3) // 10))]
            clock["copies"] += 1

    monkeypatch.setattr(memory, "_BANDWIDTH", {})
    monkeypatch.setattr(torch, "empty", lambda n, dtype=None, device=None: Tensor(n))
    monkeypatch.setattr(torch, "empty_like", lambda t: Tensor(t.n))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    bandwidth = memory.measured_bandwidth(torch.device("cuda"), nbytes=1 << 30, copies=10, trials=3)
    assert clock["copies"] == 3 + 3 * 10
    assert bandwidth == pytest.approx((1 << 30) / 2.0e-4)  # 512 MiB read + 512 MiB written in the best 0.2 ms


def test_timing_from_the_timed_seconds():
    from bench.harness.job import timing

    t = timing(
        [2.0, 1.0, 3.0], [0.001 * k for k in range(1, 11)], batch=4, used={"prefill": {"flash"}, "decode": {"compiled"}}
    )
    assert t.prefill_s == 2.0 and t.prefill_s_min == 1.0
    assert t.decode_ms_p50 == pytest.approx(5.5) and t.decode_ms_p90 == pytest.approx(9.0)
    assert t.decode_tok_s == pytest.approx(4 * 10 / 0.055)
    assert t.sdpa_used == "flash|compiled"


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_expandable_segments_request_keeps_the_users_options(monkeypatch, var):
    """Before CUDA starts the request goes through the environment variable the user already set (else the CUDA
    one), replacing only its expandable_segments option."""
    for v in memory.ALLOC_CONF_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "max_split_size_mb:128,expandable_segments:False")
    assert not torch.cuda.is_initialized()
    assert memory.request_expandable_segments(True) == "max_split_size_mb:128,expandable_segments:True"
    assert os.environ[var] == "max_split_size_mb:128,expandable_segments:True"
    monkeypatch.delenv(var)
    assert memory.request_expandable_segments(False) == "expandable_segments:False"
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:False"
