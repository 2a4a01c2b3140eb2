"""plumbing.progress: a bar on a terminal, a line now and then in a log, nothing with --quiet."""

from __future__ import annotations

import io
import json

import pytest

from mpd_triton import progress as P


def test_a_log_gets_lines_with_rate_and_time_left(monkeypatch):
    stream = io.StringIO()  # not a terminal
    ticks = iter(range(0, 1000, 10))
    monkeypatch.setattr(P.time, "monotonic", lambda: float(next(ticks)))  # 10 s per step
    bar = P.progress(range(4), "[plain] epoch 1/3", "steps", scale=64, scale_unit="images", every=15, stream=stream)
    for i in bar:
        bar.set_postfix(f"loss {1.0 / (i + 1):.2f}")
    lines = stream.getvalue().splitlines()
    assert lines[0] == ("[plain] epoch 1/3: 2/4 steps, 6.4 images/s, 0:00:20 elapsed, about 0:00:20 left, "
                        "loss 0.50")
    assert lines[-1] == "[plain] epoch 1/3: 4/4 steps, 5.12 images/s, 0:00:50 elapsed, loss 0.25"  # no time left


def test_quiet_and_short_loops_print_nothing():
    stream = io.StringIO()
    assert list(P.progress(range(3), "x", quiet=True, every=0, stream=stream)) == [0, 1, 2]
    assert list(P.progress(range(3), "x", stream=stream)) == [0, 1, 2]  # shorter than PROGRESS_EVERY
    assert stream.getvalue() == ""
    assert P.clock(3725) == "1:02:05"


@pytest.mark.slow
def test_train_run_in_a_log_prints_progress_and_quiet_keeps_the_result(tmp_path, capsys, monkeypatch):
    from train.run import main

    monkeypatch.setattr(P, "PROGRESS_EVERY", 0.0)
    args = ["--train-limit", "128", "--test-limit", "64", "--epochs", "1", "--batch-size", "32", "--eval-attacks", "",
            "--no-compare", "--eta", "1"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "[mpd] epoch 1/1: 1/4 steps, " in printed and " images/s, " in printed and "left" in printed
    assert main(args + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    quiet = capsys.readouterr().out.strip().splitlines()
    assert len(quiet) == 1 and quiet[0].startswith("mpd: clean accuracy"), quiet
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quiet"] is True
