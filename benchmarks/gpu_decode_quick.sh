#!/usr/bin/env bash
# Issue 8's must-shows in under 4 minutes on the lent device, for a session with little device time left (the
# full set is benchmarks/gpu_decode.sh). Steps, each in a fresh process, results packed into $OUT after each:
#   1. dense, ctx 32k, batch 4, compiled decode (decode_attention=auto: FlexAttention on CUDA): ms/step, mbu, peaks;
#   2. the same at ctx 8k, batch 1;
#   3. compiled against eager tokens, float32 (no bf16 near-ties), dense, ctx 2k, batch 2, 64 steps;
#   4. dense 32k x 4 with decode_attention=sdpa (grouped-query SDPA under a mask), to compare the formulations.
# Run from the repository root, e.g. with the device tool:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH || exit; bash benchmarks/gpu_decode_quick.sh
source "$(dirname "$0")/gpu_common.sh"
run_one() {  # limit, then bench.run overrides
  local limit=$1; shift
  log "python -m bench.run $*"
  timeout "$limit" python3 -m bench.run model="$MODEL" cache=dense compile=true new_tokens=64 sweep=compiled_flex \
    results_dir=$R "$@" 2>&1 | grep -v "$QUIET" | tee -a "$OUT/log.txt"
  save
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"

run_one "${LIMIT_32K:-110}" ctx=32k batch=4
run_one "${LIMIT_8K:-70}" ctx=8k batch=1

log "python benchmarks/compiled_vs_eager.py --model $MODEL --ctx 2048 --batch 2 --caches dense --dtype float32"
timeout "${LIMIT_CHECK:-60}" python3 benchmarks/compiled_vs_eager.py --model "$MODEL" --ctx 2048 --batch 2 \
  --caches dense --dtype float32 2>&1 | grep -v "warnings.warn\|UserWarning" \
  | tee -a "$OUT/log.txt" "$OUT/compiled_vs_eager.jsonl"

run_one "${LIMIT_SDPA:-70}" ctx=32k batch=4 decode_attention=sdpa
log done
