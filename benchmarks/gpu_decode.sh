#!/usr/bin/env bash
# Issue 8's GPU checks as one script for the lent device (../shared/device/README.md): at most 9.5 minutes (its
# budget), most important first; results are packed into $OUT after every step, so a run cut short keeps what it did.
# On an H200 (run 3, results/baselines/h200/README.md) steps 0-3 took 9 minutes and the budget skipped 4-7:
#   0. benchmarks/decode_gemm_layout.py --rows 4: the step's weight products alone, stored (in, out) as loaded or
#      (out, in) for F.linear; the faster layout is used below;
#   1. benchmarks/decode_variants.py: the whole compiled step at 32k x 4 for each attention formulation (flex,
#      SDPA with cuDNN first, our Triton kernel) and capture (graph trees, manual), in one process: ms/step, mbu,
#      attention's share of device time, logits against the eager step; the fastest agreeing one is used below;
#   2. python -m bench.compare_hf: kvbench with that variant against HF transformers StaticCache + compile,
#      Llama-3.2-1B shape, bf16, ctx 32k batch 4 then ctx 8k batch 1, one process, prefill chunks of 1024 tokens:
#      speed against HF from the same run, mbu, peak allocated and NVML memory (every must-show but the tokens);
#      32k x 4 first, so that its NVML figure holds no kernel images loaded by an earlier system;
#   3. benchmarks/compiled_vs_eager.py with that variant: the same greedy tokens (float32, 64 steps); then the
#      variant at the small case with its slowest kernels (where a batch-1 step's time goes);
#   4. benchmarks/decode_variants.py on an int8 buffer: our Triton kernel reading the codes against that variant;
#   5. the harness: last_recent at 32k x 4 with that variant, and h2o's compiled step (caches/scored.py, not yet
#      run on a GPU) against its eager one at 8k x 4; then h2o's greedy tokens, compiled against eager (float32);
#   6. the harness, eager: prefill chunks through flash (its bottom-right causal flag, no mask) against auto;
#   7. benchmarks/decode_attention_tune.py: eager cuDNN and flash at a fixed and a growing key length (does cuDNN
#      build a graph per new length?), then one layer's attention alone per formulation and kernel options.
# Each step's limit is cut to what is left of BUDGET (570 s: gpu_common.sh), so the whole ends inside one call.
# Writes $OUT/results.tar.gz (the sweep folders without Hydra's logs), $OUT/log.txt, $OUT/*.jsonl.
# Run from the repository root, e.g. with the device tool:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH || exit; bash benchmarks/gpu_decode.sh
# A CPU dry run of the whole flow: MODEL=tiny BIG=1k:2 SMALL=512:1 OUT=/tmp/out R=/tmp/res bash benchmarks/gpu_decode.sh
source "$(dirname "$0")/gpu_common.sh"
BIG=${BIG:-32k:4}  # CTX:BATCH of the must-shows
SMALL=${SMALL:-8k:1}
CTX=${BIG%:*}
BATCH=${BIG#*:}
machine
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/log.txt"

pick_layout "${LIMIT_GEMM:-60}"
pick_variant "${LIMIT_VARIANTS:-200}" --top 5

compare_with_hf "${LIMIT_COMPARE:-240}" --case "$BIG" --case "$SMALL"

check_tokens "${LIMIT_CHECK:-70}"

# the picked variant at the small case too, with its slowest kernels: where a batch-1 step's time goes (appended to
# decode_variants.jsonl, after the pick)
log "python benchmarks/decode_variants.py --ctx ${SMALL%:*} --batch ${SMALL#*:} --variant ${VARIANT:-flex} --top 8"
within "${LIMIT_SMALL:-60}" python3 benchmarks/decode_variants.py --model "$MODEL" --ctx "${SMALL%:*}" \
  --batch "${SMALL#*:}" --steps 32 --weight-layout "$LAYOUT" --variant "${VARIANT:-flex}" --top 8 2>&1 | grep "^{" \
  | tee -a "$OUT/log.txt" "$OUT/decode_variants.jsonl"

log "python benchmarks/decode_variants.py --buffer int8 --ctx $CTX --batch $BATCH"
within "${LIMIT_INT8:-80}" python3 benchmarks/decode_variants.py --model "$MODEL" --ctx "$CTX" --batch "$BATCH" \
  --buffer int8 --steps 32 --weight-layout "$LAYOUT" --variant triton:graphs=manual --variant "${VARIANT:-flex}" \
  2>&1 | grep "^{" | tee -a "$OUT/log.txt" "$OUT/decode_variants_int8.jsonl"

log "python -m bench.run ctx=$CTX batch=$BATCH cache=last_recent compile=true $RUN_ARGS"
# shellcheck disable=SC2086
within "${LIMIT_MORE:-60}" python3 -m bench.run model="$MODEL" new_tokens=64 sweep=decode results_dir="$R" \
  ctx="$CTX" batch="$BATCH" cache=last_recent compile=true prefill_chunk=1024 weight_layout="$LAYOUT" $RUN_ARGS \
  2>&1 | grep -v "$QUIET" | tee -a "$OUT/log.txt"
# h2o at the small case's context (its eager prefill attends the whole prompt to score it: 16x less work at 8k)
log "python -m bench.run ctx=${SMALL%:*} batch=$BATCH cache=h2o compile=true,false"
within "${LIMIT_SCORED:-90}" python3 -m bench.run model="$MODEL" new_tokens=64 sweep=decode results_dir="$R" \
  ctx="${SMALL%:*}" batch="$BATCH" cache=h2o compile=true,false prefill_chunk=1024 weight_layout="$LAYOUT" -m \
  2>&1 | grep -v "$QUIET" | tee -a "$OUT/log.txt"
save

log "python benchmarks/compiled_vs_eager.py --ctx 2048 --batch 2 --dtype float32 --caches h2o"
within "${LIMIT_CHECK_SCORED:-60}" python3 benchmarks/compiled_vs_eager.py --model "$MODEL" --ctx 2048 --batch 2 \
  --caches h2o --dtype float32 --weight-layout "$LAYOUT" 2>&1 | grep "^{" \
  | tee -a "$OUT/log.txt" "$OUT/compiled_vs_eager.jsonl"

# eager, prefill chunks through flash's bottom-right causal flag (no cuDNN, no mask) against auto (cuDNN for masked
# chunks): prefill time, and NVML less reserved with and without cuDNN's kernels loaded
log "python -m bench.run ctx=$CTX batch=$BATCH sdpa=flash,auto compile=false"
within "${LIMIT_FLASH:-50}" python3 -m bench.run model="$MODEL" new_tokens=16 sweep=flash_chunks results_dir="$R" \
  ctx="$CTX" batch="$BATCH" sdpa=flash,auto compile=false prefill_chunk=1024 -m 2>&1 | grep -v "$QUIET" \
  | tee -a "$OUT/log.txt"
save

log "python benchmarks/decode_attention_tune.py --case $BIG"
within "${LIMIT_TUNE:-70}" python3 benchmarks/decode_attention_tune.py --model "$MODEL" --case "$BIG" 2>&1 \
  | grep "^{" | tee -a "$OUT/log.txt" "$OUT/decode_attention_tune.jsonl"
log done
