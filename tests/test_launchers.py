"""Jobs in processes of their own: Hydra's joblib and submitit launchers, a job killed from outside, memory figures
that do not depend on a job's place in the sweep, and how the launching process reads a dead child."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.config.spec import resolve
from bench.harness import launch
from bench.results import rows
from bench.scaleout import placement

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["new_tokens=4", "repeats=1", "prefill_chunk=256", "ctx=1k"]


def bench_cmd(tmp_path: Path, *args: str) -> list[str]:
    overrides = [a for a in args if a != "-m"]  # Hydra reads its flags before or after the overrides
    return [
        sys.executable,
        "-m",
        "bench.run",
        *overrides,
        f"results_dir={tmp_path / 'results'}",
        *(["-m"] if "-m" in args else []),
    ]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(bench_cmd(tmp_path, *args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def sweep_rows(tmp_path: Path, sweep: str = "default"):
    return rows.load(tmp_path / "results" / sweep)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def test_joblib_two_workers_two_processes_and_resume_across_launchers(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    first = bench(tmp_path, "cache=dense", *SMALL)  # the basic launcher, no multirun
    assert first.returncode == 0, first.stderr[-2000:]
    dense_file = next((tmp_path / "results" / "default").glob("*.parquet"))
    mtime = dense_file.stat().st_mtime_ns

    proc = bench(
        tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "cache=dense,last_recent,h2o", "-m", *SMALL
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    df = sweep_rows(tmp_path)
    assert len(df) == 3 and (df["status"] == "ok").all()
    assert dense_file.stat().st_mtime_ns == mtime  # skipped by config hash, although another launcher ran it
    ran = df[df["cache"] != "dense"]
    assert set(ran["launcher"]) == {"joblib"} and set(ran["isolation"]) == {"process"}
    assert df["pid"].nunique() == 3  # every job measured in a process of its own
    assert (ran["threads"] == max(1, cores() // 2)).all()  # the cores split between the 2 workers
    assert (ran["spawn_overhead_s"] > 0).all()
    assert "3 rows in" in proc.stdout  # the table covers jobs that other processes ran


def test_submitit_local_runs_each_job_in_its_own_process(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = bench(
        tmp_path,
        "hydra/launcher=submitit_local",
        "hydra.launcher.cpus_per_task=1",
        "cache=dense,last_recent",
        "-m",
        *SMALL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = sweep_rows(tmp_path)
    assert len(df) == 2 and (df["status"] == "ok").all(), df[["cache", "status", "error"]]
    assert df["pid"].nunique() == 2 and os.getpid() not in set(df["pid"])
    # submitit gives every job a new process: the job runs there, with no child of its own
    assert set(df["isolation"]) == {"launcher"} and set(df["launcher"]) == {"submitit_local"}
    assert df["spawn_overhead_s"].isna().all() and (df["threads"] == 1).all()
    assert list((tmp_path / "results" / "default" / "hydra").glob("*/.submitit/*/*_log.out"))  # submitit's logs


def test_the_submitit_slurm_config_makes_a_one_gpu_sbatch_script(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from bench.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert params["_target_"].endswith("SlurmLauncher") and params["gpus_per_task"] == 1
    # what hydra-submitit-launcher's launch() hands submitit: shared keys as they are, the others prefixed
    params = {k: v for k, v in params.items() if k not in ("_target_", "submitit_folder", "max_num_timeout")}
    params["name"] = "kvbench"
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    fake_srun = tmp_path / "bin" / "srun"  # submitit looks for srun before it writes a script; nothing runs it
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\nexit 1\n")
    fake_srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m bench.run", "uid")
    for line in (
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=60",
        "#SBATCH --ntasks-per-node=1",
    ):
        assert line in script, script
    assert "--cpus-per-task" not in script  # left to Slurm's default; a CPU job's threads follow what it gets


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _job_process_mid_run(sweep: subprocess.Popen, timeout_s: float = 120) -> int:
    """The pid of the sweep's job process once it is running the job (torch loaded, model and caches built)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in _children(sweep.pid):
            if _rss_mib(pid) > 300:
                return pid
        assert sweep.poll() is None, "the sweep ended before its job could be killed"
        time.sleep(0.02)
    raise AssertionError("no job process appeared")


