"""Presenting results: the printed table, JSON, markdown, plots, and the targets of docs/benchmarks.md
("Targets", "CPU") checked against them."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from plumbing.files import optional_plot, save_figure
from plumbing.files import write_json as _write_json

__all__ = ["text_table", "markdown_table", "write_json", "kernel_table", "skipped_lines", "model_table", "plot_kernels",
           "evaluate_targets", "targets_table", "GPU_TARGETS", "MIB"]

MIB = 1 << 20


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: Path, payload: dict) -> None:
    """The benchmarks' JSON (no NaN), written atomically (plumbing.files)."""
    _write_json(path, payload, allow_nan=False)


def _time_cell(r: dict) -> str:
    if r["median_ms"] is None:
        return "-"
    return f"{r['median_ms']:.4g} ({r['p20_ms']:.4g}-{r['p80_ms']:.4g})"


def _peak_cell(r: dict) -> str:
    return "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / MIB:.1f}"


def _kernel_cell(r: dict) -> str:
    if r["median_ms"] is None:
        return "skipped"
    cell = f"{r['median_ms']:.4g} ms, {r['gb_per_s']:.4g} GB/s"
    if r["copy_fraction"] is not None:
        cell += f" ({100 * r['copy_fraction']:.3g}%)"
    if r["peak_memory_bytes"] is not None:
        cell += f", {r['peak_memory_bytes'] / MIB:.0f} MiB"
    return cell


def kernel_table(records: Sequence[dict]) -> tuple[list[str], list[list[str]], dict[str, list[str]]]:
    """A row per (dtype, T, T*N, pass, stats), a column per provider: median time, effective GB/s
    (% of the copy ceiling), peak memory. Also returns the skip reasons of each provider."""
    providers = list(dict.fromkeys(r["provider"] for r in records))
    cells, skipped = {}, defaultdict(list)
    for r in records:
        cells.setdefault((r["dtype"], r["T"], r["elements"], r["pass_name"], r["stats"]), {})[r["provider"]] = r
        if r["skipped"] and r["skipped"] not in skipped[r["provider"]]:
            skipped[r["provider"]].append(r["skipped"])
    headers = ["dtype", "T", "T*N", "pass", "stats"] + providers
    rows = [[dtype, str(T), _elements_label(n), pass_name, "on" if stats else "off"]
            + [_kernel_cell(by_provider[p]) if p in by_provider else "-" for p in providers]
            for (dtype, T, n, pass_name, stats), by_provider in cells.items()]
    return headers, rows, dict(skipped)


def skipped_lines(skipped: dict[str, list[str]]) -> list[str]:
    return [f"{provider} skipped: {reason}" for provider, reasons in skipped.items() for reason in reasons]


MODEL_HEADERS = ("variant", "model", "T", "batch", "image", "ms median (p20-p80)", "first step ms", "peak MiB",
                 "implementation", "note")


def model_table(records: Sequence[dict]) -> tuple[tuple[str, ...], list[list[str]]]:
    rows = []
    for r in records:
        note = f"skipped: {r['skipped']}" if r["skipped"] else ""
        rows.append([r["provider"], r["model"], str(r["T"]), str(r["batch"]), str(r["image_size"]), _time_cell(r),
                     _fmt(r["first_step_ms"], ".4g"), _peak_cell(r), r["implementation"] or "-", note])
    return MODEL_HEADERS, rows


def _elements_label(n: int) -> str:
    exponent = math.log2(n)
    return f"2^{int(exponent)}" if exponent.is_integer() else str(n)


_PROVIDER_COLORS = {"mpd_triton": "C0", "torch_eager": "C1", "torch_compile": "C2", "spikingjelly": "C3",
                    "mpd_triton_cpu": "C4"}


def _provider_color(provider: str) -> str:
    return _PROVIDER_COLORS.get(provider, "C7")


