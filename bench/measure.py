"""What a benchmark measures, in one place: the byte model, the timers, peak memory and the copy ceiling.

Byte model (docs/design.md, section 6). Per element (one neuron at one time step),
with b bytes per input/output value and b_h bytes per saved potential, a
fused LIF must at least

    forward : read x, write s, write h            b + b + b_h
    backward: read grad_s, read h, write grad_x   b + b_h + b

(b_h = b: h is saved in the input dtype). The statistics add only
[T, C]-sized traffic: the forward writes mean and var, the backward reads
their gradients, all float32. Effective bandwidth = minimal bytes / time, and
the ceiling is a large device-to-device copy timed in the same run, counting
bytes read plus bytes written (``bench.kernels --copy``: once at the start, or
beside every measurement).

Timers: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed before
every run; median and the 20th/80th percentiles). Without CUDA a wall-clock
timer with the same fields, for validating the harness, not for speed.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "PASSES", "STATS_VALUE_BYTES", "QUANTILES", "minimal_bytes", "gb_per_s", "Timing", "time_call",
    "peak_memory", "NO_CUDA_MEMORY_REASON", "CopyMeter", "copy_bandwidth", "machine_info", "reset_grads",
    "describe_failure",
]

PASSES = ("forward", "backward", "both")
STATS_VALUE_BYTES = 4  # mean, var and their gradients are float32
QUANTILES = (0.5, 0.2, 0.8)  # median first: the order do_bench returns them in
NO_CUDA_MEMORY_REASON = "no CUDA: peak memory is read from torch.cuda.max_memory_allocated"

# Wall-clock timer bounds (CPU only): enough runs for a median, few enough for the interpreter.
_MIN_WALL_CLOCK_RUNS = 3
_MAX_WALL_CLOCK_RUNS = 100


def minimal_bytes(pass_name: str, *, T: int, N: int, C: int, elem_bytes: int, stats: bool,
                  saved_elem_bytes: int | None = None) -> int:
    """Fewest bytes one pass of a fused LIF over [T, N] elements (C channels) must move.

    elem_bytes: bytes of x, s, grad_s and grad_x; saved_elem_bytes: bytes of the
    saved potential h (default: elem_bytes, h saved in the input dtype).
    """
    if pass_name not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_name!r}")
    for name, value in (("T", T), ("N", N), ("C", C), ("elem_bytes", elem_bytes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    saved = elem_bytes if saved_elem_bytes is None else saved_elem_bytes
    elements = T * N
    forward = elements * (elem_bytes + elem_bytes + saved)  # read x, write s, write h
    backward = elements * (elem_bytes + saved + elem_bytes)  # read grad_s, read h, write grad_x
    stats_traffic = 2 * T * C * STATS_VALUE_BYTES if stats else 0  # mean and var (or their gradients)
    per_pass = {"forward": forward + stats_traffic, "backward": backward + stats_traffic}
    per_pass["both"] = per_pass["forward"] + per_pass["backward"]
    return per_pass[pass_name]


def gb_per_s(nbytes: int, ms: float) -> float:
    """Decimal GB/s (1e9 bytes per second)."""
    return nbytes / (ms * 1e-3) / 1e9


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str  # "do_bench" (CUDA events) or "wall_clock"


def reset_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def time_call(fn: Callable[[], object], device: torch.device, *, warmup_ms: float, rep_ms: float,
              grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """Median and 20th/80th percentile of fn's time; grads in grad_to_none are cleared before every run."""
    if device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                                   grad_to_none=list(grad_to_none or ()), quantiles=list(QUANTILES))
        return Timing(median, p20, p80, "do_bench")
    return _wall_clock(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=grad_to_none)


def _wall_clock(fn, *, warmup_ms, rep_ms, grad_to_none) -> Timing:
    def run_once() -> float:
        reset_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    run_once()  # first call: compilation, caches
    estimate = max(run_once(), 1e-3)
    for _ in range(min(int(warmup_ms / estimate), _MAX_WALL_CLOCK_RUNS)):
        run_once()
    runs = min(max(int(rep_ms / estimate), _MIN_WALL_CLOCK_RUNS), _MAX_WALL_CLOCK_RUNS)
    times = np.array([run_once() for _ in range(runs)])
    median, p20, p80 = np.quantile(times, QUANTILES)
    return Timing(float(median), float(p20), float(p80), "wall_clock")


def peak_memory(fn: Callable[[], object], device: torch.device,
                grad_to_none: Sequence[torch.Tensor] | None = None) -> tuple[int | None, str | None]:
    """(peak bytes allocated during one run of fn, None), or (None, why not).

    The peak counts everything alive during the run (inputs, and for a
    backward alone the graph saved by its forward), as a training step would.
    """
    if device.type != "cuda":
        return None, NO_CUDA_MEMORY_REASON
    reset_grads(grad_to_none)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device)), None


class CopyMeter:
    """The bandwidth ceiling: a device-to-device copy of nbytes (its buffers allocated once), timed
    on demand, counting bytes read plus written. ``bench.kernels --copy beside`` times it beside
    every measurement, so that a share of the ceiling compares two timings taken under the same
    load of a shared host."""

    def __init__(self, device: torch.device, nbytes: int):
        if not isinstance(nbytes, int) or nbytes < 1:
            raise ValueError(f"nbytes must be a positive integer, got {nbytes!r}")
        self.device, self.nbytes = device, nbytes
        self._src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
        self._dst = torch.empty_like(self._src)

    def measure(self, *, warmup_ms: float, rep_ms: float) -> dict:
        timing = time_call(lambda: self._dst.copy_(self._src), self.device, warmup_ms=warmup_ms, rep_ms=rep_ms)
        moved = 2 * self.nbytes
        return {"bytes_copied": self.nbytes, "bytes_moved": moved, "median_ms": timing.median_ms,
                "gb_per_s": gb_per_s(moved, timing.median_ms), "timer": timing.timer}


def copy_bandwidth(device: torch.device, nbytes: int, *, warmup_ms: float, rep_ms: float) -> dict:
    """One timing of the copy ceiling (``CopyMeter``)."""
    return CopyMeter(device, nbytes).measure(warmup_ms=warmup_ms, rep_ms=rep_ms)


def describe_failure(error: BaseException) -> str:
    """The skip reason recorded for a measurement that raised."""
    if isinstance(error, torch.OutOfMemoryError):
        return "out of memory"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"failed: {type(error).__name__}: {first_line[:300]}"


def machine_info(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    import triton

    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count,
                    cuda_runtime=torch.version.cuda)
    return info
