#!/usr/bin/env bash
# The GPU checks of one device session, in priority order, each step bounded so that the later ones still run:
#   BUDGET=540 bash benchmarks/gpu_round2.sh      # on the GPU machine; rows, logs and figures go to $OUT
#   SMALL=1 OUT=/tmp/dry PYTHON=.venv/bin/python bash benchmarks/gpu_round2.sh   # a dry run on a CPU, tiny sizes
# The GPU machine needs torch with CUDA and the project's Python dependencies on its path (hydra-core, omegaconf,
# pandas, pyarrow, gguf); nothing is downloaded. HF_S and CAP_S override the hf and capacity steps' limits (s).
# Steps: (1) the users' command with the shipped defaults; (2) decode at 32k x 4 and 8k x 1 with a profile of the
# step; (3) the score-based caches' compiled step against the eager one (tokens, then time at 32k x 4); (4) int8
# and int4 buffers through the compiled step; (5) HF's systems beside ours at both decode shapes; (6) prefill at
# 32k x 1 beside HF; (7) capacity at 8 and 16 GiB; (8) HF's offloaded and quantized caches beside its dynamic one
# (the device memory offloading saves, the step time it costs) and kvpress's presses beside ours, where the machine
# has transformers, optimum-quanto and kvpress. A step cut by its time limit leaves its rows so far.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder the results go to}
BUDGET=${BUDGET:-540}
START=$SECONDS
R=$OUT/results
mkdir -p "$R"
if [ -n "${SMALL:-}" ]; then
    M="model=tiny"; BIG=2k; MID=1k; B4=2; MEM="memory=24MiB,32MiB max=8k"; EXTRA="--model tiny --ctx 1024 --batch 2 --dtype float32"
    PROFILE="--model tiny --ctx 1k --batch 2"
else
    M="model=llama-3.2-1b dtype=bfloat16"; BIG=32k; MID=8k; B4=4; MEM="memory=8GiB,16GiB"; EXTRA="--ctx 8192 --batch 4 --dtype float32"
    PROFILE=""
fi

step() {  # step NAME SECONDS COMMAND...: run it with the time left, at most SECONDS, logging to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    [ "$left" -lt 20 ] && { echo "skip $name: no time left" | tee -a "$OUT/summary.log"; return; }
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s (limit $limit)" | tee -a "$OUT/summary.log"
}

py=${PYTHON:-python3}
step users 90 $py -m bench.run cache=dense,last_recent ctx=8k,32k results_dir="$R" sweep=users -m
step decode 90 $py -m bench.run $M cache=dense ctx=$BIG batch=$B4 new_tokens=128 repeats=3 results_dir="$R" \
    sweep=decode
step decode_8k 60 $py -m bench.run $M cache=dense ctx=$MID batch=1 new_tokens=128 repeats=3 results_dir="$R" \
    sweep=decode
step profile 60 $py benchmarks/profile_decode.py $PROFILE
step tokens 90 $py benchmarks/compiled_vs_eager.py $EXTRA --caches h2o,tova,snapkv
step scored 90 $py -m bench.run $M cache=dense,h2o,tova,snapkv compile=true ctx=$BIG batch=$B4 new_tokens=64 \
    results_dir="$R" sweep=scored -m
step quantized 60 $py -m bench.run $M cache=dense cache.buffer=int8,int4 compile=true ctx=$BIG batch=$B4 \
    new_tokens=64 results_dir="$R" sweep=quantized -m
step hf ${HF_S:-120} $py -m bench.run $M system=kvbench,hf_static_compiled,hf_static cache=dense ctx=$MID,$BIG batch=1,$B4 \
    new_tokens=32 results_dir="$R" sweep=hf -m
step prefill 60 $py -m bench.run $M system=kvbench,hf_dynamic cache=dense ctx=$BIG batch=1 new_tokens=1 repeats=1 \
    results_dir="$R" sweep=prefill -m
step capacity ${CAP_S:-120} $py -m bench.capacity $M cache=dense,last_recent,h2o,snapkv $MEM batch=1 results_dir="$R" \
    sweep=capacity
step peers 90 $py -m bench.run $M system=hf_dynamic,hf_offloaded,hf_quantized cache=dense ctx=$MID batch=1 \
    new_tokens=32 results_dir="$R" sweep=peers -m
step presses 60 $py -m bench.run $M system=kvpress cache=dense press=knorm,snapkv cache.budget=0.25 ctx=$MID batch=1 \
    new_tokens=32 results_dir="$R" sweep=peers -m
find "$R" -name hydra -type d -prune -exec rm -rf {} +
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$R"
echo "total $((SECONDS - START)) s" | tee -a "$OUT/summary.log"
