"""Where and with what a result was made: the record every result file of train/ and bench/ carries.

``provenance()`` returns a JSON-ready dict: the commit of the checkout (and whether tracked
files differed from it), the UTC date, the versions of Python, torch, triton and numpy, the
CPU model, its logical cores and torch's threads, and the GPU where CUDA is in use. A result
file that holds it can be checked against the code that made it (``git show COMMIT``) and
compared only with results of a like machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

__all__ = ["provenance", "git_commit", "cpu_model"]

_REPO = Path(__file__).resolve().parent.parent


def git_commit(folder: Path = _REPO) -> dict:
    """{"commit": full hash or None, "dirty": tracked files differ from it (None when unknown)}."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def cpu_model() -> str:
    """The processor's name as the OS reports it ('model name' of /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Hardware"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device: torch.device | str | None = None) -> dict:
    """The record described in the module docstring; ``device``: the one the result was computed on."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        **git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a plain str: TorchVersion would make a model.pt unsafe to load
        "triton": triton_version,
        "numpy": np.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    device = torch.device(device) if device is not None else None
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
            info["cuda"] = str(torch.version.cuda)
    return info
