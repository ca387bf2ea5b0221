"""The harness end to end: the users' command in a subprocess, resume, failures as rows, bad input refused."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from bench.config.spec import ConfigError, resolve
from bench.harness.sweep import check
from bench.results import rows
from bench.results.schema import DESIGN_COLUMNS
from bench.run import CONF_DIR
from caches import cache_class, cache_names
from model.config import Config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["new_tokens=4", "repeats=1", "prefill_chunk=256"]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    overrides = [a for a in args if a != "-m"]  # Hydra reads its flags before or after the overrides
    cmd = [
        sys.executable,
        "-m",
        "bench.run",
        *overrides,
        f"results_dir={tmp_path / 'results'}",
        *(["-m"] if "-m" in args else []),
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def sweep_rows(tmp_path: Path, sweep: str = "default") -> pd.DataFrame:
    return rows.load(tmp_path / "results" / sweep)


@pytest.mark.parametrize("cache", cache_names())
def test_every_cache_composes_with_its_own_defaults(cache):
    """`cache=<name>` needs no yaml: the choice comes from the registry, its knobs' defaults from its constructor."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        spec = resolve(compose(config_name="config", overrides=[f"cache={cache}"]), cuda_available=False)
    assert spec.cache.name == cache and spec.model == "tiny" and spec.device == "cpu" and spec.ctx == 8192
    assert spec.cache.kwargs == cache_class(cache).knob_defaults({})
    assert spec.cache.budget == (8192 + 32 if cache == "dense" else 2048)


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


