#!/usr/bin/env bash
# Issue 8's must-shows in about 4.5 minutes on the lent device (an estimate), for a session with little device time
# left; the full set is benchmarks/gpu_decode.sh. Steps, results packed into $OUT after each:
#   0. benchmarks/decode_gemm_layout.py --rows 4: the faster weight layout, used below;
#   1. benchmarks/decode_variants.py at 32k x 4: flex, sdpa_gqa (cuDNN first) and our Triton kernel, each captured
#      in one CUDA graph of ours; the fastest whose logits agree with the eager step's is used below;
#   2. python -m bench.compare_hf: kvbench with it against HF StaticCache + compile at 32k x 4, one process;
#   3. benchmarks/compiled_vs_eager.py with it: the same greedy tokens (float32, 64 steps).
# Run from the repository root, e.g. with the device tool:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH || exit; bash benchmarks/gpu_decode_quick.sh
source "$(dirname "$0")/gpu_common.sh"
BIG=${BIG:-32k:4}  # CTX:BATCH (a CPU dry run: MODEL=tiny BIG=1k:2 VARIANTS="--variant sdpa --variant sdpa_gqa")
CTX=${BIG%:*}
BATCH=${BIG#*:}
VARIANTS=${VARIANTS:---variant flex:graphs=manual --variant sdpa_gqa:graphs=manual --variant triton:graphs=manual}
machine

pick_layout "${LIMIT_GEMM:-45}"
# shellcheck disable=SC2086
pick_variant "${LIMIT_VARIANTS:-110}" $VARIANTS

compare_with_hf "${LIMIT_COMPARE:-110}" --case "$BIG"

check_tokens "${LIMIT_CHECK:-60}"
log done