LONG = ["ctx=8k", "repeats=4", "new_tokens=8", "cache=dense,last_recent", "-m"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_job_killed_mid_run_leaves_no_row_and_the_rerun_redoes_exactly_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sweep = subprocess.Popen(
        bench_cmd(tmp_path, *LONG), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    child = _job_process_mid_run(sweep)
    os.kill(child, signal.SIGKILL)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 1 and "1 of 2 jobs have no row" in err, err[-2000:]
    assert "[killed]" in out
    folder = tmp_path / "results" / "default"
    df = sweep_rows(tmp_path)
    assert list(df["cache"]) == ["last_recent"]  # the sweep went on; the killed job left nothing
    assert [p.name for p in folder.iterdir() if p.is_file()] == [f"{df['config_hash'].item()}.parquet"]

    rerun = bench(tmp_path, *LONG)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("[skip]") == 1 and rerun.stdout.count("[ok]") == 1
    assert sorted(sweep_rows(tmp_path)["cache"]) == ["dense", "last_recent"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_sweep_takes_its_running_job_with_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sweep = subprocess.Popen(
        bench_cmd(tmp_path, *LONG), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    child = _job_process_mid_run(sweep)
    sweep.kill()  # SIGKILL, as a preempted node or an OOM-killed launcher gets
    sweep.wait(timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":  # dead, waiting to be reaped by init
            break
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{child}").exists(), "the job outlived its sweep"
    folder = tmp_path / "results" / "default"
    assert not list(folder.glob("*.parquet")) and not list(folder.glob(".*.tmp"))
    rerun = bench(tmp_path, *LONG)
    assert rerun.returncode == 0 and rerun.stdout.count("[ok]") == 2, rerun.stderr[-2000:]


def test_memory_figures_do_not_depend_on_the_place_in_the_sweep(tmp_path):
    a = bench(tmp_path, "cache=dense,h2o", "sweep=dense_first", "-m", *SMALL)
    b = bench(tmp_path, "cache=h2o,dense", "sweep=dense_second", "-m", *SMALL)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr + b.stderr)[-2000:]
    first, second = sweep_rows(tmp_path, "dense_first"), sweep_rows(tmp_path, "dense_second")
    assert list(first["isolation"]) == ["process"] * 2 and first["pid"].nunique() == 2
    for cache in ("dense", "h2o"):
        one = first[first["cache"] == cache].iloc[0]
        two = second[second["cache"] == cache].iloc[0]
        assert one["config_hash"] == two["config_hash"]
        for col in ("peak_alloc_bytes", "peak_alloc_prefill_bytes", "peak_alloc_decode_bytes", "cache_bytes"):
            assert one[col] == two[col] > 0, (cache, col)


# ---- how the launching process reads its child ------------------------------------------------------------------


@pytest.fixture
def spec():
    from hydra import compose, initialize_config_dir

    from bench.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return resolve(compose(config_name="config", overrides=["ctx=1k"]), cuda_available=False)


@pytest.mark.parametrize(
    "code, status, error",
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", None, None),  # from outside: no row
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", None, None),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "error", "the job's process died of SIGSEGV"),
        ("raise SystemExit(3)", "error", "the job's process exited with code 3 without a row"),
    ],
)
def test_a_dead_child_is_no_row_or_an_error_row(monkeypatch, spec, code, status, error):
    monkeypatch.setattr(launch, "CHILD_ARGS", ["-c", code])
    row = launch.run_in_child(spec, "s", "abc", progress=False, gpu=None)
    if status is None:
        assert row is None
    else:
        assert row["status"] == status and row["error"] == error and row["config_hash"] == "abc"
        assert row["ctx"] == 1024 and row["pid"] != os.getpid()


def test_gpu_locks_give_each_job_its_own_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    monkeypatch.setattr(placement.tempfile, "gettempdir", lambda: str(tmp_path))
    with placement.gpu_lock("cuda") as a, placement.gpu_lock("cuda") as b:
        assert (a, b) == ("4", "6")
    with placement.gpu_lock("cuda") as c:  # released on exit
        assert c == "4"
    with placement.gpu_lock("cpu") as none:
        assert none is None


def test_nvml_index_follows_cuda_visible_devices(monkeypatch):
    import pynvml
    import torch

    from bench.measure import memory

    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: (_ for _ in ()).throw(AttributeError))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert memory.nvml_index(torch.device("cuda", 1)) == 1
    assert memory.nvml_index(torch.device("cuda", 0)) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert memory.nvml_index(torch.device("cuda", 2)) == 2


def test_a_launcher_whose_plugin_is_missing_is_refused_in_one_line(monkeypatch):
    import importlib.util

    from bench.config.spec import ConfigError
    from bench.harness import sweep

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if "hydra_plugins" in name else real(name))
    with pytest.raises(ConfigError, match=r"hydra/launcher=joblib needs hydra-joblib-launcher: pip install "):
        sweep.check(["hydra/launcher=joblib", "cache=dense,h2o"], multirun=True)
    with pytest.raises(ConfigError, match="hydra/launcher=submitit_slurm needs hydra-submitit-launcher"):
        sweep.check(["hydra/launcher=submitit_slurm"], multirun=True)
