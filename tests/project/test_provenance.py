"""plumbing.provenance: the record of where and with what a result was made."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import torch

from plumbing.provenance import cpu_model, git_commit, provenance

REPO = Path(__file__).resolve().parents[2]


def test_record_names_the_checkout_and_the_versions():
    record = provenance("cpu")
    json.dumps(record)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI clones one)
        assert record["commit"] == head.stdout.strip() and isinstance(record["dirty"], bool)
    assert record["python"] == platform.python_version() and record["torch"] == torch.__version__
    assert record["torch_threads"] == torch.get_num_threads() and record["cpu"] == cpu_model() != ""
    assert record["device"] == "cpu" and "gpu" not in record
    assert record["date_utc"].endswith("+00:00")
    # plain values only (torch.__version__ is a str subclass that a weights-only load refuses)
    assert all(type(v) in (str, int, float, bool, type(None)) for v in record.values()), record


def test_commit_outside_a_checkout_is_unknown(tmp_path):
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}


def test_dirty_follows_tracked_changes(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "untracked.txt").write_text("not counted\n")
    assert git_commit(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("two\n")
    record = git_commit(tmp_path)
    assert record["dirty"] is True and len(record["commit"]) == 40
