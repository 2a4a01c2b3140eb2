"""What the MPD-SGR study is built from: models with BatchNorm before every LIF and a width,
the SR baseline, the per-layer diagnostics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import mpd_triton as mt
from models import MODEL_WIDTHS, build_model
from train.config import ConfigError, parse_args
from train.diagnostics import layer_diagnostics
from train.regularizers import sr_penalty
from train.run import main as run_main

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("name", sorted(MODEL_WIDTHS))
def test_classifier_bn_puts_batchnorm_before_every_lif(name):
    size = 28 if name != "vgg16" else 32
    for bn in (False, True):
        model = build_model(name, in_channels=1, num_classes=10, image_size=size, T=2, width=4, hidden=8,
                            classifier_bn=bn)
        order = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, mt.LIF))]
        lifs = [i for i, m in enumerate(order) if isinstance(m, mt.LIF)]
        preceded = [i > 0 and not isinstance(order[i - 1], mt.LIF) for i in lifs]
        assert all(preceded) == bn, (name, bn, order)
        assert model(torch.rand(3, 1, size, size)).shape == (3, 10)


def test_vgg_width_scales_every_layer_and_the_classifier():
    full = build_model("vgg11", in_channels=1, num_classes=10, image_size=28, T=1)
    small = build_model("vgg11", in_channels=1, num_classes=10, image_size=28, T=1, width=16)
    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    assert convs(full) == [64, 128, 256, 512, 512, 512, 512, 512]
    assert convs(small) == [16, 32, 64, 128, 128, 128, 128, 128]
    linears = [m.out_features for m in small.modules() if isinstance(m, nn.Linear)]
    assert linears == [1024, 1024, 10]
    with pytest.raises(ValueError, match="width"):
        build_model("vgg11", width=0)


def test_width_and_classifier_bn_on_the_command_line():
    cfg, _ = parse_args(["--model", "vgg11", "--width", "16", "--classifier-bn"])
    assert cfg.model_options() == {"width": 16, "classifier_bn": True}
    assert parse_args([])[0].model_options() == {}
    with pytest.raises(ConfigError, match="not of wrn16"):
        parse_args(["--model", "wrn16", "--classifier-bn"])
    with pytest.raises(ConfigError, match="width must be >= 1"):
        parse_args(["--width", "0"])


def test_a_run_with_width_and_classifier_bn_is_evaluated_with_its_architecture(tmp_path):
    """model_spec carries the architecture options: train.eval rebuilds the same network."""
    from train.eval import load_model

    code = run_main(["--width", "4", "--classifier-bn", "--eta", "0", "--no-compare", "--epochs", "1",
                     "--train-limit", "200", "--test-limit", "100", "--eval-attacks", "", "--batch-size", "50",
                     "--out", str(tmp_path)])
    assert code == 0
    model, spec = load_model(tmp_path / "plain" / "model.pt", "cpu")
    assert spec["width"] == 4 and spec["classifier_bn"] is True
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 1
    report = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert report["test_images"] == 100
    assert report["config"]["eta"] == 0.0
    assert [d["layer"] for d in report["diagnostics"]] == [1, 2, 3]
    assert "u in window (counted)" in (tmp_path / "plain" / "report.md").read_text()


def test_compare_gives_each_run_its_own_eta(tmp_path):
    """The plain run of --compare records eta 0 in its checkpoint and report (one eta per run)."""
    code = run_main(["--eta", "0.05", "--compare", "--epochs", "1", "--train-limit", "100", "--test-limit", "50",
                     "--eval-attacks", "", "--batch-size", "50", "--out", str(tmp_path)])
    assert code == 0
    for run, eta in (("plain", 0.0), ("mpd", 0.05)):
        saved = torch.load(tmp_path / run / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert saved["config"]["eta"] == eta and saved["config"]["compare"] is False
        assert json.loads((tmp_path / run / "report.json").read_text())["eta"] == eta
    assert json.loads((tmp_path / "config.json").read_text())["compare"] is True


# ---------------------------------------------------------------- SR


def test_sr_penalty_is_half_the_squared_true_class_gradient_of_a_linear_model():
    """For f = W x + b the finite difference along the normalized gradient is exact: the term is
    |W_y|^2 / 2 averaged over the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x = torch.rand(6, 1, 3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    value = sr_penalty(model, x, model(x), y)
    expected = model[1].weight[y].square().sum(1).mean() / 2
    torch.testing.assert_close(value, expected, rtol=1e-3, atol=1e-4)
    value.backward()  # differentiable in the parameters (through both forwards)
    assert model[1].weight.grad is not None and model[1].weight.grad.abs().sum() > 0


def test_sr_penalty_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(ValueError, match="requires_grad"):
        sr_penalty(model, x, model(x), torch.tensor([0, 1]))
    x.requires_grad_(True)
    with pytest.raises(ValueError, match="h must be > 0"):
        sr_penalty(model, x, model(x), torch.tensor([0, 1]), h=0.0)
    with pytest.raises(ConfigError, match="sr lambda"):
        parse_args(["--sr-lambda", "-1"])


def test_sr_training_shrinks_the_input_gradient(tmp_path):
    """SR's term reaches the weights: trained from the same seed, the SR model's true-class input
    gradient (what SR penalizes) is smaller than the plain model's."""
    from train.eval import load_model

    common = ["--no-compare", "--epochs", "2", "--train-limit", "2000", "--test-limit", "200", "--eval-attacks", "",
              "--batch-size", "50", "--eta", "0"]
    assert run_main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert run_main([*common, "--sr-lambda", "1", "--out", str(tmp_path / "sr")]) == 0
    from train.data import load_dataset

    _, test, _ = load_dataset("fmnist-subset")
    x, y = test.images[:200].float().div(255), test.labels[:200]
    norms = {}
    for name in ("plain", "sr"):
        model, _ = load_model(tmp_path / name / "plain" / "model.pt", "cpu")
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg).gather(1, y[:, None]).sum(), xg)
        norms[name] = float(grad.flatten(1).norm(dim=1).mean())
    assert norms["sr"] < 0.8 * norms["plain"], norms


