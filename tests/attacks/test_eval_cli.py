"""python -m train.eval end to end on tiny checkpoints, and its bad input."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_checkpoint

from mpd_triton.attacks.evaluation import EvalSettings, unpack_outcomes
from train.eval import main

_checkpoint = tiny_checkpoint  # the untrained small SNN's model.pt (tests/helpers.py)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"a": _checkpoint(root / "a" / "model.pt"), "b": _checkpoint(root / "b" / "model.pt", seed=1),
            "five": _checkpoint(root / "five" / "model.pt", num_classes=5),
            "cifar": _checkpoint(root / "cifar" / "model.pt", data="cifar10")}


@pytest.mark.slow
def test_end_to_end_two_models_with_transfer(checkpoints, tmp_path, capsys):
    code = main(["--checkpoint", str(checkpoints["a"]), "--checkpoint", str(checkpoints["b"]),
                 "--attacks", "fgsm,pgd,gaussian,transfer", "--eps", "2/255,8/255", "--steps", "2", "--limit", "16",
                 "--gradients", "own,sigmoid", "--source", str(checkpoints["b"]), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "all attacks @ 8/255" in out and "input-gradient L1" in out
    assert (tmp_path / "membrane.png").stat().st_size > 0  # both models' membrane potential, layer by layer
    assert "u in window (counted)" in (tmp_path / "eval.md").read_text()
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["models"]) == {"a", "b"}
    r = report["models"]["a"]
    assert set(r["accuracy"]) == {"fgsm", "pgd", "gaussian", "transfer"}
    assert set(r["accuracy"]["pgd"]) == {f"{2 / 255:.6g}", f"{8 / 255:.6g}"}
    assert set(r["by_gradient"]["pgd"][f"{8 / 255:.6g}"]) == {"own", "sigmoid"}
    assert {c["name"] for c in r["checks"]} >= {"eps_monotone", "iterative_beats_one_step", "large_eps"}
    md = (tmp_path / "eval.md").read_text()
    assert "gradient-masking sanity checks" in md and "python -m train.eval" in md
    assert (tmp_path / "robustness.png").stat().st_size > 0
    # re-checkable: where and with what it was made, and each image's outcome (the transfer attack too)
    for record in (report["provenance"], r["provenance"]):
        assert set(record) >= {"commit", "dirty", "date_utc", "python", "torch", "triton", "cpu", "torch_threads"}
        assert record["device"] == "cpu" and record["torch"] == torch.__version__
    transfer = unpack_outcomes(r["per_image"]["survived"]["transfer"][f"{8 / 255:.6g}"]["worst"], 16)
    assert transfer.mean() == pytest.approx(r["accuracy"]["transfer"][f"{8 / 255:.6g}"])


def test_transfer_of_assg_examples_end_to_end(checkpoints, tmp_path, capsys):
    """--transfer-attack assg: ASSG + SA-PGD's examples on --source, at every level, tried on the model."""
    code = main(["--checkpoint", str(checkpoints["a"]), "--attacks", "fgsm,transfer", "--transfer-attack", "assg",
                 "--assg-level", "0.35,0.49", "--sapgd-steps", "2", "--source", str(checkpoints["b"]),
                 "--eps", "8/255", "--limit", "6", "--no-large-eps-check", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "eval.json").read_text())["models"]["a"]
    assert r["settings"]["transfer_attack"] == "assg" and list(r["accuracy"]) == ["fgsm", "transfer"]
    assert "transfer_attack=assg" in (tmp_path / "eval.md").read_text()


