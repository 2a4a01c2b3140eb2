"""What every benchmark command line shares: its first printed line, its default output folder,
and the command as typed (recorded with the results)."""

from __future__ import annotations

import datetime
import os
import shlex
from pathlib import Path

import torch

import mpd_triton as mt

__all__ = ["first_line", "default_out", "command_line"]


def first_line(device: torch.device, what: str = "kernel benchmark") -> str:
    """The run's first printed line: where it runs and with what timer; on the CPU, which
    implementations are timed for real and that the Triton kernels are not."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"mpd-triton {what} on {props.name} (CUDA {torch.version.cuda}, torch {torch.__version__}): "
                "triton.testing.do_bench medians")
    kernels = ("mpd_triton's Triton kernels run in the Triton interpreter, at small sizes only (a check of the "
               "harness, not a speed)" if mt.triton_interpreted()
               else "mpd_triton's Triton kernels are skipped (set TRITON_INTERPRET=1 to run them in the interpreter)")
    return (f"No CUDA: the {what} runs on the CPU ({os.cpu_count()} cores, torch {torch.get_num_threads()} "
            f"threads) with a wall-clock timer; the CPU implementations are timed for real, {kernels}")


def default_out(kind: str) -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("runs") / "bench" / f"{kind}-{stamp}"


def command_line(argv: list[str], module: str) -> str:
    return " ".join(["python -m", module] + [shlex.quote(a) for a in argv])