def test_sr_with_a_compiled_model():
    """The SR step backpropagates twice through the forward: a compiled model takes it."""
    from train.compiling import compile_for_batches

    torch.manual_seed(0)
    model = build_model("small", in_channels=1, num_classes=4, image_size=8, T=2, width=4, hidden=8)
    net = compile_for_batches(model, 4, True, retain_graph=True)
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    logits = net(x)
    loss = nn.functional.cross_entropy(logits, y) + sr_penalty(net, x, logits, y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- diagnostics


def test_diagnostics_count_what_the_layers_do():
    torch.manual_seed(0)
    model = build_model("small", in_channels=1, num_classes=4, image_size=8, T=3, width=4, hidden=8,
                        neuron=dict(backend="torch")).eval()
    x = torch.rand(10, 1, 8, 8)
    spikes, inputs = {}, {}
    layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: (inputs.__setitem__(i, a[0]), spikes.__setitem__(i, o)))
             for i, layer in enumerate(layers)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    diagnostics = layer_diagnostics(model, x, batch_size=4)  # 3 batches: the sums add up
    assert len(diagnostics) == 3
    for i, d in enumerate(diagnostics):
        u = mt.lif_reference(inputs[i].float(), layers[i].config).u
        assert d["firing_rate"] == pytest.approx(float(spikes[i].float().mean()), abs=1e-6)
        assert d["silent"] == pytest.approx(float((spikes[i].sum(0) == 0).float().mean()), abs=1e-6)
        assert d["in_window"] == pytest.approx(float((u.abs() <= d["window"]).float().mean()), abs=1e-6)
        assert d["u_mean"] == pytest.approx(float(u.mean()), abs=1e-5)
        assert d["u_std"] == pytest.approx(float(u.std(unbiased=False)), rel=1e-4)
        assert 0 <= d["omega"] <= 1 and d["cell_std"] > 0
    assert model.training is False


def test_diagnostics_show_a_silenced_layer():
    torch.manual_seed(0)
    model = build_model("small", in_channels=1, num_classes=4, image_size=8, T=2, width=4, hidden=8)
    with torch.no_grad():
        model.classifier[0].module.bias.fill_(-50.0)  # the hidden layer's currents far below threshold
    d = layer_diagnostics(model, torch.rand(8, 1, 8, 8))[2]
    assert d["firing_rate"] == 0.0 and d["silent"] == 1.0
    assert d["in_window"] == 0.0 and d["omega"] < 1e-6
    with pytest.raises(ValueError, match="at least one image"):
        layer_diagnostics(model, torch.rand(0, 1, 8, 8))
