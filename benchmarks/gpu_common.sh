# Sourced by the GPU decode scripts: where results go, a timestamped log, and packing results into $OUT
# (what the device tool brings back) after every step, so a run cut short keeps what it did.
set -uo pipefail
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-llama-3.2-1b}
mkdir -p "$OUT"
R=${R:-/tmp/kvres}
mkdir -p "$R"
# noise the logs leave out: progress bars, inductor's warnings
QUIET="it/s\]\|warnings.warn\|UserWarning\|^$\|Online softmax\|split the reduction\|important use case\|^softmax"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
# Every step's time limit is cut to what is left of the script's budget (BUDGET seconds from its start; 570 by
# default: the device call's 600, less the wheel install), so that the script ends, its results packed, before the
# call is cut; a step with under 5 s left is skipped.
BUDGET=${BUDGET:-570}
within() {  # time limit, then the command: `timeout` with the limit cut to the budget left
  local limit=$1 left=$((BUDGET - SECONDS))
  shift
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "== skipped, the budget is spent: $*" >> "$OUT/log.txt"
    return 124
  fi
  timeout "$limit" "$@"
}
save() { tar -czf "$OUT/results.tar.gz" -C "$R" --exclude=hydra . 2>/dev/null; }
# the machine: GPU, and the host CPU and its load (launch-bound steps run at the host's pace)
machine() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"
  { grep -m1 "model name" /proc/cpuinfo; echo "cpus $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg)"; } \
    | tee -a "$OUT/log.txt"
}
# the faster weight layout of the step's products (benchmarks/decode_gemm_layout.py): sets LAYOUT
pick_layout() {  # time limit
  log "python benchmarks/decode_gemm_layout.py --model $MODEL --rows 4"
  within "$1" python3 benchmarks/decode_gemm_layout.py --model "$MODEL" --rows 4 2>&1 | grep "^{" \
    | tee -a "$OUT/log.txt" "$OUT/decode_gemm_layout.jsonl"
  LAYOUT=$(python3 benchmarks/decode_gemm_layout.py --pick "$OUT/decode_gemm_layout.jsonl")
  log "faster weight layout: $LAYOUT"
}
# the whole step per variant at CTX x BATCH (benchmarks/decode_variants.py), then the fastest agreeing one: sets
# HF_ARGS (bench.compare_hf arguments), RUN_ARGS (bench.run overrides) and VARIANT (empty if none ran)
pick_variant() {  # time limit, then decode_variants.py arguments
  local limit=$1; shift
  log "python benchmarks/decode_variants.py --ctx $CTX --batch $BATCH --weight-layout $LAYOUT $*"
  within "$limit" python3 benchmarks/decode_variants.py --model "$MODEL" --ctx "$CTX" --batch "$BATCH" \
    --steps 32 --weight-layout "$LAYOUT" "$@" 2>&1 | grep "^{" | tee -a "$OUT/log.txt" "$OUT/decode_variants.jsonl"
  local pick
  pick=$(python3 benchmarks/decode_variants.py --pick "$OUT/decode_variants.jsonl")
  HF_ARGS=$(sed -n 1p <<< "$pick")
  RUN_ARGS=$(sed -n 2p <<< "$pick")
  VARIANT=$(sed -n 3p <<< "$pick")
  log "fastest agreeing variant: ${VARIANT:-none ran: the defaults}"
}
# kvbench with the picked variant and layout against HF StaticCache + compile, one process (bench.compare_hf)
compare_with_hf() {  # time limit, then --case CTX:BATCH ...
  local limit=$1; shift
  log "python -m bench.compare_hf $* --prefill-chunk 1024 --weight-layout $LAYOUT $HF_ARGS"
  # shellcheck disable=SC2086
  within "$limit" python3 -m bench.compare_hf --model "$MODEL" "$@" --systems kvbench,hf_static_compiled \
    --new-tokens 64 --repeats 2 --prefill-chunk 1024 --results-dir "$R" --weight-layout "$LAYOUT" $HF_ARGS 2>&1 \
    | grep -v "$QUIET" | tee -a "$OUT/log.txt"
  save
}
# the picked variant's greedy tokens against the eager step's, float32, 64 steps (benchmarks/compiled_vs_eager.py)
check_tokens() {  # time limit
  log "python benchmarks/compiled_vs_eager.py --ctx 2048 --batch 2 --dtype float32 --variant ${VARIANT:-flex}"
  within "$1" python3 benchmarks/compiled_vs_eager.py --model "$MODEL" --ctx 2048 --batch 2 --caches dense \
    --dtype float32 --variant "${VARIANT:-flex}" --weight-layout "$LAYOUT" 2>&1 | grep "^{" \
    | tee -a "$OUT/log.txt" "$OUT/compiled_vs_eager.jsonl"
}
