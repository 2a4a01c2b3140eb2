"""Saved models: the file format of train.run's ``model.pt`` (and its checkpoints), read back safely.

A file of this format is a ``torch.save`` archive of a dict whose ``"format"`` is ``FORMAT``, holding
``"model_spec"`` (the builder's name and arguments: ``build(spec["model"], **the rest)``), ``"model"``
(the weights) and, from train.run, ``"config"``, ``"run"`` and ``"provenance"`` (the commit,
versions and machine that made it). ``read`` checks the archive's CRC-32 (``torch.load`` does not:
flipped bits would load as wrong weights) and loads it with ``weights_only=True`` (no code from the
file runs); ``load`` rebuilds the model from it. Every failure is a ``ModelFileError`` of one line.

    import mpd_triton as mt
    model = mt.models.load("runs/quick-.../mpd/model.pt")   # eval mode, on the CPU
    record = mt.models.read("runs/quick-.../mpd/model.pt")  # the spec, config and provenance too
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

__all__ = ["FORMAT", "ModelFileError", "read", "load", "verify_archive", "from_record"]

# The version of the format: a file of another version is refused with this name in the message.
FORMAT = "mpd-triton-checkpoint/1"


class ModelFileError(RuntimeError):
    """An unreadable, foreign, corrupt or mismatched model file (one-line message)."""


def _starts_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def verify_archive(path: str | Path) -> None:
    """Raise ModelFileError (one line) unless ``path`` is a complete zip archive whose records all
    match their CRC-32 (torch.save writes them; torch.load does not check them)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as e:
        detail = "the end of its archive is missing" if "not a zip file" in str(e) else f"{type(e).__name__}: {e}"
        raise ModelFileError(f"{path} is cut short or corrupt ({detail})") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from None
    if bad is not None:
        raise ModelFileError(f"{path} is corrupt: its record {bad} fails the CRC-32 check (bits changed after "
                             "it was written)")


def read(path: str | Path, map_location: str | torch.device = "cpu", *, weights_only: bool = True) -> dict:
    """The saved dict of a file of this format, checked (see the module docstring).

    ``weights_only=False`` is for train.run's own checkpoints, which also hold NumPy's and Python's
    random states; a model file never needs it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {path}")
    if not _starts_like_zip(path):
        raise ModelFileError(f"{path} is not a file that mpd-triton saved (not a torch.save archive)")
    verify_archive(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if weights_only and "weights_only" in str(e):
            raise ModelFileError(f"{path} holds more than a model (objects a weights-only load refuses: {first}); "
                                 "give the model.pt that train.run writes beside its checkpoint") from None
        raise ModelFileError(f"cannot read {path}: {type(e).__name__}: {first}") from None
    if not isinstance(state, dict) or "format" not in state:
        raise ModelFileError(f"{path} is not an mpd-triton file (no format record; expected {FORMAT})")
    if state["format"] != FORMAT:
        raise ModelFileError(f"{path} is of format {state['format']!r}; this mpd-triton reads {FORMAT!r}")
    return state


def from_record(state: dict, where: str | Path = "the record") -> torch.nn.Module:
    """The model a read() dict describes, with its weights, in eval mode."""
    from . import build

    spec = state.get("model_spec")
    if not isinstance(spec, dict) or "model" not in spec or "model" not in state:
        raise ModelFileError(f"{where} holds no model (expected the model.pt or checkpoint.pt of train.run)")
    kwargs = {k: v for k, v in spec.items() if k not in ("model", "data")}
    try:
        model = build(spec["model"], **kwargs)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{where}: its model spec does not build a model: {e}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ModelFileError(f"{where}: weights do not fit a {spec['model']} model: {str(e).splitlines()[0]}") from None
    return model.eval()


def load(path: str | Path, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model saved in ``path`` (train.run's model.pt), in eval mode, on ``map_location``."""
    return from_record(read(path, map_location), path).to(map_location)
