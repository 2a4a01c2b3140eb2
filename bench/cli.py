"""What every benchmark command line shares: its first printed line, its default output folder,
the command as typed (recorded with the results), and one line for a file it cannot write."""

from __future__ import annotations

import datetime
import functools
import os
import shlex
import sys
from pathlib import Path

import torch

import mpd_triton as mt
from plumbing.files import WriteError

__all__ = ["first_line", "default_out", "command_line", "write_errors_in_one_line"]


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


def write_errors_in_one_line(main):
    """For a benchmark's main(): a file it cannot write (plumbing.files.WriteError: a full disk, an
    unwritable folder) ends it with one line on stderr and exit status 2 instead of a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except WriteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper
