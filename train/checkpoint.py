"""Atomic checkpoints: model, optimizer, schedule, RNG states, history, config.

A checkpoint is written through plumbing.files (a temporary file in the same
folder, flushed to disk and renamed over the old one), so a run killed at any
moment, or a full disk, leaves either the previous complete checkpoint or the
new one, never a torn file. Reading one first checks the CRC-32 of every record
of its zip archive (torch.load does not: flipped bits would load as wrong
weights), so a checkpoint cut short or changed on disk is reported in one line.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from mpd_triton.models import saved
from mpd_triton.models.saved import FORMAT, ModelFileError, read
from plumbing.files import write_with

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "verify_archive", "checkpoint_bytes",
           "rng_state", "set_rng_state", "FORMAT", "OPTIMIZER_STATE_COPIES"]



class CheckpointError(RuntimeError):
    """An unreadable, foreign or mismatched checkpoint (one-line message)."""


# Copies of the parameters an optimizer keeps per parameter: SGD's momentum buffer; Adam's two moments.
OPTIMIZER_STATE_COPIES = {"sgd": 1, "adam": 2}
# What a checkpoint holds beside tensors (config, history, RNG states per rank, pickle and zip overhead).
CHECKPOINT_EXTRA_BYTES = 1 << 20


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically; raises plumbing.files.WriteError (one line) when the file system refuses."""
    write_with(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def checkpoint_bytes(model: torch.nn.Module, optimizer: str = "sgd", momentum: float = 0.9) -> int:
    """About how large a checkpoint of ``model`` trained with ``optimizer`` is: its parameters and
    buffers, the optimizer's state (OPTIMIZER_STATE_COPIES copies of the parameters; none for SGD
    without momentum) and CHECKPOINT_EXTRA_BYTES. Works on a model on the meta device (no memory)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    copies = OPTIMIZER_STATE_COPIES[optimizer] if optimizer != "sgd" or momentum > 0 else 0
    return params * (1 + copies) + buffers + CHECKPOINT_EXTRA_BYTES


def verify_archive(path: Path) -> None:
    """mpd_triton.models.saved.verify_archive, raising CheckpointError."""
    try:
        saved.verify_archive(path)
    except ModelFileError as e:
        raise CheckpointError(str(e)) from None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint or model.pt of train.run, checked (mpd_triton.models.read, which also holds the
    format); its RNG states need the full unpickler, so this is for the project's own files."""
    if not Path(path).is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return read(path, map_location, weights_only=False)
    except ModelFileError as e:
        raise CheckpointError(str(e)) from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
