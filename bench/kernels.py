"""Kernel benchmark: one LIF layer, forward / backward / both, statistics off / on, every provider side by side.

    python -m bench.kernels                       # full sweep (CUDA): T 4 8 16, T*N 2^21..2^27, float32 + bfloat16
    python -m bench.kernels --quick               # T = 8, T*N 2^24 and 2^27
    python -m bench.kernels --providers mpd_triton spikingjelly --dtype bfloat16 --T 8 --sizes 2^27
    python -m bench.kernels --model vgg11         # the model-level benchmark (bench.model_step)
    python -m bench.kernels --quick               # without CUDA: the CPU providers at T = 8, T*N = 2^20

Writes results.json, results.md and kernels_<dtype>_T<T>.png to --out
(default runs/bench/kernels-<UTC time>); results.json after every (dtype, T, size),
so an interrupted sweep keeps what it measured and ``--resume`` (the same command
and --out) measures only the rest. Without CUDA it says so on its first
line and times the CPU implementations (the fused C kernels, the reference
eager and compiled, SpikingJelly's PyTorch path) with a wall-clock timer; the
Triton kernels then run only in the interpreter, at small sizes, as a check of
the harness.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from plumbing.files import ensure_writable, remove_leftovers, write_text
from plumbing.memory import keep_freed_memory

from .cli import command_line, default_out, first_line, write_errors_in_one_line
from .measure import (
    PASSES,
    CopyMeter,
    describe_failure,
    gb_per_s,
    machine_info,
    minimal_bytes,
    peak_memory,
    reset_grads,
    time_call,
)
from .providers import (
    NEURON,
    PROVIDER_NAMES,
    PROVIDERS,
    Provider,
    make_input,
    make_output_grads,
    pass_callable,
)
from .report import (
    evaluate_targets,
    kernel_table,
    markdown_table,
    plot_kernels,
    skipped_lines,
    targets_table,
    text_table,
    write_json,
)

__all__ = ["main", "parse_sizes", "bench_shape", "run_sweep", "RECORD_FIELDS", "DTYPES", "Plan"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATS_CHOICES = {"off": (False,), "on": (True,), "both": (False, True)}

# Default sweeps. On the CPU the CPU providers are timed for real (T*N = 2^20 is the CPU targets' case);
# the Triton kernels run there only in the interpreter, at small sizes.
CUDA_FULL = dict(T=(4, 8, 16), sizes=(1 << 21, 1 << 23, 1 << 25, 1 << 27))
CUDA_QUICK = dict(T=(8,), sizes=(1 << 24, 1 << 27))
CPU_FULL = dict(T=(4, 8), sizes=(1 << 16, 1 << 18, 1 << 20, 1 << 22))
CPU_QUICK = dict(T=(8,), sizes=(1 << 20,))
CPU_MAX_ELEMENTS = 1 << 24  # beyond this the eager reference takes minutes per point on a CPU
INTERPRETER_MAX_ELEMENTS = 1 << 14  # the Triton interpreter is slower still

# A conv layer's activation: up to 128 channels of 16 x 16 positions, the rest is batch.
BENCH_CHANNELS = 128
BENCH_POSITIONS = 256

COPY_BYTES_CUDA = 1 << 30  # far beyond the L2 cache
COPY_BYTES_CPU = 1 << 24

RECORD_FIELDS = ("provider", "implementation", "pass_name", "stats", "dtype", "T", "N", "elements", "shape", "bytes",
                 "median_ms", "p20_ms", "p80_ms", "timer", "gb_per_s", "copy_gb_per_s", "copy_fraction",
                 "peak_memory_bytes", "peak_memory_note", "skipped")
# Which copy a share is computed against: "start", the one timed before the sweep; "beside", the mean
# of copies timed right before and right after each measurement. A shared host's speed moves by a
# quarter within minutes (docs/benchmarks.md), and a share of two timings minutes apart moves with it.
COPY_MODES = ("start", "beside")


def parse_sizes(values: list[str]) -> list[int]:
    """'2^27', '2**27' or '134217728' -> element counts; each must be a positive integer."""
    sizes = []
    for text in values:
        token = text.replace("**", "^")
        try:
            if "^" in token:
                base, exponent = token.split("^")
                size = int(base) ** int(exponent)
            else:
                size = int(token)
        except ValueError:
            raise ValueError(f"--sizes takes element counts like 134217728 or 2^27, got {text!r}") from None
        if size < 1:
            raise ValueError(f"--sizes must be positive, got {text!r}")
        sizes.append(size)
    return sizes


def bench_shape(T: int, elements: int) -> tuple[int, int, int, int]:
    """[T, B, C, S] with T*B*C*S = elements: up to BENCH_CHANNELS channels and BENCH_POSITIONS positions."""
    if elements % T:
        raise ValueError(f"size T*N = {elements} is not a multiple of T = {T}")
    N = elements // T
    C = math.gcd(N, BENCH_CHANNELS)
    S = math.gcd(N // C, BENCH_POSITIONS)
    return T, N // (C * S), C, S


@dataclass
class Plan:
    dtypes: list[str]
    Ts: list[int]
    sizes: list[int]
    providers: list[str]
    passes: list[str]
    stats_modes: tuple[bool, ...]
    warmup_ms: float
    rep_ms: float
    strict: bool
    compile_Ts: list[int] | None = None  # T values at which torch_compile runs (None: all)
    compile_sizes: list[int] | None = None  # T*N at which torch_compile runs (None: all)
    copy: str = "start"  # COPY_MODES

    def count(self) -> int:
        return (len(self.dtypes) * len(self.Ts) * len(self.sizes) * len(self.providers) * len(self.stats_modes)
                * len(self.passes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short subset (T = 8, two sizes)")
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--T", nargs="+", type=int, help="time steps (default 4 8 16 on CUDA)")
    parser.add_argument("--sizes", nargs="+", help="T*N element counts, e.g. 2^21 2^27 (default 2^21 .. 2^27 on CUDA)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDER_NAMES, default=list(PROVIDER_NAMES))
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--stats", choices=tuple(STATS_CHOICES), default="both", help="membrane statistics off, on or both")
    parser.add_argument("--out", type=Path, help="output folder (default runs/bench/kernels-<UTC time>)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up per measurement")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench timed repetitions per measurement")
    parser.add_argument("--compile-T", nargs="+", default=["8"],
                        help="T values at which torch_compile is measured, or 'all' (default 8: each T and dtype "
                             "is a new graph, and compiling every one takes longer than the rest of the sweep)")
    parser.add_argument("--compile-sizes", nargs="+", default=["all"],
                        help="T*N at which torch_compile is measured, e.g. 2^27, or 'all' (default): each further "
                             "size compiles another graph")
    parser.add_argument("--copy", choices=COPY_MODES,
                        help="the copy each share of the ceiling is computed against: 'start', timed once before "
                             "the sweep (default with CUDA), or 'beside', timed right before and after each "
                             "measurement (default without CUDA, where the host's speed drifts within minutes)")
    parser.add_argument("--strict", action="store_true", help="stop at the first provider error instead of recording it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--model", help="run the model-level benchmark instead (see python -m bench.model_step -h)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep in --out: measure only the sizes its results.json lacks")
    return parser


def make_plan(args, device: torch.device) -> Plan:
    defaults = (CUDA_QUICK if args.quick else CUDA_FULL) if device.type == "cuda" else (
        CPU_QUICK if args.quick else CPU_FULL)
    Ts = args.T if args.T else list(defaults["T"])
    sizes = parse_sizes(args.sizes) if args.sizes else list(defaults["sizes"])
    if any(T < 1 for T in Ts):
        raise ValueError(f"--T must be positive integers, got {Ts}")
    for T in Ts:
        for size in sizes:
            bench_shape(T, size)  # raises for a size that is not a multiple of T
    if device.type != "cuda" and max(sizes) > CPU_MAX_ELEMENTS:
        raise ValueError(f"without CUDA the sizes are limited to {CPU_MAX_ELEMENTS} elements (got {max(sizes)}); "
                         "pass smaller --sizes")
    for name, value in (("--warmup-ms", args.warmup_ms), ("--rep-ms", args.rep_ms)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    return Plan(list(dict.fromkeys(args.dtype)), list(dict.fromkeys(Ts)), list(dict.fromkeys(sizes)),
                list(dict.fromkeys(args.providers)), list(dict.fromkeys(args.passes)), STATS_CHOICES[args.stats],
                args.warmup_ms, args.rep_ms, args.strict, _parse_compile_T(args.compile_T),
                _parse_compile_sizes(args.compile_sizes), args.copy or ("start" if device.type == "cuda" else "beside"))


def _parse_compile_T(values: list[str]) -> list[int] | None:
    if values == ["all"]:
        return None
    try:
        Ts = [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--compile-T takes time steps or 'all', got {' '.join(values)}") from None
    if any(T < 1 for T in Ts):
        raise ValueError(f"--compile-T must be positive integers, got {Ts}")
    return Ts


def _parse_compile_sizes(values: list[str]) -> list[int] | None:
    if values == ["all"]:
        return None
    try:
        return parse_sizes(values)
    except ValueError as error:
        raise ValueError(f"--compile-sizes takes element counts like 2^27 or 'all': {error}") from None


def _record(provider, implementation, pass_name, stats, dtype_name, shape, copy_gb_per_s=None, **measured) -> dict:
    """One measurement; effective GB/s and the share of the copy ceiling follow from bytes and the median."""
    T, B, C, S = shape
    N = B * C * S
    record = dict(provider=provider, implementation=implementation, pass_name=pass_name, stats=stats,
                  dtype=dtype_name, T=T, N=N, elements=T * N, shape=list(shape),
                  bytes=minimal_bytes(pass_name, T=T, N=N, C=C, elem_bytes=DTYPES[dtype_name].itemsize, stats=stats),
                  median_ms=None, p20_ms=None, p80_ms=None, timer=None, gb_per_s=None, copy_gb_per_s=None,
                  copy_fraction=None, peak_memory_bytes=None, peak_memory_note=None, skipped=None)
    record.update(measured)
    if record["median_ms"] is not None:
        record["gb_per_s"] = gb_per_s(record["bytes"], record["median_ms"])
        record["copy_gb_per_s"] = copy_gb_per_s
        record["copy_fraction"] = record["gb_per_s"] / copy_gb_per_s if copy_gb_per_s else None
    assert tuple(record) == RECORD_FIELDS, "a measurement must carry exactly RECORD_FIELDS"
    return record


def run_sweep(plan: Plan, device: torch.device, copy_gb_per_s: float | None, *, progress: bool = True,
              providers: dict[str, Provider] | None = None, on_size_done=None, done=(),
              copy_meter: CopyMeter | None = None) -> list[dict]:
    """Every (dtype, T, size, provider, stats, pass) of the plan, in that nesting; skipped ones carry a reason.

    copy_gb_per_s: the copy ceiling the shares are computed against; with plan.copy == "beside", the
    mean of copy_meter's timings right before and right after each measurement instead.
    providers: name -> Provider for the names in the plan (default: PROVIDERS).
    on_size_done(records): called after each (dtype, T, size), e.g. to save partial results.
    done: records of an interrupted sweep of this plan; the (dtype, T, size) they cover are not measured again.
    """
    from tqdm import tqdm

    providers = PROVIDERS if providers is None else providers
    if plan.copy == "beside" and copy_meter is None:
        raise ValueError("plan.copy == 'beside' needs a copy_meter to time the copy beside each measurement")
    records = []
    measured = {}
    for r in done:
        measured.setdefault((r["dtype"], r["T"], r["elements"]), []).append(r)
    steps = {}  # (provider, stats) -> step, built once: compiled graphs and spikingjelly layers are reused
    bar = tqdm(total=plan.count(), disable=not progress, file=sys.stderr, unit="pt")
    for dtype_name in plan.dtypes:
        dtype = DTYPES[dtype_name]
        for T in plan.Ts:
            for size in plan.sizes:
                if (dtype_name, T, size) in measured:
                    records += measured[(dtype_name, T, size)]
                    bar.update(len(measured[(dtype_name, T, size)]))
                    continue
                shape = bench_shape(T, size)
                x = make_input(shape, dtype, device)
                for provider_name in plan.providers:
                    provider = providers[provider_name]
                    unavailable = provider.unavailable(device, dtype) or _not_planned(plan, provider_name, T, size, device)
                    implementation = None if unavailable else provider.implementation(device)
                    for stats in plan.stats_modes:
                        grads = None
                        broken = unavailable
                        for pass_name in plan.passes:
                            bar.set_description(f"{provider_name} {pass_name} {'stats' if stats else 'plain'} "
                                                f"{dtype_name} T={T} 2^{math.log2(size):g}", refresh=False)
                            if broken:
                                records.append(_record(provider_name, implementation, pass_name, stats, dtype_name,
                                                       shape, skipped=broken))
                                bar.update()
                                continue
                            try:
                                key = (provider_name, stats)
                                if key not in steps:
                                    steps[key] = provider.step(stats)
                                grads = grads or make_output_grads(x, stats)
                                ceiling = copy_gb_per_s
                                if plan.copy == "beside":
                                    before = _copy_beside(copy_meter, plan)
                                measured = _measure(steps[key], x, grads, pass_name, device, plan)
                                if plan.copy == "beside":
                                    ceiling = (before + _copy_beside(copy_meter, plan)) / 2
                            except Exception as error:  # a provider error is a result, unless --strict
                                if plan.strict:
                                    raise
                                traceback.print_exc(file=sys.stderr)
                                # Later passes of this provider/stats/size would fail the same way.
                                broken = describe_failure(error)
                                measured = dict(skipped=broken)
                            records.append(_record(provider_name, implementation, pass_name, stats, dtype_name,
                                                   shape, ceiling, **measured))
                            reset_grads([x])
                            bar.update()
                del x
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if on_size_done is not None:
                    on_size_done(records)
    bar.close()
    return records


def _not_planned(plan: Plan, provider_name: str, T: int, size: int, device: torch.device) -> str | None:
    if provider_name == "torch_compile" and plan.compile_Ts is not None and T not in plan.compile_Ts:
        return f"torch_compile is measured only at T in {plan.compile_Ts} (--compile-T)"
    if provider_name == "torch_compile" and plan.compile_sizes is not None and size not in plan.compile_sizes:
        sizes = ", ".join(f"2^{math.log2(n):g}" if math.log2(n).is_integer() else str(n) for n in plan.compile_sizes)
        return f"torch_compile is measured only at T*N in [{sizes}] (--compile-sizes)"
    if provider_name == "mpd_triton" and device.type != "cuda" and size > INTERPRETER_MAX_ELEMENTS:
        return f"the Triton interpreter runs only up to T*N = {INTERPRETER_MAX_ELEMENTS}"
    return None


def _copy_beside(meter: CopyMeter, plan: Plan) -> float:
    """GB/s of one short timing of the copy ceiling (half the repetitions of a measurement)."""
    return meter.measure(warmup_ms=plan.warmup_ms / 2, rep_ms=plan.rep_ms / 2)["gb_per_s"]


def _measure(step, x, grads, pass_name, device, plan: Plan) -> dict:
    fn = pass_callable(step, x, grads, pass_name)
    timing = time_call(fn, device, warmup_ms=plan.warmup_ms, rep_ms=plan.rep_ms, grad_to_none=[x])
    peak, peak_note = peak_memory(fn, device, grad_to_none=[x])
    return dict(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, timer=timing.timer,
                peak_memory_bytes=peak, peak_memory_note=peak_note)


def _interrupted_sweep(out_dir: Path, settings: dict, info: dict) -> dict:
    """The results.json of an interrupted sweep in out_dir (--resume), measured with these settings
    on this machine; raises ValueError (one line) otherwise."""
    path = out_dir / "results.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--resume: no {path} to continue") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: cannot read {path}: {e}") from None
    differing = [k for k in settings if saved.get("settings", {}).get(k) != settings[k]]
    differing += [f"machine {k}" for k in ("device", "gpu", "cpu", "cpu_count", "torch", "triton", "triton_interpret")
                  if saved.get("machine", {}).get(k) != info.get(k)]
    if differing:
        raise ValueError(f"--resume: {path} was measured with other settings or elsewhere ({', '.join(differing)}): "
                         "give the same options on the same machine, or another --out")
    return saved


@write_errors_in_one_line
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    keep_freed_memory()  # steady-state timings: no page faults from reallocated buffers
    model_option = argparse.ArgumentParser(add_help=False)
    model_option.add_argument("--model")
    if model_option.parse_known_args(argv)[0].model is not None:  # its own options: hand over before parsing
        from . import model_step

        return model_step.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(first_line(device), flush=True)
    try:
        plan = make_plan(args, device)
    except ValueError as error:
        parser.error(str(error))
    if args.resume and args.out is None:
        parser.error("--resume needs --out, the folder of the sweep to continue")
    out_dir = args.out or default_out("kernels")
    command = command_line(argv, "bench.kernels")
    info = machine_info(device)
    settings = {"dtypes": plan.dtypes, "T": plan.Ts, "sizes": plan.sizes, "providers": plan.providers,
                "passes": plan.passes, "stats": list(plan.stats_modes), "warmup_ms": plan.warmup_ms,
                "rep_ms": plan.rep_ms, "compile_T": plan.compile_Ts,
                "compile_sizes": plan.compile_sizes, "copy": plan.copy, "neuron": _neuron_settings()}
    settings = json.loads(json.dumps(settings))  # as results.json holds them
    saved = {}
    if args.resume:
        try:
            saved = _interrupted_sweep(out_dir, settings, info)
        except ValueError as error:
            parser.error(str(error))
        for path in remove_leftovers(out_dir):
            print(f"removed {path} (a temporary file left by an interrupted write)", flush=True)
    ensure_writable(out_dir)

    largest_bytes = max(plan.sizes) * max(DTYPES[d].itemsize for d in plan.dtypes)
    copy_meter = CopyMeter(device, max(largest_bytes, COPY_BYTES_CUDA if device.type == "cuda" else COPY_BYTES_CPU))
    if saved:  # the copy ceiling the measurements so far were compared with
        copy = saved["copy_bandwidth"]
        print(f"continuing the sweep in {out_dir}: {len(saved['measurements'])} of {plan.count()} measurements "
              "done", flush=True)
    else:
        copy = copy_meter.measure(warmup_ms=plan.warmup_ms, rep_ms=plan.rep_ms)
    print(f"device-to-device copy of {copy['bytes_copied'] / 2**20:.0f} MiB: {copy['gb_per_s']:.1f} GB/s "
          "(read + write)", flush=True)

    def payload(records: list[dict], complete: bool) -> dict:
        return {
            "benchmark": "kernels",
            "complete": complete,  # False in the copies saved while the sweep runs
            "command": command,
            "first_line": first_line(device),
            "machine": info,
            "settings": settings,
            "providers": {name: {"description": PROVIDERS[name].description} for name in plan.providers},
            "copy_bandwidth": copy,
            "measurements": records,
            "targets": evaluate_targets(records, on_gpu=device.type == "cuda"),
        }

    json_path = out_dir / "results.json"
    try:
        records = run_sweep(plan, device, copy["gb_per_s"], progress=not args.no_progress,
                            on_size_done=lambda partial: write_json(json_path, payload(partial, complete=False)),
                            done=saved.get("measurements", ()), copy_meter=copy_meter)
    except KeyboardInterrupt:
        print(f"interrupted: the sizes measured so far are in {json_path}; continue with the same command and "
              f"--out {out_dir} --resume", file=sys.stderr)
        return 130
    final = payload(records, complete=True)
    write_json(json_path, final)

    table = kernel_table(records)
    print(text_table(*table[:2]))
    print("\n".join(skipped_lines(table[2])))
    targets = targets_table(final["targets"])
    print("\nTargets:")
    print(text_table(*targets))
    plots = plot_kernels(records, copy["gb_per_s"], out_dir)
    write_text(out_dir / "results.md", _markdown(final, table, targets, plots))
    print(f"\nwrote {json_path}, {out_dir / 'results.md'} and {len(plots)} plot(s) to {out_dir}")
    return 0


def _neuron_settings() -> dict:
    c = NEURON
    return {"tau": c.tau, "v_th": c.v_th, "v_reset": c.v_reset, "decay_input": c.decay_input,
            "detach_reset": c.detach_reset, "surrogate": repr(c.surrogate)}


def _markdown(payload: dict, table, targets, plots) -> str:
    m, copy = payload["machine"], payload["copy_bandwidth"]
    where = m.get("gpu") or f"CPU ({m['cpu']}, {m['cpu_count']} cores)"
    lines = [
        "# Kernel benchmark",
        "",
        f"- {payload['first_line']}",
        f"- machine: {where}; torch {m['torch']}, triton {m['triton']}, Python {m['python']}",
        f"- date (UTC): {m['date_utc']}",
        f"- command: `{payload['command']}`",
        f"- copy ceiling: {copy['gb_per_s']:.1f} GB/s ({copy['bytes_copied'] / 2**20:.0f} MiB device-to-device, "
        "bytes read + written), timed at the start" + (
            "; each share is computed against the copy timed right before and after its measurement "
            "(`--copy beside`: results.json's copy_gb_per_s)" if payload["settings"]["copy"] == "beside" else ""),
        "- each cell: median time, effective GB/s = minimal bytes of the pass (bench/measure.py) / median time, "
        "(its share of the copy ceiling), peak memory where measured; 20th/80th percentiles in results.json",
        "",
        markdown_table(*table[:2]),
        "",
    ]
    lines += [f"- {line}" for line in skipped_lines(table[2])]
    lines += ["", "## Targets", "", markdown_table(*targets), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
