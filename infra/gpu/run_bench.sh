#!/usr/bin/env bash
# `loramux bench gpu` on a bare GPU machine, in one call, from the repo's tree: no install, no
# network. It needs python3 with torch (CUDA), triton, transformers, peft, safetensors and
# numpy; the engine's one other dependency, cachetools, comes from wheels/ (pure Python,
# imported from the wheel itself). Writes $OUT/bench-gpu.json (rewritten after each shape, so
# a run cut short keeps what it finished) and $OUT/bench-gpu.log; without OUT, bench-gpu.json
# in the repo and no log.
#
#   bash infra/gpu/run_bench.sh                       # the GPU run: both shapes, 8 min at most
#   bash infra/gpu/run_bench.sh --device cpu --quick  # a dry run on a CPU
#
# PYTHON picks the interpreter (default python3); BENCH_GPU_TIMEOUT_S bounds the run (480).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
out=${OUT:-$root}
log=${OUT:+$OUT/bench-gpu.log}
log=${log:-/dev/null}
limit_s=${BENCH_GPU_TIMEOUT_S:-480}
python=${PYTHON:-python3}
wheels=$(find "$root/infra/gpu/wheels" -name '*.whl' | sort | paste -sd: -)
export PYTHONPATH="$root/platform:$root/engine:$wheels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# The models go to a temporary directory: memory-backed when it has room for the 8B shape's
# 16 GB and its adapters, so that writing and reading them back costs no disk time.
shm_free_gb=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ')
if [ -z "${TMPDIR:-}" ] && [ "${shm_free_gb:-0}" -ge 24 ] 2>/dev/null; then
    export TMPDIR=/dev/shm
fi
mkdir -p "$out"
{
    echo "python $("$python" -c 'import sys; print(sys.version.split()[0])'), TMPDIR=${TMPDIR:-/tmp}"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
} 2>&1 | tee "$log"
cd "$root"
set +e
timeout --kill-after=15 "$limit_s" \
    "$python" -m loramux.cli bench gpu --json "$out/bench-gpu.json" "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "bench gpu: stopped after $limit_s s; bench-gpu.json holds the shapes it finished" |
        tee -a "$log"
fi
exit "$status"
