#!/usr/bin/env bash
# The GPU work of docs/benchmarks.md in one call: the test suite on the GPU (no interpreter), the kernel sweep and
# the VGG11 training step; everything it leaves is under $OUT (at most 7 files, none nested).
#
#   bash bench/device_run.sh [tests] [kernels] [model]     # no stage named: all three, in that order
#
# Environment:
#   OUT            where results go (the device tool sets it; default runs/device-<UTC time>)
#   KERNEL_ARGS    extra arguments for python -m bench.kernels (e.g. "--quick", "--T 4 8")
#   MODEL_ARGS     extra arguments for python -m bench.model_step (e.g. "--quick")
#   STAGE_TIMEOUT  seconds per stage (default 540); a stopped sweep still leaves the results saved so far
# SpikingJelly and loguru travel as wheels in .whl/ (docs/benchmarks.md); they are installed to /tmp/site.
#
# Files under $OUT: device.log (environment, every stage's output), pytest.log, results.json, results.md,
# kernel_results.tar.gz (plots and tables), model_results.json, model_results.md.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/device-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
LOG="$OUT/device.log"
STAGE_TIMEOUT=${STAGE_TIMEOUT:-540}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the compiled kernels, on the GPU

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests kernels model)
for stage in "${stages[@]}"; do
    case "$stage" in tests|kernels|model) ;; *) echo "unknown stage '$stage': use tests, kernels or model" >&2; exit 2 ;; esac
done

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  stages: ${stages[*]}  commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    "$PYTHON" -c "import importlib.metadata as m; print('spikingjelly', m.version('spikingjelly'))" 2>/dev/null \
        || echo "spikingjelly: not installed (carry it as a wheel: docs/benchmarks.md); its provider will be skipped"
} 2>&1 | tee -a "$LOG"

# run_stage NAME LOGFILE COMMAND...: time-limited, output to the terminal and LOGFILE
run_stage() {
    local name=$1 log=$2 start rc
    shift 2
    echo "== $name: $*" | tee -a "$LOG"
    start=$(date +%s)
    timeout "$STAGE_TIMEOUT" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $(( $(date +%s) - start )) s$([ "$rc" = 124 ] && echo ' (stopped at STAGE_TIMEOUT)')" | tee -a "$LOG"
}

for stage in "${stages[@]}"; do
    case "$stage" in
    tests)
        run_stage tests "$OUT/pytest.log" "$PYTHON" -m pytest -q -p no:cacheprovider --maxfail=20
        ;;
    kernels)
        # shellcheck disable=SC2086  # KERNEL_ARGS is a list of arguments
        run_stage kernels "$LOG" "$PYTHON" -m bench.kernels --no-progress --out "$WORK/kernels" ${KERNEL_ARGS:-}
        cp "$WORK"/kernels/results.json "$WORK"/kernels/results.md "$OUT"/ 2>/dev/null
        [ -d "$WORK/kernels" ] && tar czf "$OUT/kernel_results.tar.gz" -C "$WORK/kernels" .  # plots, with the tables
        ;;
    model)
        # shellcheck disable=SC2086
        run_stage model "$LOG" "$PYTHON" -m bench.model_step --model vgg11 --out "$WORK/model" ${MODEL_ARGS:-}
        cp "$WORK"/model/model_results.json "$WORK"/model/model_results.md "$OUT"/ 2>/dev/null
        ;;
    esac
done
ls -l "$OUT"
