"""The harness end to end: the users' command in a subprocess, resume, failures as rows, bad input refused."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from bench import results
from bench.run import CONF_DIR, validate
from bench.spec import ConfigError, resolve
from model.config import Config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["new_tokens=4", "repeats=1", "prefill_chunk=256"]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.run", *args, f"results_dir={tmp_path / 'results'}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def rows(tmp_path: Path, sweep: str = "default") -> pd.DataFrame:
    return results.load(tmp_path / "results" / sweep)


@pytest.mark.parametrize("cache", sorted(p.stem for p in Path(CONF_DIR, "cache").glob("*.yaml")))
def test_every_cache_config_composes(cache):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        spec = resolve(compose(config_name="config", overrides=[f"cache={cache}"]), cuda_available=False)
    assert spec.cache == cache and spec.model == "tiny" and spec.device == "cpu" and spec.ctx == 8192


@pytest.mark.parametrize("cuda", [False, True])
def test_expandable_segments_is_a_cuda_setting(cuda):
    """On CUDA it is part of the job's identity (it changes reserved and NVML figures); on CPU it is always off,
    so that the knob does not split CPU results."""
    specs = []
    for value in ["true", "false"]:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"expandable_segments={value}"])
        specs.append(resolve(cfg, cuda_available=cuda))
    assert [s.expandable_segments for s in specs] == ([True, False] if cuda else [False, False])
    assert (specs[0].identity() != specs[1].identity()) == cuda
    assert "expandable_segments" not in specs[1].identity()  # the default allocator: hashes as before the knob


@pytest.mark.parametrize("cuda", [False, True])
def test_decode_attention_is_resolved_and_hashed_only_where_it_changes_the_step(cuda):
    """auto is sdpa_gqa on CUDA and sdpa on the CPU; an eager decode step has none. sdpa (what the compiled step
    did before the knob) and unset kernel options stay out of the hash, so earlier rows still resume. cuda_graphs=auto
    is our manual graph for a compiled CUDA step, and no graph at all elsewhere."""
    specs = {}
    for overrides in (["compile=true"], ["compile=false"], ["compile=true", "decode_attention=sdpa"]):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        specs[" ".join(overrides)] = resolve(cfg, cuda_available=cuda)
    assert specs["compile=true"].decode_attention == ("sdpa_gqa" if cuda else "sdpa")
    assert specs["compile=false"].decode_attention is None
    for spec in specs.values():
        assert "kernel_options" not in spec.identity()
        assert ("decode_attention" in spec.identity()) == (spec.decode_attention == "sdpa_gqa")
        assert ("cuda_graphs" in spec.identity()) == (spec.cuda_graphs == "manual")  # trees or none: not hashed
    assert specs["compile=true"].cuda_graphs == ("manual" if cuda else None)
    assert specs["compile=false"].cuda_graphs is None
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # a forced SDPA kernel: auto is sdpa
        forced = resolve(compose(config_name="config", overrides=["compile=true", "sdpa=cudnn"]), cuda_available=cuda)
        assert forced.compile and forced.decode_attention == "sdpa" and forced.sdpa == "cudnn"
        with pytest.raises(ConfigError, match="sdpa='cudnn' cannot apply; valid choices with a forced SDPA kernel"):
            resolve(compose(config_name="config", overrides=["compile=true", "sdpa=cudnn", "decode_attention=flex"]),
                    cuda_available=True)  # fmt: skip
    if cuda:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=["decode_attention=flex", "kernel_options.num_stages=3", "cuda_graphs=manual"],
            )
        spec = resolve(cfg, cuda_available=True)
        assert spec.kernel_options == {"num_stages": 3} and spec.identity()["kernel_options"] == {"num_stages": 3}
        assert spec.cuda_graphs == "manual" and spec.identity()["cuda_graphs"] == "manual"
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # trees when asked
            trees = resolve(compose(config_name="config", overrides=["compile=true", "cuda_graphs=trees"]),
                            cuda_available=True)  # fmt: skip
        assert trees.cuda_graphs == "trees" and "cuda_graphs" not in trees.identity()


@pytest.mark.parametrize("cuda", [False, True])
def test_a_score_based_cache_compiles_when_asked_with_its_grouped_step(cuda):
    """compile=auto leaves h2o eager (its compiled step's tokens have not been checked on a GPU yet); compile=true
    runs the grouped step, under sdpa=auto or eager (what h2o runs anyway), captured by graph trees (cuda_graphs=auto:
    the step cannot run twice at one position), and refuses another formulation."""

    def spec(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return resolve(compose(config_name="config", overrides=["cache=h2o", *overrides]), cuda_available=cuda)

    assert not spec().compile and spec().decode_attention is None
    for sdpa in ("auto", "eager"):
        asked = spec("compile=true", f"sdpa={sdpa}")
        assert asked.compile and asked.decode_attention == asked.identity()["decode_attention"] == "grouped"
        assert asked.cuda_graphs == ("trees" if cuda else None)
    with pytest.raises(ConfigError, match="decode_attention=flex: a score-based cache evicts by attention weights"):
        spec("compile=true", "decode_attention=flex")
    with pytest.raises(ConfigError, match="cuda_graphs=manual with cache=h2o: graphs='manual' runs a step twice"):
        spec("compile=true", "cuda_graphs=manual")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml")))
def test_every_experiment_expands_to_valid_jobs(experiment):
    assert len(validate([f"experiment={experiment}", "-m"])) >= 4


def test_users_command_writes_one_ok_row_per_job(tmp_path):
    proc = bench(tmp_path, "cache=dense,last_recent", "ctx=1k,2k", "-m", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = rows(tmp_path)
    assert len(df) == 4 and (df["status"] == "ok").all(), df[["cache", "ctx", "status", "error"]]
    assert set(zip(df["cache"], df["ctx"])) == {("dense", 1024), ("dense", 2048), ("last_recent", 1024),
                                                ("last_recent", 2048)}  # fmt: skip
    assert set(results.SCHEMA) <= set(df.columns)
    for col in ["prefill_s", "decode_ms_p50", "decode_tok_s", "weights_bytes", "kv_bytes_dense", "cache_bytes",
                "peak_alloc_bytes", "peak_rss_bytes", "total_s"]:  # fmt: skip
        assert df[col].notna().all() and (df[col] > 0).all(), col
    assert df["mbu"].isna().all() and (df["device_kind"] == "cpu").all()
    rss_file = df["rss_file_bytes"]  # the libraries' part of the resident set
    assert rss_file.notna().all() and (rss_file > 0).all() and (rss_file < df["peak_rss_bytes"]).all()
    assert "4 rows in" in proc.stdout and "decode tok/s" in proc.stdout  # the comparison table
    assert proc.stdout.count("[ok] tiny") == 4

    # cache bytes, read from the real buffers, against the analytic figures
    tiny = Config.from_name("tiny")
    per_token = tiny.kv_bytes(batch=1, tokens=1, itemsize=4)
    for _, r in df.iterrows():
        assert r["kv_bytes_dense"] == per_token * (r["ctx"] + 4)
        if r["cache"] == "dense":
            assert r["cache_bytes"] == r["kv_bytes_dense"]
        else:  # budget 0.25 of ctx, plus 4 sink tokens, plus the int64 slot positions of each layer
            slots = r["ctx"] // 4 + 4
            assert r["cache_budget"] == r["ctx"] // 4 and r["cache_length"] == slots
            assert r["cache_bytes"] == per_token * slots + tiny.n_layer * slots * 8

    # resume: nothing reruns; a missing row is redone; force reruns everything
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "results" / "default").glob("*.parquet")}
    proc = bench(tmp_path, "cache=dense,last_recent", "ctx=1k,2k", "-m", *SMALL)
    assert proc.returncode == 0 and proc.stdout.count("[skip]") == 4, proc.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before
    gone = sorted(before)[0]
    gone.unlink()
    proc = bench(tmp_path, "cache=dense,last_recent", "ctx=1k,2k", "-m", *SMALL)
    assert proc.stdout.count("[skip]") == 3 and proc.stdout.count("[ok]") == 1 and gone.exists()


def test_deterministic_tracked_peak(tmp_path):
    proc = bench(tmp_path, "ctx=1k", "force=true", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = rows(tmp_path)["peak_tracked_bytes"].item()
    bench(tmp_path, "ctx=1k", "force=true", *SMALL)
    assert rows(tmp_path)["peak_tracked_bytes"].item() == first > 0


def test_failures_are_rows_and_the_sweep_goes_on(tmp_path):
    proc = bench(tmp_path, "inject=oom,error,none", "sdpa=auto,efficient", "ctx=512", "-m", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = rows(tmp_path)
    assert len(df) == 6
    status = df.groupby("sdpa_requested")["status"].apply(sorted).to_dict()
    assert status["auto"] == ["error", "ok", "oom"]
    assert status["efficient"] == ["error", "oom", "unsupported"]  # no mem-efficient kernel on CPU
    unsupported = df[df["status"] == "unsupported"]["error"].item()
    assert "efficient" in unsupported and "kernel" in unsupported
    assert "injected out-of-memory" in df[df["status"] == "oom"]["error"].iloc[0]


BAD = {
    "cache=lru": "cache='lru' is not valid; valid choices: dense, h2o, last_recent, qh2o, snapkv, tova",
    "model=gpt-9": "model='gpt-9' is not valid; valid choices: auto, tiny, smollm2-135m",
    "ctx=abc": "ctx='abc' is not a context length",
    "batch=0": "batch=0 is not valid; it must be an integer >= 1",
    "cache=last_recent cache.budget=4096 ctx=1k": "larger than ctx=1024",
    "sdpa=fast": "sdpa='fast' is not valid; valid choices: auto, flash, efficient, cudnn, math, eager",
    "cache=dense,lru ctx=1k -m": "cache='lru' is not valid",
    "ctx=1k,abc -m": "ctx='abc'",
    "batch=abc": "batch=abc is not valid",
    "eval=passkey ctx=1k": "needs real weights",
    "eval=passkey weights=pretrained model=smollm2-135m eval.question=later": "eval.question='later' is not valid",
    "compile=true cache=h2o decode_attention=sdpa": "decode_attention=sdpa: a score-based cache evicts by attention "
    "weights, which only its grouped step returns; valid choice: auto",
    "compile=true sdpa=eager": "valid: sdpa=auto, flash, efficient, cudnn, math (got sdpa='eager'",
    "compile=maybe": "compile='maybe' is not valid; valid choices: auto, true, false",
    "expandable_segments=maybe": "expandable_segments=maybe is not valid; valid choices: true, false",
    "decode_attention=cudnn": "decode_attention='cudnn' is not valid; valid choices: auto, sdpa, sdpa_gqa, flex, "
    "triton",
    "compile=true decode_attention=flex": "decode_attention=flex compiles on CUDA only; valid choices on cpu: auto, "
    "sdpa, sdpa_gqa",
    "kernel_options.BLOCK=64": "kernel_options.BLOCK is not an option; valid: kernel_options.BLOCK_N, "
    "kernel_options.num_stages, kernel_options.num_warps, kernel_options.SPLIT_KV",
    "kernel_options.num_stages=0": "kernel_options.num_stages=0 is not valid; it must be an integer >= 1",
    "kernel_options.num_stages=3": "kernel_options apply to the compiled decode step with decode_attention=flex or "
    "triton",
    "cuda_graphs=manual": "cuda_graphs=manual captures the compiled decode step on CUDA; it needs compile=true and "
    "device=cuda (valid choices here: trees)",
    "cuda_graphs=yes": "cuda_graphs='yes' is not valid; valid choices: auto, trees, manual",
    "weight_layout=col": "weight_layout='col' is not valid; valid choices: in_out, out_in",
    "hydra/launcher=xyz cache=dense,h2o -m": "hydra/launcher='xyz' is not valid; valid choices: basic, joblib, "
    "submitit_local, submitit_slurm",
}


@pytest.mark.parametrize("args", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args):
    proc = bench(tmp_path, *args.split())
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: ") and BAD[args] in lines[0], proc.stderr
    assert not (tmp_path / "results").exists()


def test_validate_rejects_a_sweep_without_multirun():
    with pytest.raises(ConfigError, match="add -m"):
        validate(["ctx=8k,32k"])


def test_compile_true_decodes_through_the_compiled_step(tmp_path):
    proc = bench(tmp_path, "cache=dense,last_recent,h2o", "compile=true,false", "ctx=512", "-m", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = rows(tmp_path)
    assert len(df) == 6 and (df["status"] == "ok").all(), df[["cache", "compile", "error"]]
    compiled = df[df["compile"].astype(bool)]
    assert len(compiled) == 3 and set(compiled["sdpa_used_decode"]) == {"compiled"}
    assert set(compiled["compile_mode"]) == {"default"} and (compiled["compile_s"] > 0).all()  # no CUDA graphs
    eager = df[~df["compile"].astype(bool)].set_index("cache")["sdpa_used_decode"]
    assert eager.to_dict() == {"dense": "flash", "last_recent": "flash", "h2o": "eager"}
    kernels = compiled.set_index("cache")["decode_kernel"].to_dict()
    # CPU: the flash kernel of the CPU, under a mask; h2o: the grouped step, which returns the weights it scores by
    assert kernels == {"dense": "sdpa:flash", "last_recent": "sdpa:flash", "h2o": "grouped"}
    # the tracked pass runs the same fixed-shape step eagerly: same cache bytes, a peak of the same order
    for cache, group in df.groupby("cache"):
        assert group["cache_bytes"].nunique() == 1, cache
        on, off = (group[group["compile"].astype(bool) == flag]["peak_tracked_bytes"].item() for flag in (True, False))
        assert 0.5 < on / off < 2, (cache, on, off)


def test_weight_layout_is_a_sweep_axis_recorded_and_hashed_when_not_the_default(tmp_path):
    """Both storages run (compiled decode on the CPU), the row says which, and only out_in enters the hash (rows
    from before the knob keep resuming)."""
    proc = bench(tmp_path, "weight_layout=in_out,out_in", "compile=true", "ctx=512", "-m", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = rows(tmp_path)
    assert sorted(df["weight_layout"]) == ["in_out", "out_in"] and (df["status"] == "ok").all(), df.get("error")
    assert df["cache_bytes"].nunique() == 1 and df["config_hash"].nunique() == 2
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        specs = {
            v: resolve(compose(config_name="config", overrides=[f"weight_layout={v}"])) for v in ("in_out", "out_in")
        }
    assert "weight_layout" not in specs["in_out"].identity() and specs["out_in"].identity()["weight_layout"] == "out_in"


def test_compiled_jobs_in_one_process_do_not_pile_up_compiled_code():
    """isolate=false runs every job in one process: each compiled job drops its compiled step when it ends, so
    the next one (another cache: another graph) compiles from scratch instead of counting as a recompilation
    (dynamo fails the step after `recompile_limit` of them; 8 by default, 1 here)."""
    import torch._dynamo

    from bench.job import run_job

    torch._dynamo.reset()
    for cache in ("dense", "last_recent", "h2o"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"cache={cache}", "compile=true", "ctx=256", *SMALL])
        with torch._dynamo.config.patch(recompile_limit=1):
            row = run_job(resolve(cfg), sweep_id="test", config_hash=cache, progress=False)
        assert row["status"] == "ok", row.get("error")
