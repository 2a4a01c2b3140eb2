#!/usr/bin/env bash
# The CPU figures of docs/benchmarks.md ("CPU") in one call, on an otherwise idle machine:
#
#   bash bench/cpu_run.sh [kernels] [model] [train] [cache] [breakdown]   # none named: all five, in that order
#
# kernels  python -m bench.kernels --quick (T = 8, T*N = 2^20) for float32 and bfloat16: the fused C kernels,
#          the reference eager and under torch.compile, SpikingJelly's CPU path, against a copy
# model    python -m bench.kernels --model small: the quick preset's training step, every CPU variant
# train    the quick preset (python -m train.run, what `make run` runs) timed end to end, with its
#          defaults and with --compile
# cache    the first step of a compiled run with an empty Inductor cache, then again with the cache
#          the first run left
# breakdown python -m bench.cpu_breakdown: the C kernels alone against the whole mt.lif step, 1 and 2 threads
#
# Environment: OUT (default runs/cpu-<UTC time>), PYTHON (default .venv/bin/python if present, else python3).
# Everything is written under $OUT; cpu.log has the machine's load before each stage, which says
# whether the figures were taken on an idle machine.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/cpu-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG="$OUT/cpu.log"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(kernels model train cache breakdown)
for stage in "${stages[@]}"; do
    case "$stage" in kernels|model|train|cache|breakdown) ;; *) echo "unknown stage '$stage': use kernels, model, train, cache or breakdown" >&2; exit 2 ;; esac
done

note() { echo "== $(date -u +%H:%M:%SZ) $* (load: $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$LOG"; }
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  stages: ${stages[*]}  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "cpu: $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | xargs), $(getconf _NPROCESSORS_ONLN) cores"
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'threads', torch.get_num_threads(), 'triton', triton.__version__)"
} | tee -a "$LOG"

for stage in "${stages[@]}"; do
    case "$stage" in
    kernels)
        note "kernels"
        "$PYTHON" -m bench.kernels --quick --dtype float32 bfloat16 --no-progress \
            --providers mpd_triton_cpu torch_eager torch_compile spikingjelly --out "$OUT/kernels" 2>&1 | tee -a "$LOG" ;;
    model)
        note "model"
        "$PYTHON" -m bench.kernels --model small --out "$OUT/model" 2>&1 | tee -a "$LOG" ;;
    train)
        for flags in "" "--compile"; do
            note "train.run ${flags:-(defaults)}"
            start=$(date +%s.%N)
            "$PYTHON" -m train.run $flags --out "$OUT/train${flags:+-compile}" 2>&1 | tee -a "$LOG"
            echo "wall: $(echo "$(date +%s.%N) - $start" | bc) s (train.run ${flags:-defaults})" | tee -a "$LOG"
        done ;;
    cache)
        cache=$(mktemp -d)
        for pass in "empty cache" "warm cache"; do
            note "first compiled step, $pass"
            TORCHINDUCTOR_CACHE_DIR=$cache "$PYTHON" -m bench.kernels --model small --providers mpd_triton_cpu_compile \
                --rep-ms 500 --out "$OUT/cache-${pass// /-}" 2>&1 | tee -a "$LOG"
        done
        rm -rf "$cache" ;;
    breakdown)
        note "breakdown"
        "$PYTHON" -m bench.cpu_breakdown --threads 1 2 --out "$OUT/breakdown.md" 2>&1 | tee -a "$LOG" ;;
    esac
done
note "done: $OUT"
