"""Where the time of the CPU LIF step goes, per thread count: the fused C kernels alone against
the whole ``mt.lif`` step that ``bench.kernels`` times.

    python -m bench.cpu_breakdown                       # T = 8, T*N = 2^20, float32, 1 and 2 threads
    python -m bench.cpu_breakdown --threads 1 2 4 --size 2^22 --out runs/bench/breakdown.md

Rows, per thread count (wall-clock medians, ``bench.measure.time_call``):

* ``copy``: ``y.copy_(x)`` of one [T, N] float32 tensor, the machine's ceiling for a stream;
* ``fwd kernel`` / ``fwd kernel, no stats``: ``kernels.cpu.lif_forward`` with and without the
  statistics (u saved), called directly: no autograd, no custom-op dispatch;
* ``bwd kernel``: ``kernels.cpu.lif_backward`` with the MPD-SGR terms;
* ``step``: ``mt.lif(..., backend="cpu", return_stats=True)``, the layer's MPD-SGR loss and the
  backward through both: what ``bench.kernels`` reports as forward + backward with statistics;
* ``step - kernels``: the step less the two kernels' standalone times: Python, autograd, the
  loss's small operations, and whatever the kernels lose inside the step;
* ``fwd kernel, in the step`` / ``bwd kernel, in the step``: the same two launcher calls timed in
  place during the step: against the standalone rows, what running them back to back with fresh
  output buffers costs (on a machine whose cache holds one pass's tensors but not the step's, the
  kernels run at memory speed there and at cache speed alone);
* ``bwd pass``: the step's backward alone (``torch.autograd.backward`` over a kept graph);
* ``bwd pass - its kernel``: that backward less the median time of the ``lif_backward`` call
  inside it (timed in place): the autograd engine, the loss's nodes, the Python around the
  kernel, AccumulateGrad.

GB/s count the fewest bytes each pass must move (``bench.measure.minimal_bytes``; copy: read +
write), so the kernel rows compare with the copy row directly.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

from mpd_triton.kernels import cpu as cpu_kernels
from plumbing.files import write_text
from plumbing.memory import keep_freed_memory

from .cli import command_line, first_line, write_errors_in_one_line
from .kernels import bench_shape, parse_sizes
from .measure import gb_per_s, minimal_bytes, time_call
from .providers import NEURON, _lif_step, make_output_grads, pass_callable

__all__ = ["breakdown", "format_table", "main"]

ROWS = ("copy", "fwd kernel", "fwd kernel, no stats", "bwd kernel", "step", "step - kernels", "fwd kernel, in the step",
        "bwd kernel, in the step", "bwd pass", "bwd pass - its kernel")


def breakdown(T: int, size: int, threads: int, *, warmup_ms: float = 25.0, rep_ms: float = 200.0) -> dict[str, dict]:
    """{row: {"ms", "bytes"}} for one thread count (see the module's docstring)."""
    if not cpu_kernels.available(torch.float32):
        raise RuntimeError(f"the CPU kernels are not available: {cpu_kernels.unavailable_reason()}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shape = bench_shape(T, size)
        C, N = shape[2], size // T
        x = torch.randn(*shape)
        params = NEURON.kernel_params
        cpu = torch.device("cpu")

        def ms(fn, grad_to_none=None) -> float:
            return time_call(fn, cpu, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=grad_to_none).median_ms

        def pass_bytes(name: str, stats: bool) -> int:
            return minimal_bytes(name, T=T, N=N, C=C, elem_bytes=4, stats=stats)

        y = torch.empty_like(x)
        u_saved = cpu_kernels.lif_forward(x, params, stats=True)[1]
        grad_spikes = torch.randn(*shape)
        mpd_a, mpd_b = torch.randn(T, C), torch.randn(T, C)
        rows = {
            "copy": dict(ms=ms(lambda: y.copy_(x)), bytes=2 * x.numel() * 4),
            "fwd kernel": dict(ms=ms(lambda: cpu_kernels.lif_forward(x, params, stats=True)),
                               bytes=pass_bytes("forward", True)),
            "fwd kernel, no stats": dict(ms=ms(lambda: cpu_kernels.lif_forward(x, params, stats=False)),
                                         bytes=pass_bytes("forward", False)),
            "bwd kernel": dict(ms=ms(lambda: cpu_kernels.lif_backward(grad_spikes, u_saved, params, mpd_a=mpd_a,
                                                                     mpd_b=mpd_b)),
                               bytes=pass_bytes("backward", True)),
        }
        xg = x.clone().requires_grad_()
        step = pass_callable(_lif_step("cpu", True), xg, make_output_grads(xg, True), "both")
        rows["step"] = dict(ms=ms(step, grad_to_none=[xg]), bytes=pass_bytes("both", True))
        rows["step - kernels"] = dict(ms=rows["step"]["ms"] - rows["fwd kernel"]["ms"] - rows["bwd kernel"]["ms"],
                                      bytes=0)
        with _timing_calls(cpu_kernels, "lif_forward") as fwd_inside, \
                _timing_calls(cpu_kernels, "lif_backward") as bwd_inside:
            ms(step, grad_to_none=[xg])
        rows["fwd kernel, in the step"] = dict(ms=statistics.median(fwd_inside), bytes=pass_bytes("forward", True))
        rows["bwd kernel, in the step"] = dict(ms=statistics.median(bwd_inside), bytes=pass_bytes("backward", True))
        outputs, grads = _lif_step("cpu", True)(xg), make_output_grads(xg, True)
        with _timing_calls(cpu_kernels, "lif_backward") as inside:
            backward_ms = ms(lambda: torch.autograd.backward(outputs, grads, retain_graph=True), grad_to_none=[xg])
        rows["bwd pass"] = dict(ms=backward_ms, bytes=pass_bytes("backward", True))
        rows["bwd pass - its kernel"] = dict(ms=backward_ms - statistics.median(inside), bytes=0)
        return rows
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _timing_calls(module, name: str):
    """Within the block, module.name is wrapped to append each call's milliseconds to the yielded list."""
    real, times = getattr(module, name), []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            times.append((time.perf_counter() - start) * 1e3)

    setattr(module, name, timed)
    try:
        yield times
    finally:
        setattr(module, name, real)


def format_table(results: dict[int, dict[str, dict]]) -> str:
    """Markdown: one row per measurement, one column group per thread count."""
    threads = list(results)
    head = "| | " + " | ".join(f"{n} thread{'s' if n > 1 else ''}: ms | GB/s | share of copy" for n in threads) + " |"
    lines = [head, "|---|" + "---|---|---|" * len(threads)]
    for row in ROWS:
        cells = []
        for n in threads:
            r, copy = results[n][row], results[n]["copy"]
            if r["bytes"]:
                rate = gb_per_s(r["bytes"], r["ms"])
                cells += [f"{r['ms']:.3f}", f"{rate:.1f}", f"{rate / gb_per_s(copy['bytes'], copy['ms']):.0%}"]
            else:
                cells += [f"{r['ms']:.3f}", "", ""]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@write_errors_in_one_line
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_breakdown", description=__doc__.split("\n\n")[0])
    parser.add_argument("--T", type=int, default=8, help="time steps (default 8)")
    parser.add_argument("--size", default="2^20", help="T*N elements (default 2^20)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts (default 1 2)")
    parser.add_argument("--rep-ms", type=float, default=200.0, help="timed repetitions per row")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    if args.T < 1 or any(n < 1 for n in args.threads):
        parser.error("--T and --threads take positive integers")
    try:
        (size,) = parse_sizes([args.size])
    except ValueError as error:
        parser.error(str(error).replace("--sizes", "--size"))
    if size % args.T:
        parser.error(f"--size ({size}) must be a multiple of --T ({args.T})")
    keep_freed_memory()
    print(first_line(torch.device("cpu"), "CPU breakdown"))
    results = {n: breakdown(args.T, size, n, rep_ms=args.rep_ms) for n in args.threads}
    text = (f"Command: `{command_line(argv, 'bench.cpu_breakdown')}`\n\nfloat32, T = {args.T}, T*N = {size}, "
            f"{NEURON.surrogate} surrogate; medians.\n\n{format_table(results)}\n")
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
