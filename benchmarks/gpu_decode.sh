#!/usr/bin/env bash
# Issue 8's GPU checks as one script for the lent device (../shared/device/README.md), about 8 minutes on an H200,
# most important first; results are packed into $OUT after every step, so a run cut short keeps what it did:
#   1. python -m bench.compare_hf: kvbench (compiled decode, CUDA graphs) against HF transformers StaticCache +
#      compile and DynamicCache, Llama-3.2-1B shape, bf16, ctx 8k batch 1 and ctx 32k batch 4, one process;
#   2. the harness with compile=true,false for dense and last_recent at ctx 32k batch 4 (mbu, and peaks from a
#      fresh process each: compare_hf's later rows share a process with the earlier systems' CUDA graph pools);
#   3. benchmarks/compiled_vs_eager.py: the compiled, CUDA-graph decode step against the eager one (tokens, ms/step);
#   4. benchmarks/profile_decode.py: kernels of the compiled step at 32k x 4, and the host's share of a step;
#   5. benchmarks/prefill_memory.py: one prefill chunk's temporaries at 32k x 4 (allocated, reserved);
#   6. dense int8 at 32k x 4, compile=true,false; 7. dense compile=true with expandable_segments=false.
# Writes $OUT/results.tar.gz (the sweep folders without Hydra's logs, and figures/), $OUT/log.txt, $OUT/*.jsonl.
# Run from the repository root, e.g. with the device tool:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH || exit; bash benchmarks/gpu_decode.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-llama-3.2-1b}
mkdir -p "$OUT"
R=/tmp/kvres
mkdir -p "$R"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
save() { tar -czf "$OUT/results.tar.gz" -C "$R" --exclude=hydra . 2>/dev/null; }
run_sweep() {  # limit, then bench.run overrides
  local limit=$1; shift
  log "python -m bench.run $*"
  timeout "$limit" python3 -m bench.run "$@" new_tokens=64 sweep=compiled results_dir=$R -m 2>&1 \
    | grep -v "it/s\]" | tee -a "$OUT/log.txt"
  save
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/log.txt"

log "python -m bench.compare_hf --model $MODEL --case 8k:1 --case 32k:4"
timeout "${LIMIT_COMPARE:-240}" python3 -m bench.compare_hf --model "$MODEL" --case 8k:1 --case 32k:4 \
  --systems kvbench,hf_static_compiled,hf_dynamic --new-tokens 64 --repeats 2 --results-dir $R 2>&1 \
  | grep -v "it/s\]" | tee -a "$OUT/log.txt"
python3 -m bench.plot $R/compare_hf --out $R/figures 2>&1 | tail -3 | tee -a "$OUT/log.txt"
save

run_sweep "${LIMIT_RUN:-160}" model="$MODEL" ctx=32k batch=4 cache=dense,last_recent compile=true,false

log "python benchmarks/compiled_vs_eager.py --model $MODEL --ctx 4096 --batch 2"
timeout "${LIMIT_CHECK:-130}" python3 benchmarks/compiled_vs_eager.py --model "$MODEL" --ctx 4096 --batch 2 2>&1 \
  | tee -a "$OUT/log.txt" "$OUT/compiled_vs_eager.jsonl"

log "python benchmarks/profile_decode.py --model $MODEL --ctx 32k --batch 4"
timeout "${LIMIT_PROFILE:-70}" python3 benchmarks/profile_decode.py --model "$MODEL" --ctx 32k --batch 4 2>&1 \
  | grep -v "^USDT\|^STAGE" | tee -a "$OUT/log.txt" "$OUT/profile_decode.jsonl"

log "python benchmarks/prefill_memory.py --model $MODEL --ctx 32k --batch 4"
timeout 60 python3 benchmarks/prefill_memory.py --model "$MODEL" --ctx 32k --batch 4 2>&1 \
  | tee -a "$OUT/log.txt" "$OUT/prefill_memory.jsonl"

run_sweep "${LIMIT_INT8:-120}" model="$MODEL" ctx=32k batch=4 cache=dense cache.buffer=int8 compile=true,false
run_sweep "${LIMIT_ALLOC:-90}" model="$MODEL" ctx=32k batch=4 cache=dense compile=true expandable_segments=false
log done
