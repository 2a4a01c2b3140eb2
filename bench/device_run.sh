#!/usr/bin/env bash
# The GPU measurement of docs/benchmarks.md in one command of at most 8 minutes (one call of the device
# machine, whose commands may run 10):
#
#   bash bench/device_run.sh [--dry] [tests] [kernels] [model]    # no stage named: all three, in this order
#   bash bench/device_run.sh --plan gpu|dry [stage ...]            # print the stages' commands, run nothing
#
# tests    GPU correctness: pytest -m gpu, the marked subset of the suite (the compiled kernels against the
#          reference: forward, backward, statistics, MPD term, per-channel surrogate parameter, float32 /
#          bfloat16 / float16, strided and channels-last input; torch.compile(fullgraph=True) of small models
#          with the Triton kernels; opcheck of the custom ops), on pytest-xdist workers where it is installed
# kernels  python -m bench.kernels: forward, backward and both, statistics off and on, float32 and bfloat16,
#          T 8 and 4, T*N 2^27 and 2^24 (the targets' case first): mpd_triton, SpikingJelly's Triton LIF
#          (plain and with PyTorch statistics), the reference eager and compiled, against the copy timed in
#          the same run
# model    python -m bench.model_step: VGG11, T = 8, batch 64, 32 x 32 random images, MPD-SGR: mpd_triton,
#          spikingjelly, the reference, eager and under torch.compile, with peak memory
#
# Without CUDA it is a dry run (forced with --dry or DEVICE_RUN_DRY=1): the same stages at tiny sizes, the
# Triton kernels in the interpreter, the GPU tests collected but not run. tests/bench/test_device_run.py runs it in
# CI, so a broken script is found there and not on the GPU.
#
# Each stage is stopped at its budget, and what it finished stays saved (the sweep writes results.json after
# every size, the model step model_results.json after every variant, pytest prints each test's outcome);
# no stage starts or runs past GUARD seconds from the start, less the summary's share and the kill grace, so
# the whole command ends within GUARD.
#
# Environment: OUT (default runs/device-<UTC time>), PYTHON (default .venv/bin/python if present, else
# python3), COMMIT (the commit measured, for a copy without .git), DEVICE_RUN_DRY=1, KERNEL_ARGS / MODEL_ARGS
# (extra arguments, appended), BUDGET_* and GUARD (seconds) to override the values below.
# Wheels in .whl/ (docs/benchmarks.md: SpikingJelly 2.0 and loguru) are installed, those not installed already,
# into a scratch folder put on PYTHONPATH.
#
# $OUT gets at most 8 files, none in a folder: summary.md (read it first: stages, targets met or missed,
# tables), device.log (everything printed), pytest.log, results.json, model_results.json, extras.tar.gz
# (plots, the benchmarks' markdown, the tests' junit XML).
set -uo pipefail
cd "$(dirname "$0")/.."

# Budgets in seconds: written here only (tests/bench/test_device_run.py reads these lines). The three stages and the
# setup (wheels, the machine's record, the summary) add up to 480 s; GUARD bounds the whole command.
BUDGET_TESTS=${BUDGET_TESTS:-150}
BUDGET_KERNELS=${BUDGET_KERNELS:-180}
BUDGET_MODEL=${BUDGET_MODEL:-120}
BUDGET_SETUP=${BUDGET_SETUP:-30}
GUARD=${GUARD:-540}
SUMMARY_LIMIT=${SUMMARY_LIMIT:-45}  # the summary's share of GUARD: no stage runs into it
KILL_GRACE=${KILL_GRACE:-10}        # a stage that ignores the stop is killed this much later

START=$(date +%s)
DEADLINE=$((START + GUARD - SUMMARY_LIMIT - KILL_GRACE))
DRY=${DEVICE_RUN_DRY:-0}
ARGS="$*"
PLAN=""
stages=()
while [ $# -gt 0 ]; do
    case "$1" in
    --dry) DRY=1 ;;
    --plan) PLAN=${2:-}; shift ;;  # --plan gpu|dry: print each stage's command in that mode, run nothing
    tests|kernels|model) stages+=("$1") ;;
    *) echo "unknown argument '$1': use --dry, --plan gpu|dry, tests, kernels or model" >&2; exit 2 ;;
    esac
    shift
done
[ ${#stages[@]} -eq 0 ] && stages=(tests kernels model)
case "$PLAN" in ""|gpu|dry) ;; *) echo "--plan takes gpu or dry, not '$PLAN'" >&2; exit 2 ;; esac

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1

