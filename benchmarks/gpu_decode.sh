#!/usr/bin/env bash
# Issue 8's GPU checks as one script for the lent device (../shared/device/README.md), an estimated 9-10 minutes
# on an H200 (not run yet), most important first; results are packed into $OUT after every step, so a run cut short keeps what it did:
#   1. benchmarks/flex_decode_tune.py: one layer's decode attention through FlexAttention for a grid of kernel
#      options, against SDPA flash/cudnn; the fastest option set at 32k x 4 is used by the steps below;
#   2. python -m bench.compare_hf: kvbench (compiled decode, CUDA graphs, flex) against HF transformers StaticCache
#      + compile, Llama-3.2-1B shape, bf16, ctx 8k batch 1 and ctx 32k batch 4, one process (the 3x must-show);
#   3. the harness, dense 32k x 4, each job a fresh process (peaks, NVML, mbu): cuda_graphs=trees and manual;
#   4. benchmarks/profile_decode.py: kernels and host time of the compiled step at 32k x 4;
#   5. benchmarks/compiled_vs_eager.py with cuda_graphs=manual: the same tokens (float32);
#   6. the harness at 8k x 1 (trees, manual), dense 32k x 4 with prefill_chunk=1024 (NVML), and last_recent and
#      int8 at 32k x 4, compiled.
# Writes $OUT/results.tar.gz (the sweep folders without Hydra's logs), $OUT/log.txt, $OUT/*.jsonl.
# Run from the repository root, e.g. with the device tool:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH || exit; bash benchmarks/gpu_decode.sh
source "$(dirname "$0")/gpu_common.sh"
run_sweep() {  # limit, then bench.run overrides
  local limit=$1; shift
  log "python -m bench.run $*"
  timeout "$limit" python3 -m bench.run model="$MODEL" new_tokens=64 sweep=decode results_dir=$R "$@" -m 2>&1 \
    | grep -v "$QUIET" | tee -a "$OUT/log.txt"
  save
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"

log "python benchmarks/flex_decode_tune.py --model $MODEL"
timeout "${LIMIT_TUNE:-120}" python3 benchmarks/flex_decode_tune.py --model "$MODEL" 2>&1 | grep "^{" \
  | tee -a "$OUT/log.txt" "$OUT/flex_decode_tune.jsonl"
# the fastest flex option set at 32k x 4 (none if the default won or nothing ran)
BEST=$(python3 - "$OUT/flex_decode_tune.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
rows = [r for r in rows if r["ctx"] == 32768 and r["variant"].startswith("flex") and "us" in r]
best = min(rows, key=lambda r: r["us"], default=None)
options = (best or {}).get("options") or {}
print(" ".join(f"{k}={v}" for k, v in options.items()))
PY
)
log "fastest flex options at 32k x 4: ${BEST:-the inductor defaults}"
HF_OPTS=$(for o in $BEST; do printf -- "--kernel-option %s " "$o"; done)
RUN_OPTS=$(for o in $BEST; do printf "kernel_options.%s " "$o"; done)

log "python -m bench.compare_hf --model $MODEL --case 8k:1 --case 32k:4 $HF_OPTS"
timeout "${LIMIT_COMPARE:-240}" python3 -m bench.compare_hf --model "$MODEL" --case 8k:1 --case 32k:4 \
  --systems kvbench,hf_static_compiled --new-tokens 64 --repeats 2 --results-dir $R $HF_OPTS 2>&1 \
  | grep -v "$QUIET" | tee -a "$OUT/log.txt"
save

# shellcheck disable=SC2086
run_sweep "${LIMIT_RUN:-100}" ctx=32k batch=4 cache=dense compile=true cuda_graphs=trees,manual $RUN_OPTS

log "python benchmarks/profile_decode.py --model $MODEL --ctx 32k --batch 4"
timeout "${LIMIT_PROFILE:-70}" python3 benchmarks/profile_decode.py --model "$MODEL" --ctx 32k --batch 4 2>&1 \
  | grep "^{" | tee -a "$OUT/log.txt" "$OUT/profile_decode.jsonl"

log "python benchmarks/compiled_vs_eager.py --model $MODEL --ctx 2048 --batch 2 --caches dense --dtype float32 --graphs manual"
timeout "${LIMIT_CHECK:-60}" python3 benchmarks/compiled_vs_eager.py --model "$MODEL" --ctx 2048 --batch 2 \
  --caches dense --dtype float32 --graphs manual 2>&1 | grep "^{" | tee -a "$OUT/log.txt" "$OUT/compiled_vs_eager.jsonl"

# shellcheck disable=SC2086
run_sweep "${LIMIT_8K:-80}" ctx=8k batch=1 cache=dense compile=true cuda_graphs=trees,manual $RUN_OPTS
# shellcheck disable=SC2086
run_sweep "${LIMIT_CHUNK:-50}" ctx=32k batch=4 cache=dense compile=true prefill_chunk=1024 $RUN_OPTS
# shellcheck disable=SC2086
run_sweep "${LIMIT_MORE:-150}" ctx=32k batch=4 cache=last_recent,dense cache.buffer=float,int8 compile=true $RUN_OPTS
log done
