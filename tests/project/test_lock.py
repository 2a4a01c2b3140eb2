"""plumbing.lock: one process at a time in an output folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plumbing.lock import LOCK_NAME, FolderBusy, folder_lock

REPO = Path(__file__).resolve().parents[2]


def test_a_held_folder_is_refused_naming_its_holder_and_freed_on_exit(tmp_path):
    out = tmp_path / "run"
    with folder_lock(out, "train.run"):
        (out / "config.json").write_text("{}")
        with pytest.raises(FolderBusy, match=rf"{out} is in use by train.run \(pid {os.getpid()} on .*, started "):
            with folder_lock(out, "train.run"):
                pass
    with folder_lock(out, "train.sweep"):  # freed when its holder left the block
        assert "train.sweep" in (out / LOCK_NAME).read_text()


def test_a_killed_holder_frees_the_folder(tmp_path):
    code = ("import os, sys; from plumbing.lock import folder_lock\n"
            f"with folder_lock({str(tmp_path)!r}, 'train.run'):\n    os._exit(9)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert done.returncode == 9 and "train.run" in (tmp_path / LOCK_NAME).read_text()  # the stale file stays
    with folder_lock(tmp_path, "train.run"):  # and blocks nothing
        pass


def test_a_folder_the_lock_made_goes_if_nothing_was_written(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with folder_lock(out, "train.run"):
            raise RuntimeError("refused before it began")
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    with folder_lock(existing, "train.run"):
        pass
    assert existing.is_dir()
