#!/usr/bin/env bash
# The GPU checks of the harness issue, as one script for the lent device (see ../shared/device/README.md):
#   1. the users' command with model=${MODEL:-llama-3.2-1b} (batch 1 and 4), bf16, CUDA;
#   2. experiment=backend_matrix (which SDPA backend runs which phase; unsupported ones are rows);
#   3. the NVML sampler's cost: decode with the sampler thread off and at 2 ms.
# Writes $OUT/results.tar.gz (the sweep folders) and $OUT/log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
R=/tmp/kvres
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
run() { log "python -m bench.run $*"; timeout "${LIMIT:-200}" python3 -m bench.run "$@" results_dir=$R 2>&1 \
        | grep -v "it/s\]" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/log.txt"
LIMIT=150 run cache=dense,last_recent ctx=8k,32k model=${MODEL:-llama-3.2-1b} batch=1,4 -m
LIMIT=200 run experiment=backend_matrix model=${MODEL:-llama-3.2-1b} repeats=1 -m
LIMIT=90 run model=${MODEL:-llama-3.2-1b} ctx=8k new_tokens=128 repeats=3 nvml_period_ms=0,2 sweep=nvml_overhead -m
tar -czf "$OUT/results.tar.gz" -C "$R" --exclude=hydra .
log done
