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
save() { tar -czf "$OUT/results.tar.gz" -C "$R" --exclude=hydra . 2>/dev/null; }
# the machine: GPU, and the host CPU and its load (launch-bound steps run at the host's pace)
machine() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"
  { grep -m1 "model name" /proc/cpuinfo; echo "cpus $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg)"; } \
    | tee -a "$OUT/log.txt"
}
