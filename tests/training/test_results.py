"""train.results: which evaluations of an eval.json have finished (the one answer the sweep, the study's
landing script and its validity study share)."""

from __future__ import annotations

import json

from train.results import IN_PROGRESS, finished_models, images_done


def test_a_finished_file_gives_its_models(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"command": "x", "models": {"a": {"n": 3}, "b": {"n": 3}}}))
    assert finished_models(path) == {"a": {"n": 3}, "b": {"n": 3}}


def test_missing_unreadable_empty_or_in_progress_files_give_none(tmp_path):
    assert finished_models(tmp_path / "none.json") is None
    broken = tmp_path / "broken.json"
    broken.write_text('{"models": {"a":')  # cut short by a crash mid-write
    assert finished_models(broken) is None
    for saved in ({"models": {}}, [], {"models": {"a": {}}, IN_PROGRESS: {"model": "b", "state": {"next": 250}}}):
        path = tmp_path / "eval.json"
        path.write_text(json.dumps(saved))
        assert finished_models(path) is None, saved


def test_how_far_an_unfinished_evaluation_got(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"key": {"n": 1000}, "models": {},
                                IN_PROGRESS: {"model": "a", "state": {"next": 250}}}))
    assert images_done(path) == (250, 1000)
    path.write_text(json.dumps({"key": {"n": 1000}, "models": {}, IN_PROGRESS: {"model": "a", "state": {"next": 1250}}}))
    assert images_done(path) == (1000, 1000)  # the last batch's "next" may run past the end
    for saved in ({"key": {"n": 10}, "models": {"a": {}}}, {"models": {}, IN_PROGRESS: {"model": "a"}}, []):
        path.write_text(json.dumps(saved))
        assert images_done(path) is None, saved
    assert images_done(tmp_path / "none.json") is None
