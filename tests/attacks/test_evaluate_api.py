"""mt.attacks.evaluate: the library's entry point to the evaluation, on tensors or a DataLoader, with the
suites, the torchattacks convention, models of [T, B, ...] input, and the same numbers as train.eval."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import mpd_triton as mt
from mpd_triton.attacks import (
    SUITES,
    EvalSettings,
    TimeSteps,
    evaluate,
    evaluate_robustness,
)
from train.checkpoint import save_checkpoint


def _model(seed=0):
    torch.manual_seed(seed)
    model = mt.models.build("small", in_channels=1, image_size=12, num_classes=10, width=4, hidden=16, T=2,
                            neuron=dict(backend="torch"))
    with torch.no_grad():  # firing in eval mode: BatchNorm statistics from a few random batches
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model.train()
        for _ in range(3):
            model(torch.rand(64, 1, 12, 12))
    return model.eval()


def _data(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.slow
def test_evaluate_is_evaluate_robustness_with_the_suites_settings():
    model, (x, y) = _model(), _data()
    result = evaluate(model, x, y, eps=[4 / 255, 16 / 255], steps=2, apgd_steps=3, batch_size=8, progress=False)
    settings = EvalSettings(attacks=list(SUITES["default"]["attacks"]), eps=[4 / 255, 16 / 255], steps=2,
                            apgd_steps=3, batch_size=8)
    assert result == evaluate_robustness(model, x, y, settings, num_classes=10, progress=False)
    assert set(result["accuracy"]) == {"fgsm", "pgd", "apgd", "gaussian"}
    for key in ("clean", "worst_case", "checks", "all_checks_passed", "per_image", "by_gradient"):
        assert key in result


def test_a_dataloader_gives_what_its_tensors_give():
    model, (x, y) = _model(), _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    args = dict(eps=[8 / 255], suite="paper", steps=2, large_eps_check=False, batch_size=6, progress=False)
    assert evaluate(model, loader, **args) == evaluate(model, x, y, **args)


def test_the_reliable_suite_and_overrides():
    model, (x, y) = _model(), _data(6)
    r = evaluate(model, x, y, suite="reliable", sapgd_steps=2, apgd_steps=2, n_queries=6, assg_levels=[0.35],
                 gradients=["own", "bptr"], large_eps_check=False, progress=False)
    s = r["settings"]
    assert s["attacks"] == ["fgsm", "apgd", "assg", "square"] and s["gradients"] == ["own", "bptr"]
    assert s["assg_levels"] == [0.35] and s["sapgd_steps"] == 2
    full = SUITES["reliable"]
    assert full["gradients"] == ("own", "triangle", "sigmoid", "atan", "bptr") and len(full["assg_levels"]) == 3
    source = _model(seed=3)
    with_source = evaluate(model, x, y, suite="reliable", source=source, sapgd_steps=2, apgd_steps=2, n_queries=6,
                           assg_levels=[0.35], gradients=["own"], large_eps_check=False, progress=False)
    assert "transfer" in with_source["accuracy"]


@pytest.mark.parametrize("images,labels,error,match", [
    (torch.rand(4, 1, 12, 12) * 255, torch.zeros(4, dtype=torch.long), ValueError, r"must lie in \[0, 1\]"),
    (torch.zeros(4, 1, 12, 12, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), TypeError, "floating point"),
    (torch.rand(4, 1, 12, 12), None, ValueError, "labels are needed"),
    (torch.rand(4, 1, 12, 12), torch.zeros(3, dtype=torch.long), ValueError, "4 images but labels of shape"),
])
def test_bad_input_is_refused_in_one_line(images, labels, error, match):
    with pytest.raises(error, match=match):
        evaluate(_model(), images, labels, progress=False)
    with pytest.raises(ValueError, match="suite must be one of default, reliable, paper"):
        evaluate(_model(), torch.rand(2, 1, 12, 12), torch.zeros(2, dtype=torch.long), suite="strong")


def test_a_model_of_time_steps_through_time_steps():
    """A [T, B, F] -> [T, B, K] network (the shape of a converted SpikingJelly model in multi-step mode)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(144, 32), mt.LIF(backend="torch", v_th=0.5), nn.Linear(32, 10))
    wrapped = TimeSteps(nn.Sequential(nn.Flatten(2), net), T=3)
    x, y = _data(8)
    expected = net(x.flatten(1).unsqueeze(0).expand(3, 8, 144)).mean(0)
    assert torch.allclose(wrapped(x), expected)
    r = evaluate(wrapped, x, y, suite="paper", steps=2, progress=False)
    assert r["n"] == 8 and 0 <= r["worst_case"][f"{8 / 255:.6g}"] <= r["clean"]
    with pytest.raises(ValueError, match="T must be a whole number >= 1"):
        TimeSteps(net, 0)
    with pytest.raises(ValueError, match=r"expected \[T = 3, B, classes\]"):
        TimeSteps(nn.Flatten(0), 3)(x)


@pytest.mark.slow
def test_train_eval_reports_what_evaluate_gives(tmp_path):
    """The command line and the library agree, figure for figure, on a checkpoint of train.run's format."""
    from train.data import load_dataset
    from train.eval import main

    torch.manual_seed(0)
    spec = {"model": "small", "in_channels": 1, "num_classes": 10, "image_size": 28, "T": 2, "encoding": "direct",
            "neuron": {"backend": "torch"}, "width": 4, "hidden": 16, "mean": [0.286], "std": [0.353],
            "data": "fmnist-subset"}
    model = mt.models.build("small", **{k: v for k, v in spec.items() if k not in ("model", "data")})
    save_checkpoint(tmp_path / "m" / "model.pt", {"model": model.state_dict(), "model_spec": spec})
    assert main(["--checkpoint", str(tmp_path / "m" / "model.pt"), "--attacks", "fgsm,pgd,gaussian",
                 "--eps", "2/255,8/255", "--steps", "2", "--limit", "16", "--batch-size", "8", "--no-compile",
                 "--no-channels-last", "--out", str(tmp_path / "e")]) == 0
    from_cli = json.loads((tmp_path / "e" / "eval.json").read_text())["models"]["m"]
    _, test, _ = load_dataset("fmnist-subset")
    loaded = mt.models.load(tmp_path / "m" / "model.pt")
    r = evaluate(loaded, test.images[:16].float().div(255.0), test.labels[:16], eps=[2 / 255, 8 / 255],
                 attacks=["fgsm", "pgd", "gaussian"], steps=2, batch_size=8, progress=False)
    for key in ("clean", "accuracy", "worst_case", "per_image", "checks", "by_gradient", "grad_l1"):
        assert json.loads(json.dumps(r[key])) == from_cli[key], key
