#!/usr/bin/env bash
# Issue 8's GPU checks as one script for the lent device (../shared/device/README.md), about 8 minutes on an H200:
#   0. benchmarks/compiled_vs_eager.py: the compiled, CUDA-graph decode step against the eager one (tokens, ms/step);
#   1. python -m bench.compare_hf: kvbench (compiled decode, CUDA graphs) against HF transformers StaticCache +
#      compile and DynamicCache, Llama-3.2-1B shape, bf16, ctx 8k batch 1 and ctx 32k batch 4, one process;
#   2. the harness with compile=true,false for dense, last_recent and dense int8 at ctx 32k batch 4 (mbu, peaks).
# Writes $OUT/results.tar.gz (the sweep folders, without Hydra's logs) and $OUT/log.txt.
# Run from the repository root, e.g. with the device tool:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH || exit; bash benchmarks/gpu_decode.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-llama-3.2-1b}
mkdir -p "$OUT"
R=/tmp/kvres
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/log.txt"

log "python benchmarks/compiled_vs_eager.py --model $MODEL --ctx 4096 --batch 2"
timeout "${LIMIT_CHECK:-150}" python3 benchmarks/compiled_vs_eager.py --model "$MODEL" --ctx 4096 --batch 2 2>&1 \
  | tee -a "$OUT/log.txt" "$OUT/compiled_vs_eager.jsonl"

log "python -m bench.compare_hf --model $MODEL --case 8k:1 --case 32k:4"
timeout "${LIMIT_COMPARE:-300}" python3 -m bench.compare_hf --model "$MODEL" --case 8k:1 --case 32k:4 \
  --systems kvbench,hf_static_compiled,hf_dynamic --new-tokens 64 --repeats 2 --results-dir $R 2>&1 \
  | grep -v "it/s\]" | tee -a "$OUT/log.txt"

log "python -m bench.run model=$MODEL ctx=32k batch=4 cache=dense,last_recent compile=true,false -m"
timeout "${LIMIT_RUN:-200}" python3 -m bench.run model="$MODEL" ctx=32k batch=4 cache=dense,last_recent \
  compile=true,false new_tokens=64 sweep=compiled results_dir=$R -m 2>&1 | grep -v "it/s\]" | tee -a "$OUT/log.txt"
log "python -m bench.run model=$MODEL ctx=32k batch=4 cache=dense cache.buffer=int8 compile=true,false -m"
timeout "${LIMIT_RUN:-120}" python3 -m bench.run model="$MODEL" ctx=32k batch=4 cache=dense cache.buffer=int8 \
  compile=true,false new_tokens=64 sweep=compiled results_dir=$R -m 2>&1 | grep -v "it/s\]" | tee -a "$OUT/log.txt"

tar -czf "$OUT/results.tar.gz" -C "$R" --exclude=hydra .
python3 -m bench.plot $R/compare_hf --out "$OUT/figures" 2>&1 | tail -3 | tee -a "$OUT/log.txt"
log done