# stage_command STAGE MODE: the stage's command in mode gpu or dry, into the array cmd.
stage_command() {
    local stage=$1 mode=$2 workers
    case "$stage" in
    tests)
        cmd=("$PYTHON" -m pytest -m gpu -p no:cacheprovider tests)
        if [ "$mode" = dry ]; then
            cmd+=(--co -q)  # the selection only: the suite runs these tests in CI, under the interpreter
        else
            cmd+=(-v -rfEs --tb=short --maxfail=30 --junitxml="$WORK/junit.xml")
            workers=$(($(nproc) / 2 < 8 ? $(nproc) / 2 : 8))
            if [ "$workers" -ge 2 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then cmd+=(-n "$workers"); fi
            if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then cmd+=(--timeout 120); fi
        fi
        ;;
    kernels)
        cmd=("$PYTHON" -m bench.kernels --no-progress --out "$WORK/kernels" --dtype float32 bfloat16
             --providers mpd_triton spikingjelly torch_eager torch_compile --compile-T 8 --compile-sizes 2^27
             --copy start)
        if [ "$mode" = dry ]; then  # torch.compile is planned at 2^27 only: skipped here, with the reason
            cmd+=(--T 8 --sizes 2^10 --warmup-ms 1 --rep-ms 1)
        else
            cmd+=(--T 8 4 --sizes 2^27 2^24)
        fi
        # shellcheck disable=SC2206  # KERNEL_ARGS is a list of arguments
        cmd+=(${KERNEL_ARGS:-})
        ;;
    model)
        cmd=("$PYTHON" -m bench.model_step --model vgg11 --out "$WORK/model")
        if [ "$mode" = dry ]; then  # compiling the model takes minutes on a small CPU: the eager variants only
            cmd+=(--width 4 --T 2 --batch 1 --image-size 8 --warmup-ms 1 --rep-ms 1
                  --providers mpd_triton spikingjelly torch_eager)
        else
            cmd+=(--T 8 --batch 64 --image-size 32 --warmup-ms 200 --rep-ms 1000
                  --providers mpd_triton spikingjelly torch_eager mpd_triton_compile torch_compile)
        fi
        # shellcheck disable=SC2206
        cmd+=(${MODEL_ARGS:-})
        ;;
    esac
}

if [ -n "$PLAN" ]; then  # one line per stage: its name, then its command's words, shell-quoted
    for stage in "${stages[@]}"; do
        stage_command "$stage" "$PLAN"
        printf '%s:' "$stage"
        printf ' %q' "${cmd[@]}"
        printf '\n'
    done
    exit 0
fi

