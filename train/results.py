"""train.eval's result file, eval.json, read back: which evaluations in it have finished.

train.eval rewrites eval.json after every batch of images; while an evaluation is unfinished (running, or
interrupted: ``train.eval --resume`` continues it) the file carries an ``in_progress`` record beside the
models it has finished. The sweep, the study's landing script and its validity study all ask the same
question of the file, answered here once.
"""

from __future__ import annotations

import json
from pathlib import Path

IN_PROGRESS = "in_progress"  # the key of the unfinished evaluation's record in eval.json


def finished_models(path: str | Path) -> dict[str, dict] | None:
    """The models of a finished eval.json, by name; None while the file is missing, unreadable, holds no
    model, or records an evaluation in progress."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or IN_PROGRESS in saved or not saved.get("models"):
        return None
    return saved["models"]


def images_done(path: str | Path) -> tuple[int, int] | None:
    """How far an unfinished evaluation got: (images finished, images in all) of the model it was on when
    it last wrote ``path``; None while the file is missing or unreadable, or records no evaluation in
    progress (finished, or not begun)."""
    try:
        saved = json.loads(Path(path).read_text())
        record = saved[IN_PROGRESS]
        n = int(saved["key"]["n"])
        return min(int(record["state"]["next"]), n), n
    except (OSError, ValueError, KeyError, TypeError):
        return None
