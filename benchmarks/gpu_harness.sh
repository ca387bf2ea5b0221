#!/usr/bin/env bash
# The harness's GPU checks as one script for the lent device (see ../shared/device/README.md):
#   1. the users' command with model=llama-3.2-1b (batch 1 and 4), bf16, CUDA;
#   2. the NVML sampler's cost: decode with the sampler off and at 2 ms (two seeds each);
#   3. every cache at ctx 4k and 32k (h2o against dense, ...);
#   4. experiment=backend_matrix (which SDPA backend runs which phase; unsupported ones are rows).
# Writes $OUT/results.tar.gz (the sweep folders, without Hydra's logs) and $OUT/log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-llama-3.2-1b}
mkdir -p "$OUT"
R=/tmp/kvres
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
run() { log "python -m bench.run $*"; timeout "${LIMIT:-200}" python3 -m bench.run "$@" results_dir=$R 2>&1 \
        | grep -v "it/s\]" | tee -a "$OUT/log.txt"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/log.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/log.txt"
LIMIT=120 run cache=dense,last_recent ctx=8k,32k model=$MODEL batch=1,4 -m
LIMIT=90 run model=$MODEL ctx=8k new_tokens=256 repeats=3 nvml_period_ms=0,2 seed=0,1 sweep=nvml_overhead -m
LIMIT=150 run cache=dense,last_recent,h2o,tova,snapkv,qh2o ctx=4k,32k model=$MODEL new_tokens=64 sweep=caches -m
LIMIT=120 run experiment=backend_matrix model=$MODEL repeats=1 -m
tar -czf "$OUT/results.tar.gz" -C "$R" --exclude=hydra .
log done
