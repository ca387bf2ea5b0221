#!/usr/bin/env bash
# What the NVML sampler costs a decode step: the same job with the sampler off (nvml_period_ms=0) and at 2 ms,
# four seeds each, Llama-3.2-1B shape, ctx 8k, 256 steps x 3 repeats. Writes $OUT/results.tar.gz, $OUT/log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
R=/tmp/kvres
timeout 200 python3 -m bench.run model=llama-3.2-1b ctx=8k new_tokens=256 repeats=3 nvml_period_ms=${PERIODS:-0,2} \
  seed=${SEEDS:-0,1,2,3} sweep=${SWEEP:-nvml_overhead} results_dir=$R -m 2>&1 | grep -v "it/s\]" | tee -a "$OUT/log.txt"
[ -n "${SKIP_MATRIX:-}" ] || timeout 60 python3 -m bench.run experiment=backend_matrix model=llama-3.2-1b repeats=1 sdpa=eager prefill_chunk=32768 \
  ctx=32k results_dir=$R -m 2>&1 | grep -v "it/s\]" | tee -a "$OUT/log.txt"
tar -czf "$OUT/results.tar.gz" -C "$R" --exclude=hydra .