def test_each_system_is_a_configuration_of_its_own_compiled_by_its_own_rule():
    """Another system's job is another configuration; whether its decode step is compiled is its class's answer."""
    specs = {}
    for system in ("kvbench", "hf_static", "hf_static_compiled"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            specs[system] = resolve(compose(config_name="config", overrides=[f"system={system}"]), cuda_available=False)
    assert len({str(s.identity()) for s in specs.values()}) == 3
    assert [s.identity()["system"]["name"] for s in specs.values()] == list(specs)
    assert [s.compile for s in specs.values()] == [False, False, True]


@pytest.mark.parametrize("cuda", [False, True])
def test_compile_auto_takes_the_caches_whose_compiled_step_ran_on_a_gpu(cuda):
    """compile=auto: on CUDA with sdpa=auto for dense and last_recent; true asks for it for any cache (how it
    decodes is the plan's business at run time, model/compiled_decode.py)."""

    def spec(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return resolve(compose(config_name="config", overrides=list(overrides)), cuda_available=cuda)

    assert spec("cache=dense").compile == cuda and spec("cache=last_recent").compile == cuda
    assert not spec("cache=dense", "sdpa=cudnn").compile and not spec("cache=h2o").compile
    assert spec("cache=h2o", "compile=true").compile and not spec("cache=dense", "compile=false").compile


@pytest.mark.parametrize("experiment", sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml")))
def test_every_experiment_expands_to_valid_jobs(experiment):
    assert len(check([f"experiment={experiment}"], multirun=True)) > 1  # an experiment sweeps something


def test_users_command_writes_one_ok_row_per_job(tmp_path):
    proc = bench(tmp_path, "cache=dense,last_recent", "ctx=1k,2k", "-m", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = sweep_rows(tmp_path)
    assert len(df) == 4 and (df["status"] == "ok").all(), df[["cache", "ctx", "status", "error"]]
    assert set(zip(df["cache"], df["ctx"])) == {
        ("dense", 1024),
        ("dense", 2048),
        ("last_recent", 1024),
        ("last_recent", 2048),
    }
    assert set(DESIGN_COLUMNS) <= set(df.columns)
    for col in [
        "prefill_s",
        "decode_ms_p50",
        "decode_tok_s",
        "weights_bytes",
        "kv_bytes_dense",
        "cache_bytes",
        "peak_alloc_bytes",
        "peak_rss_bytes",
        "total_s",
    ]:
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
    first = sweep_rows(tmp_path)["peak_alloc_bytes"].item()
    bench(tmp_path, "ctx=1k", "force=true", *SMALL)
    assert sweep_rows(tmp_path)["peak_alloc_bytes"].item() == first > 0


def test_failures_are_rows_and_the_sweep_goes_on(tmp_path):
    proc = bench(tmp_path, "inject=oom,error,none", "sdpa=auto,efficient", "ctx=512", "isolate=false", "-m", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = sweep_rows(tmp_path)
    assert len(df) == 6
    status = df.groupby("sdpa_requested")["status"].apply(sorted).to_dict()
    assert status["auto"] == ["error", "ok", "oom"]
    assert status["efficient"] == ["error", "oom", "unsupported"]  # no mem-efficient kernel on CPU
    unsupported = df[df["status"] == "unsupported"]["error"].item()
    assert "efficient" in unsupported and "kernel" in unsupported
    assert "injected out-of-memory" in df[df["status"] == "oom"]["error"].iloc[0]


BAD = {
    "cache=lru": "cache='lru' is not valid; valid choices: adakv, dense, expected_attention, h2o, keydiff, knorm, "
    "last_recent, pyramidkv, qh2o, random, snapkv, tova",
    "model=gpt-9": "model='gpt-9' is not valid; valid choices: auto, tiny, smollm2-135m",
    "ctx=abc": "ctx='abc' is not a context length",
    "batch=0": "batch=0 is not valid; it must be an integer >= 1",
    "cache=last_recent cache.budget=4096 ctx=1k": "larger than ctx=1024",
    "sdpa=fast": "sdpa='fast' is not valid; valid choices: auto, flash, efficient, cudnn, math, eager",
    "cache=dense,lru ctx=1k -m": "cache='lru' is not valid",
    "ctx=1k,abc -m": "ctx='abc'",
    "batch=abc": "batch=abc is not valid",
    "eval=passkey ctx=1k": "needs real weights",
    "eval=passkey weights=pretrained model=smollm2-135m eval.protocol=later": "eval.protocol='later' is not valid; "
    "valid choices: aware, agnostic, multiturn",
    "eval=tasks weights=pretrained model=smollm2-135m eval.suite=[niah,vt]": "eval.suite='niah' is not valid; valid "
    "choices: vt, cwe, fwe, passkey, passkey_essay, niah_single",
    "weights=/no/such/folder": "weights='/no/such/folder' is not valid; valid choices: random, pretrained, or a folder",
    "compile=maybe": "compile='maybe' is not valid; valid choices: auto, true, false",
    "expandable_segments=maybe": "expandable_segments=maybe is not valid; valid choices: true, false",
    "decode_attention=flex": "'decode_attention' is not a setting; valid settings: model, weights, ctx",
    "system=vllm": "system='vllm' is not valid; valid choices: hf_dynamic, hf_offloaded, hf_quantized, hf_sliding, "
    "hf_static, hf_static_compiled, kvbench, kvpress",
    "system=kvpress cache.budget=0.25": "system=kvpress needs press=<name>; valid choices: knorm, streaming_llm, tova, "
    "snapkv, observed_attention, expected_attention, adakv",
    "system=kvpress press=zip cache.budget=0.25": "press='zip' is not valid; valid choices: knorm, streaming_llm",
    "system=kvpress press=knorm": "system=kvpress needs cache.budget",
    "system=kvpress press=knorm cache=h2o cache.budget=0.25": "system=kvpress evicts with its own policy (press=<name>)"
    "; cache=h2o is kvbench's: leave cache at dense and set cache.budget",
    "system=hf_quantized ~system.nbits": "system 'hf_quantized' needs system.nbits",
    "system=hf_quantized system.nbits=8": "system.nbits=8 is not valid; valid choices: 2, 4",
    "system=hf_quantized +system.axis=1": "system.axis is not a knob of system 'hf_quantized'; valid knobs: nbits, "
    "q_group_size, residual_length",
    "system=hf_sliding": "system=hf_sliding needs cache.budget",
    "system=hf_sliding cache.budget=0.25 cache.decode=append": "cache.decode='append' is not valid for "
    "system=hf_sliding; valid choices: evict",
    "cache=knorm cache.decode=once": "cache.decode='once' is not valid; valid choices: evict, append",
    "hydra/launcher=xyz cache=dense,h2o -m": "hydra/launcher='xyz' is not valid; valid choices: basic, joblib, "
    "submitit_local, submitit_slurm",
}


@pytest.mark.parametrize("args", list(BAD))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, capsys, monkeypatch):
    """In this process (the validation runs before Hydra starts anything); the subprocess case is below."""
    from bench.run import cli

    monkeypatch.setattr(sys, "argv", ["bench.run"])
    with pytest.raises(SystemExit) as exit_:
        cli([*args.split(), f"results_dir={tmp_path / 'results'}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: ") and BAD[args] in lines[0], lines
    assert not (tmp_path / "results").exists()


def test_bad_input_from_the_command_line(tmp_path):
    proc = bench(tmp_path, "cache=dense,lru", "ctx=1k", "-m")
    assert proc.returncode == 2 and proc.stderr.strip() == "kvbench: error: " + (
        "cache='lru' is not valid; valid choices: adakv, dense, expected_attention, h2o, keydiff, knorm, "
        "last_recent, pyramidkv, qh2o, random, snapkv, tova"
    )
    assert not (tmp_path / "results").exists()


def test_validate_rejects_a_sweep_without_multirun():
    with pytest.raises(ConfigError, match="add -m"):
        check(["ctx=8k,32k"], multirun=False)


def test_compile_true_decodes_through_the_compiled_step(tmp_path):
    proc = bench(tmp_path, "cache=dense,h2o", "compile=true,false", "ctx=512", "isolate=false", "-m", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    df = sweep_rows(tmp_path)
    assert len(df) == 4 and (df["status"] == "ok").all(), df[["cache", "compile", "error"]]
    compiled = df[df["compile"].astype(bool)]
    assert set(compiled["sdpa_used_decode"]) == {"compiled"} and (compiled["compile_s"] > 0).all()
    assert compiled["cuda_graphs"].isna().all()  # no CUDA graphs on the CPU
    eager = df[~df["compile"].astype(bool)].set_index("cache")["sdpa_used_decode"]
    assert eager.to_dict() == {"dense": "flash", "h2o": "eager"}
    forms = compiled.set_index("cache")[["decode_attention", "decode_kernel"]].to_dict("index")
    # CPU: the grouped-rows SDPA form on the CPU's flash kernel; h2o: the grouped step, which returns the weights
    assert forms == {
        "dense": {"decode_attention": "sdpa", "decode_kernel": "sdpa:flash"},
        "h2o": {"decode_attention": "grouped", "decode_kernel": "grouped"},
    }
    # the tracked pass runs the same fixed-shape step eagerly: same cache bytes, a peak of the same order
    for cache, group in df.groupby("cache"):
        assert group["cache_bytes"].nunique() == 1, cache
        on, off = (group[group["compile"].astype(bool) == flag]["peak_alloc_bytes"].item() for flag in (True, False))
        assert 0.5 < on / off < 2, (cache, on, off)
    # a combination the compiled step cannot run is a row that says why
    from bench.harness.job import run_job

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        refused = resolve(compose(config_name="config", overrides=["compile=true", "sdpa=eager", "ctx=512", *SMALL]))
    row = run_job(refused, sweep_id="test", config_hash="refused", progress=False)
    assert row["status"] == "unsupported" and "sdpa=eager: the compiled decode step runs an SDPA kernel" in row["error"]


def test_a_warm_up_stays_within_the_tokens_the_caches_hold():
    """One decode step after a prompt of one prefill call: a dense cache holds ctx + 1 tokens, and the warm-up's
    prefill and its two steps fit in them."""
    from bench.harness.job import run_job

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        overrides = ["ctx=256", "new_tokens=1", "repeats=1", "prefill_chunk=256"]
        spec = resolve(compose(config_name="config", overrides=overrides))
    row = run_job(spec, sweep_id="test", config_hash="warm", progress=False)
    assert row["status"] == "ok", row.get("error")


def test_compiled_jobs_in_one_process_do_not_pile_up_compiled_code():
    """isolate=false runs every job in one process: each compiled job drops its compiled step when it ends, so
    the next one (another cache: another graph) compiles from scratch instead of counting as a recompilation
    (dynamo fails the step after `recompile_limit` of them; 8 by default, 1 here)."""
    import torch._dynamo

    from bench.harness.job import run_job

    torch._dynamo.reset()
    for cache in ("dense", "h2o"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"cache={cache}", "compile=true", "ctx=256", *SMALL])
        with torch._dynamo.config.patch(recompile_limit=1):
            row = run_job(resolve(cfg), sweep_id="test", config_hash=cache, progress=False)
        assert row["status"] == "ok", row.get("error")


def test_systems_side_by_side_each_in_its_own_process(tmp_path):
    """The consolidation's command: one row per system, with the `system` column, each from a process of its own,
    on the same weights (the same dense cache bytes), and their figure."""
    proc = bench(
        tmp_path, "system=kvbench,hf_dynamic,hf_static", "model=tiny", "ctx=1k", "new_tokens=8", "repeats=1", "-m"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = sweep_rows(tmp_path)
    assert sorted(df["system"]) == ["hf_dynamic", "hf_static", "kvbench"] and (df["status"] == "ok").all(), df.error
    assert (df["isolation"] == "process").all() and df["pid"].nunique() == 3
    assert df["weights_bytes"].nunique() == 1 and df["cache_bytes"].nunique() == 1
    assert (df["peak_alloc_source"] == "tensor_tracker").all() and (df["peak_alloc_bytes"] > df["weights_bytes"]).all()
    assert "hf_static" in proc.stdout  # the table names the systems
    from bench.results.figures import systems_side_by_side

    assert systems_side_by_side(df) is not None