@optional_plot(fallback=list)
def plot_kernels(records: Sequence[dict], copy_gb_per_s: float | None, out_dir: Path) -> list[Path]:
    """One figure per (dtype, T): rows = passes, columns = time and GB/s against T*N; a line per provider/stats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in records if r["median_ms"] is not None]
    groups = defaultdict(list)
    for r in measured:
        groups[(r["dtype"], r["T"])].append(r)
    passes = [p for p in ("forward", "backward", "both") if any(r["pass_name"] == p for r in measured)]
    paths = []
    for (dtype, T), group in sorted(groups.items()):
        fig, axes = plt.subplots(len(passes), 2, figsize=(11, 3.2 * len(passes)), squeeze=False)
        for row, pass_name in enumerate(passes):
            lines = defaultdict(list)
            for r in group:
                if r["pass_name"] == pass_name:
                    lines[(r["provider"], r["stats"])].append(r)
            ax_time, ax_bw = axes[row]
            for (provider, stats), points in sorted(lines.items()):
                color = _provider_color(provider)
                points.sort(key=lambda r: r["elements"])
                xs = [r["elements"] for r in points]
                label = f"{provider}, stats {'on' if stats else 'off'}"
                style = "-" if stats else "--"
                ax_time.plot(xs, [r["median_ms"] for r in points], style, color=color, marker="o", label=label)
                ax_bw.plot(xs, [r["gb_per_s"] for r in points], style, color=color, marker="o", label=label)
            if copy_gb_per_s:
                ax_bw.axhline(copy_gb_per_s, color="black", linewidth=1, label="device copy")
            for ax, ylabel in ((ax_time, "median ms"), (ax_bw, "effective GB/s (minimal bytes)")):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("T*N elements")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{pass_name}, {dtype}, T = {T}")
                ax.grid(True, alpha=0.3)
            ax_time.set_yscale("log")
        handles, labels = axes[0][1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=3, fontsize="small")
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = out_dir / f"kernels_{dtype}_T{T}.png"
        if save_figure(fig, path, dpi=110):
            paths.append(path)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------ targets (docs/benchmarks.md)

# The H100 targets of docs/benchmarks.md ("Targets"), in its order: name -> (threshold, higher is better,
# "share" for a fraction shown in percent, "ratio" for a factor). evaluate_targets judges against these.
GPU_TARGETS = {
    "forward share of copy bandwidth": (0.85, True, "share"),
    "backward share of copy bandwidth": (0.80, True, "share"),
    "statistics overhead": (0.10, False, "share"),
    "speed-up over spikingjelly + PyTorch statistics": (1.5, True, "ratio"),
    "speed-up over plain spikingjelly": (1.0, True, "ratio"),
    "speed-up over the eager reference": (10.0, True, "ratio"),
    "training step speed-up over spikingjelly": (1.2, True, "ratio"),
    "training step peak memory vs spikingjelly": (1.0, False, "ratio"),
}


def _gpu_target(name: str, case: str, value: float | None, what: str) -> dict:
    threshold, higher, _ = GPU_TARGETS[name]
    return _target(name, case, value, threshold, higher, what)


def _index(records: Sequence[dict]) -> dict:
    return {(r["provider"], r["pass_name"], r["stats"], r["dtype"], r["T"], r["elements"]): r
            for r in records if r["median_ms"] is not None}


def _target(name: str, case: str, value: float | None, threshold: float, higher: bool, what: str) -> dict:
    met = None if value is None else (value >= threshold if higher else value <= threshold)
    return {"target": name, "case": case, "value": value, "threshold": threshold, "higher_is_better": higher,
            "met": met, "what": what}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


# The CPU targets (docs/benchmarks.md, "CPU"; 2-core machine): share of the copy bandwidth and speed-up over the peer's CPU path
# for the fused C kernels at T = 8, and the quick preset's training step against the eager reference.
CPU_KERNEL_T = 8
CPU_COPY_SHARE = 0.40
CPU_SPEEDUP_OVER_SPIKINGJELLY = 3.0
CPU_STEP_SPEEDUP = 2.5
CPU_STEP_VARIANTS = ("mpd_triton_cpu", "mpd_triton_cpu_compile", "torch_compile")


def evaluate_targets(records: Sequence[dict], model_records: Sequence[dict] = (), *, on_gpu: bool) -> list[dict]:
    """The targets that apply where the benchmark ran: on a GPU the H100 targets (judged
    only there), on the CPU the CPU targets (judged only there), at the largest T*N measured.

    A target whose inputs were not measured has value None and met None.
    """
    if not on_gpu:
        return _cpu_targets(records, model_records)
    idx = _index(records)

    def ms(*key):
        return idx[key]["median_ms"] if key in idx else None

    largest = {}
    for r in records:
        key = (r["dtype"], r["T"])
        largest[key] = max(largest.get(key, 0), r["elements"])
    out = []
    for (dtype, T), n in sorted(largest.items()):
        case = f"{dtype}, T={T}, T*N={_elements_label(n)}"
        for pass_name in ("forward", "backward"):
            r = idx.get(("mpd_triton", pass_name, False, dtype, T, n))
            out.append(_gpu_target(f"{pass_name} share of copy bandwidth", case, r["copy_fraction"] if r else None,
                                   f"mpd_triton {pass_name}, statistics off: effective GB/s / copy GB/s"))
        mt_on = ms("mpd_triton", "both", True, dtype, T, n)
        overhead = _ratio(mt_on, ms("mpd_triton", "both", False, dtype, T, n))
        out.append(_gpu_target("statistics overhead", case, None if overhead is None else overhead - 1,
                               "mpd_triton fwd+bwd time with statistics / without, minus 1"))
        out.append(_gpu_target("speed-up over spikingjelly + PyTorch statistics", case,
                               _ratio(ms("spikingjelly", "both", True, dtype, T, n), mt_on),
                               "fwd+bwd with statistics: spikingjelly time / mpd_triton time"))
        out.append(_gpu_target("speed-up over plain spikingjelly", case,
                               _ratio(ms("spikingjelly", "both", False, dtype, T, n), mt_on),
                               "spikingjelly fwd+bwd without statistics / mpd_triton fwd+bwd with statistics"))
        if T == 8:
            out.append(_gpu_target("speed-up over the eager reference", case,
                                   _ratio(ms("torch_eager", "both", True, dtype, T, n), mt_on),
                                   "fwd+bwd with statistics: torch_eager time / mpd_triton time"))
    if model_records:
        by_variant = {r["provider"]: r for r in model_records if r["median_ms"] is not None}
        mt_step, sj_step = by_variant.get("mpd_triton"), by_variant.get("spikingjelly")
        first = model_records[0]
        case = f"{first['model']}, T={first['T']}, batch {first['batch']}"
        both = mt_step is not None and sj_step is not None
        out.append(_gpu_target("training step speed-up over spikingjelly", case,
                               _ratio(sj_step["median_ms"], mt_step["median_ms"]) if both else None,
                               "step with MPD-SGR: spikingjelly time / mpd_triton time"))
        peaks = both and mt_step["peak_memory_bytes"] is not None and sj_step["peak_memory_bytes"] is not None
        out.append(_gpu_target("training step peak memory vs spikingjelly", case,
                               _ratio(mt_step["peak_memory_bytes"], sj_step["peak_memory_bytes"]) if peaks else None,
                               "peak memory: mpd_triton / spikingjelly"))
    return out


def _cpu_targets(records: Sequence[dict], model_records: Sequence[dict]) -> list[dict]:
    idx = _index(records)
    out = []
    largest = {}
    for r in records:
        if r["T"] == CPU_KERNEL_T:
            largest[r["dtype"]] = max(largest.get(r["dtype"], 0), r["elements"])
    for dtype, n in sorted(largest.items()):
        case = f"{dtype}, T={CPU_KERNEL_T}, T*N={_elements_label(n)}"
        fused = idx.get(("mpd_triton_cpu", "both", True, dtype, CPU_KERNEL_T, n))
        out.append(_target("CPU: fwd+bwd with statistics, share of copy bandwidth", case,
                           fused["copy_fraction"] if fused else None, CPU_COPY_SHARE, True,
                           "mpd_triton_cpu, forward + backward with statistics: effective GB/s / copy GB/s"))
        peer = idx.get(("spikingjelly", "both", True, dtype, CPU_KERNEL_T, n))
        out.append(_target("CPU: speed-up over spikingjelly + PyTorch statistics", case,
                           _ratio(peer["median_ms"], fused["median_ms"]) if peer and fused else None,
                           CPU_SPEEDUP_OVER_SPIKINGJELLY, True,
                           "fwd+bwd with statistics: spikingjelly (its PyTorch path) time / mpd_triton_cpu time"))
    if model_records:
        by_variant = {r["provider"]: r for r in model_records if r["median_ms"] is not None}
        eager = by_variant.get("torch_eager")
        fast = [by_variant[v] for v in CPU_STEP_VARIANTS if v in by_variant]
        best = min(fast, key=lambda r: r["median_ms"]) if fast else None
        first = model_records[0]
        case = f"{first['model']}, T={first['T']}, batch {first['batch']}" + (f", best: {best['provider']}" if best
                                                                              else "")
        out.append(_target("CPU: training step speed-up over the eager reference", case,
                           _ratio(eager["median_ms"], best["median_ms"]) if eager and best else None,
                           CPU_STEP_SPEEDUP, True, "step with MPD-SGR: torch_eager time / fastest CPU variant's time"))
    return out


TARGET_HEADERS = ("target", "case", "value", "threshold", "met", "what")


def targets_table(targets: Sequence[dict]) -> tuple[tuple[str, ...], list[list[str]]]:
    rows = []
    for t in targets:
        met = {True: "yes", False: "NO", None: "not judged" if t["value"] is not None else "not measured"}[t["met"]]
        rows.append([t["target"], t["case"], _fmt(t["value"], ".3g"),
                     ("≥ " if t["higher_is_better"] else "≤ ") + format(t["threshold"], "g"), met, t["what"]])
    return TARGET_HEADERS, rows