@pytest.mark.slow
def test_reliable_preset_end_to_end(checkpoints, tmp_path, capsys):
    """--reliable: APGD with the five-gradient ensemble, ASSG + SA-PGD, Square, transfer with --source (and
    FGSM for the checks); ASSG in the worst case, the table, the plot's panels and the masking checks."""
    code = main(["--checkpoint", str(checkpoints["a"]), "--reliable", "--source", str(checkpoints["b"]),
                 "--eps", "8/255", "--limit", "6", "--apgd-steps", "2", "--sapgd-steps", "2", "--queries", "5",
                 "--steps", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "assg @ 8/255" in out and "assg @ eps 1 (check)" in out
    r = json.loads((tmp_path / "eval.json").read_text())["models"]["a"]
    assert list(r["accuracy"]) == ["fgsm", "apgd", "assg", "square", "transfer"]
    assert r["settings"]["gradients"] == ["own", "triangle", "sigmoid", "atan", "bptr"]
    assert r["settings"]["assg_levels"] == [0.35, 0.425, 0.49]  # the paper's search range and default
    assert list(r["assg_by_level"][f"{8 / 255:.6g}"]) == ["0.35", "0.425", "0.49"]
    key = f"{8 / 255:.6g}"
    assert r["worst_case"][key] <= min(v[key] for v in r["accuracy"].values())
    assert "assg" in r["large_eps"]["by_attack"]
    assert (tmp_path / "robustness.png").stat().st_size > 0


BAD = [
    (["--attacks", "fgsm,cw"], "unknown attack 'cw'"),
    (["--eps", "2"], r"eps must be in [0, 1]"),
    (["--eps", "x/255"], "--eps: expected a number or a fraction"),
    (["--attacks", "transfer"], "the transfer attack needs --source"),
    (["--data", "cifar10"], "is a model for fmnist-subset, not cifar10"),
    (["--gradients", "relu"], "unknown gradient source 'relu'"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--sapgd-steps", "0"], "sapgd_steps must be >= 1"),
    (["--assg-level", "0.7"], r"ASSG level must be in (0, 0.5)"),
    (["--assg-level", "big"], "--assg-level: expected numbers in (0, 0.5), got 'big'"),
    (["--transfer-attack", "square"], "argument --transfer-attack: invalid choice: 'square'"),
    (["--reliable", "--attacks", "fgsm"], "--reliable sets the attacks and the gradients"),
    (["--reliable", "--gradients", "own"], "--reliable sets the attacks and the gradients"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line(checkpoints, argv, message, capsys, tmp_path):
    code = main(["--checkpoint", str(checkpoints["a"]), "--limit", "4", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_source_with_other_classes_and_foreign_checkpoints(checkpoints, tmp_path, capsys):
    code = main(["--checkpoint", str(checkpoints["a"]), "--attacks", "transfer", "--source",
                 str(checkpoints["five"]), "--limit", "4", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "has 5 classes" in err
    code = main(["--checkpoint", str(checkpoints["a"]), "--checkpoint", str(checkpoints["cifar"]), "--limit", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "was trained on cifar10" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    code = main(["--checkpoint", str(bad), "--limit", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a file that mpd-triton saved (not a torch.save archive)" in err
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    code = main(["--checkpoint", str(tmp_path / "foreign.pt"), "--limit", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "is not an mpd-triton file" in err


def test_help_shows_real_defaults():
    """--help shows the defaults that apply (not None), once, and keeps the examples as written."""
    from mpd_triton.attacks.methods import SAPGD_STEPS
    from train.eval import build_parser

    raw = build_parser().format_help()
    text = " ".join(raw.split())
    for shown in ("comma-separated eps list (fractions allowed) (default: 2/255,4/255,8/255)",
                  "PGD / BIM steps (default: 7)", "PGD / BIM step size (default: 0.01)",
                  "APGD iterations (default: 50)", f"SA-PGD and ASSG iterations (default: {SAPGD_STEPS})",
                  "Square attack query budget (default: 1000)", "test images (0: all) (default: 1000)",
                  "test images per batch (default: 250)", "--seed SEED random seed", "(default: 0)",
                  "auto, cpu, cuda or cuda:N (default: auto)"):
        assert shown in text, shown
    assert "default: None" not in text and "default: False" not in text
    assert "(default: the run folder name) --attacks" in text  # a default the help states is not repeated
    assert "\n    python -m train.eval --checkpoint runs/quick-*/mpd/model.pt --reliable" in raw  # raw description


def test_device_and_small_sets_and_diagnosis(checkpoints, tmp_path, capsys):
    """--device cuda without CUDA is said in one line (not blamed on the checkpoint); fewer images than a batch
    make no full batch to compile, and the compile line says so (it said "0 forward-backward passes"); an
    untrained model at chance is diagnosed before the table, its checks not alarmed."""
    from train.eval import evaluation_passes

    if not torch.cuda.is_available():
        assert main(["--checkpoint", str(checkpoints["a"]), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --device cuda: CUDA is not available here") and "\n" not in err
    assert evaluation_passes(EvalSettings(attacks=["fgsm"], batch_size=250), 200) == 0  # partial batches: eager
    assert main(["--checkpoint", str(checkpoints["a"]), "--attacks", "fgsm,pgd", "--eps", "8/255", "--steps", "2",
                 "--limit", "16", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "torch.compile: off (auto: 16 images make no full batch of 250, and only full batches run compiled)" in out
    assert "[a] the model is at chance: clean accuracy" in out and "robustness cannot be judged" in out
    assert out.index("robustness cannot be judged") < out.index("all attacks @ 8/255")
    assert "!!!" not in captured.err


def test_a_second_evaluation_in_the_same_folder_is_refused_and_the_first_is_left_alone(checkpoints, tmp_path, capsys):
    """train.eval holds a lock on --out (as train.run does): a second one started there, a --resume started
    twice for example, stops in one line naming the first and writes nothing, and the folder is free again
    once the first has finished."""
    from plumbing.lock import folder_lock

    argv = ["--checkpoint", str(checkpoints["a"]), "--attacks", "fgsm", "--eps", "8/255", "--limit", "4",
            "--no-large-eps-check", "--out", str(tmp_path / "eval")]
    with folder_lock(tmp_path / "eval", "train.eval"):  # the first evaluation, still running
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "is in use by train.eval (pid" in err, err
        assert [p.name for p in (tmp_path / "eval").iterdir()] == [".lock"]  # nothing written by the second
    assert main(argv) == 0, capsys.readouterr().err  # the first has finished: the folder is free
    assert (tmp_path / "eval" / "eval.json").is_file()
    assert main([*argv, "--resume"]) == 0  # and its lock went with it: a resume may take the folder