OUT=${OUT:-runs/device-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
LOG="$OUT/device.log"

# limit SECONDS: the seconds a step may run, SECONDS clipped to what is left before the deadline (at least 1:
# `timeout 0` would mean no limit)
limit() {
    local left=$((DEADLINE - $(date +%s)))
    left=$(($1 < left ? $1 : left))
    echo $((left < 1 ? 1 : left))
}

say() { echo "$*" | tee -a "$LOG"; }
say "== bench/device_run.sh $ARGS (stages: ${stages[*]}; budgets: tests $BUDGET_TESTS s, kernels $BUDGET_KERNELS s," \
    "model $BUDGET_MODEL s, setup $BUDGET_SETUP s; guard $GUARD s)"

# The wheels of .whl/ that this Python lacks (the device image has pytest, xdist and the rest: docs/benchmarks.md).
if compgen -G ".whl/*.whl" >/dev/null; then
    missing=$(timeout "$(limit 60)" "$PYTHON" - .whl/*.whl <<'EOF'
import importlib.metadata as metadata
import os
import sys

for path in sys.argv[1:]:
    name = os.path.basename(path).split("-")[0]
    try:
        print(f"{name} {metadata.version(name)} is installed already: {path} left alone", file=sys.stderr)
    except metadata.PackageNotFoundError:
        print(path)
EOF
    )
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086  # one path per word
        if timeout "$(limit 60)" "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/site" $missing 2>&1 | tee -a "$LOG"; then
            export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
            say "installed from .whl/: $(echo $missing | xargs -n1 basename | tr '\n' ' ')"
        else
            say "could not install the wheels of .whl/ (the stages go on; a missing peer is skipped with its reason)"
        fi
    fi
fi

# The machine's record: commit, kernel source, GPU, versions, and whether CUDA is here.
{
    if [ -n "${COMMIT:-}" ]; then
        echo "commit: $COMMIT (given by COMMIT)"
    elif c=$(git rev-parse --short HEAD 2>/dev/null); then
        if git diff --quiet HEAD -- 2>/dev/null; then echo "commit: $c"; else echo "commit: $c with uncommitted changes"; fi
    else
        echo "commit: unknown (no git here: pass COMMIT=<hash>)"
    fi
    echo "kernel source: mpd_triton/kernels/lif.py sha256 $(sha256sum mpd_triton/kernels/lif.py | cut -c1-16)"
    echo "host: $(uname -srm), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | xargs)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,temperature.gpu,power.limit \
            --format=csv 2>&1 | sed 's/^/nvidia-smi: /'
    fi
    timeout "$(limit 90)" "$PYTHON" - <<'EOF'
import importlib.metadata as metadata
import os
import platform

import torch


def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


cuda = torch.cuda.is_available()
print(f"versions: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      + ", ".join(f"{name} {version(name)}" for name in ("triton", "spikingjelly", "loguru", "numpy", "pytest",
                                                         "hypothesis", "pytest-xdist", "matplotlib")))
print(f"gpu: {torch.cuda.get_device_name(0) if cuda else 'none'}; cpu cores: {os.cpu_count()}")
print(f"cuda: {'yes' if cuda else 'no'}")
EOF
} > "$WORK/env.txt" 2>&1
tee -a "$LOG" < "$WORK/env.txt"

if grep -q '^cuda: yes' "$WORK/env.txt"; then
    unset TRITON_INTERPRET  # the compiled kernels, on the GPU
else
    DRY=1
    export TRITON_INTERPRET=1  # no GPU: the Triton kernels run in the interpreter
fi
if [ "$DRY" = 1 ]; then MODE=dry; else MODE=gpu; fi
say "mode: $MODE$([ "$MODE" = dry ] && echo ' (tiny sizes: checks the script, measures nothing)')"

# run_stage NAME BUDGET LOGFILE COMMAND...: at most BUDGET seconds (less if the guard is nearer), output to
# the terminal and LOGFILE; a line of $WORK/stages.tsv for the summary.
run_stage() {
    local name=$1 budget=$2 log=$3 lim start rc seconds note=""
    shift 3
    lim=$(limit "$budget")
    if [ $((DEADLINE - $(date +%s))) -lt 5 ]; then
        printf '%s\t%s\t%s\t-\t0\t%s\n' "$name" "$budget" "$lim" "no time left under the $GUARD s guard" >>"$WORK/stages.tsv"
        say "== $name: not run: no time left under the $GUARD s guard"
        return
    fi
    say "== $name (budget $budget s, limit $lim s): $*"
    start=$(date +%s)
    timeout --kill-after="$KILL_GRACE" "$lim" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    seconds=$(($(date +%s) - start))
    case "$rc" in 124|137) note="stopped at budget" ;; esac
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$budget" "$lim" "$rc" "$seconds" "$note" >>"$WORK/stages.tsv"
    say "== $name: exit $rc after $seconds s${note:+ ($note)}"
}

for stage in "${stages[@]}"; do
    stage_command "$stage" "$MODE"
    case "$stage" in
    tests) run_stage tests "$BUDGET_TESTS" "$OUT/pytest.log" "${cmd[@]}" ;;
    kernels)
        run_stage kernels "$BUDGET_KERNELS" "$LOG" "${cmd[@]}"
        cp "$WORK/kernels/results.json" "$OUT/" 2>/dev/null
        ;;
    model)
        run_stage model "$BUDGET_MODEL" "$LOG" "${cmd[@]}"
        cp "$WORK/model/model_results.json" "$OUT/" 2>/dev/null
        ;;
    esac
done

# The summary (python -m bench.device_summary), or the stage table alone if it fails.
timeout "$SUMMARY_LIMIT" "$PYTHON" -m bench.device_summary --out "$OUT" --work "$WORK" --mode "$MODE" \
    --command "bash bench/device_run.sh${ARGS:+ $ARGS}" --guard "$GUARD" --elapsed "$(($(date +%s) - START))" \
    --budget-total "$((BUDGET_TESTS + BUDGET_KERNELS + BUDGET_MODEL + BUDGET_SETUP))" 2>&1 | tee -a "$LOG"
summary_rc=${PIPESTATUS[0]}
if [ "$summary_rc" != 0 ] || [ ! -s "$OUT/summary.md" ]; then
    {
        echo "# Device run ($MODE): the summary failed (exit $summary_rc, device.log); the stages:"
        echo
        echo "| stage | budget s | limit s | exit | ran s | note |"
        echo "|---|---|---|---|---|---|"
        sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$WORK/stages.tsv" 2>/dev/null
        echo
        cat "$WORK/env.txt"
    } >"$OUT/summary.md"
fi

status=0
[ "$summary_rc" = 0 ] || status=1
while IFS=$'\t' read -r _ _ _ rc _; do [ "$rc" = 0 ] || status=1; done <"$WORK/stages.tsv"
files=$(find "$OUT" -type f | wc -l)
[ "$files" -le 8 ] || { say "more than 8 files in $OUT ($files): the device tool returns only 8"; status=1; }
say "== done in $(($(date +%s) - START)) s (guard $GUARD s), exit $status: $OUT ($files files)"
exit "$status"
