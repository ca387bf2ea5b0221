"""What the one-call GPU script (benchmarks/gpu_decode.sh) relies on, checked on the CPU: the variant it picks from
benchmarks/decode_variants.py's output, and that the arguments it derives run the same variant through
bench.compare_hf and resolve to it in bench.run."""

import sys
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir

from bench.run import CONF_DIR
from bench.spec import resolve

sys.path.insert(0, str(ROOT / "benchmarks"))
from decode_variants import best_variant, parse_variant, pick_arguments  # noqa: E402

ROWS = [
    {"variant": "flex", "status": "ok", "ms_p50": 3.9, "max_logit_diff": 0.01, "logit_scale": 1.0},
    {"variant": "triton:graphs=manual:BLOCK_N=128", "status": "ok", "ms_p50": 2.5, "max_logit_diff": 0.02,
     "logit_scale": 1.0},
    {"variant": "sdpa_gqa:graphs=manual", "status": "ok", "ms_p50": 2.0, "max_logit_diff": 0.5, "logit_scale": 1.0},
    {"variant": "sdpa", "status": "error", "error": "RuntimeError: no kernel"},
]  # fmt: skip


def test_the_pick_is_the_fastest_variant_whose_logits_agree():
    assert best_variant(ROWS)["variant"] == "triton:graphs=manual:BLOCK_N=128"  # sdpa_gqa is faster but disagrees
    assert best_variant(ROWS[3:]) is None
    assert pick_arguments(None) == ["", ""]
    with pytest.raises(ValueError, match="'bogus' is not valid; valid: sdpa, sdpa_gqa, flex, triton"):
        parse_variant("bogus")
    with pytest.raises(ValueError, match="'graphs=all' is not valid; valid: sdpa=auto"):
        parse_variant("flex:graphs=all")


def test_the_picked_overrides_resolve_to_the_variant():
    cli, overrides = pick_arguments(parse_variant(best_variant(ROWS)["variant"]))
    assert cli == "--decode-attention triton --sdpa auto --cuda-graphs manual --kernel-option BLOCK_N=128"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["compile=true", *overrides.split()])
    spec = resolve(cfg, cuda_available=True)
    assert (spec.decode_attention, spec.sdpa, spec.cuda_graphs) == ("triton", "auto", "manual")
    assert spec.kernel_options == {"BLOCK_N": 128}


def test_compare_hf_runs_a_picked_variant(tmp_path):
    """On the CPU with a formulation the CPU compiles (sdpa_gqa, math kernel): the kvbench row says what ran."""
    from bench import compare_hf, results

    cli, _ = pick_arguments(parse_variant("sdpa_gqa:sdpa=math"))
    argv = ["--systems", "kvbench", "--case", "512:1", "--compile", "true", "--new-tokens", "4", "--repeats", "1",
            "--results-dir", str(tmp_path), "--prefill-chunk", "256", *cli.split()]  # fmt: skip
    assert compare_hf.main(argv) == 0
    row = results.load(tmp_path / "compare_hf").iloc[0]
    assert row["status"] == "ok", row.get("error")
    assert (row["decode_attention"], row["decode_kernel"], row["prefill_chunk"]) == ("sdpa_gqa", "sdpa:math", 256)


@pytest.mark.parametrize("script", ["gpu_decode.sh", "gpu_decode_quick.sh", "gpu_harness.sh", "gpu_nvml_overhead.sh"])
def test_the_gpu_scripts_parse(script):
    """A syntax error would cost a whole device session: bash reads each script without running it."""
    import subprocess

    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_the_quick_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/gpu_decode_quick.sh with a tiny model and context, and the formulations the CPU compiles: the
    variants, the pick, compare_hf with it and the token check all run and leave their files in $OUT."""
    import os
    import subprocess

    env = {**os.environ, "MODEL": "tiny", "BIG": "512:2", "VARIANTS": "--variant sdpa --variant sdpa_gqa:sdpa=math",
           "OUT": str(tmp_path / "out"), "R": str(tmp_path / "results")}  # fmt: skip
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # its `python3`: this one
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_decode_quick.sh")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "fastest agreeing variant: sdpa" in log and log.rstrip().endswith("done"), log[-2000:]
    variants = (tmp_path / "out" / "decode_variants.jsonl").read_text().splitlines()
    assert len(variants) == 2 and all('"status": "ok"' in line for line in variants)
    tokens = (tmp_path / "out" / "compiled_vs_eager.jsonl").read_text()
    assert '"steps_agreeing": 64, "of": 64' in tokens
    assert (tmp_path / "out" / "results.tar.gz").stat().st_size > 0


def test_a_spent_budget_skips_the_remaining_steps_and_still_ends(tmp_path):
    """Each step's limit is cut to what is left of BUDGET, so the script ends (results packed, log closed) before
    the device call is cut; with nothing left every step is skipped and said so."""
    import os
    import subprocess

    env = {**os.environ, "MODEL": "tiny", "BIG": "512:2", "BUDGET": "0", "OUT": str(tmp_path / "out"),
           "R": str(tmp_path / "results")}  # fmt: skip
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_decode_quick.sh")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    skipped = [line for line in log.splitlines() if line.startswith("== skipped, the budget is spent: python3")]
    assert len(skipped) == 4 and log.rstrip().endswith("done"), log  # layout, variants, compare_hf, tokens


def test_the_attention_tune_rows_on_the_cpu(monkeypatch, capsys):
    """benchmarks/decode_attention_tune.py (the GPU script's last step) on the CPU: each formulation agrees with
    float32 SDPA over the filled slots, and the eager rows time both key-length patterns (the cuDNN graph-cache
    check on the GPU) with the kernel that runs here."""
    import json

    import decode_attention_tune

    monkeypatch.setattr(sys, "argv", ["decode_attention_tune.py", "--model", "tiny", "--case", "300:2"])
    decode_attention_tune.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in rows] == ["eager sdpa=math", "sdpa", "sdpa_gqa"]
    eager, *variants = rows
    assert "error" not in eager and eager["ms_same_length"] > 0 and eager["ms_growing_length"] > 0
    assert all(r["max_abs_err"] <= 1e-5 for r in variants), variants
