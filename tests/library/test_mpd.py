"""The MPDSGR regularizer: value, granularities, bookkeeping, errors, and its effect."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import DEVICE, assert_close, make_input
from torch import nn

import mpd_triton as mt


class TinySNN(nn.Module):
    """conv-BN-LIF, conv-BN-LIF, linear; [T, B, 1, 8, 8] -> [B, 4] (mean over T)."""

    def __init__(self, backend="auto", surrogate=None, shared=False):
        super().__init__()
        sg = surrogate or mt.Triangle(1.0)
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.lif1 = mt.LIF(tau=2.0, surrogate=sg, backend=backend)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.lif2 = self.lif1 if shared else mt.LIF(tau=2.0, surrogate=sg, backend=backend)
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        T, B = x.shape[:2]
        y = self.lif1(self.bn1(self.conv1(x.flatten(0, 1))).unflatten(0, (T, B)))
        y = self.lif2(self.bn2(self.conv2(y.flatten(0, 1))).unflatten(0, (T, B)))
        return self.fc(y.flatten(2)).mean(0)


def test_value_matches_manual_computation():
    torch.manual_seed(0)
    model = TinySNN().to(DEVICE)
    reg = mt.MPDSGR(model, eta=0.3)
    x = make_input((4, 5, 1, 8, 8), 0)
    model(x)
    omegas = []
    for layer in (model.lif1, model.lif2):
        (mean, var), = layer.mpd_records
        omegas.append(mt.mpd_overlap(mean, var, layer.surrogate.window).mean())
    expected = 0.3 * torch.stack(omegas).mean()
    assert_close("eta * L_MPD", reg(), expected, atol=1e-7, rtol=1e-6)
    assert reg.mean_overlap() == pytest.approx(float(expected.detach()) / 0.3, rel=1e-6)


@pytest.mark.parametrize("granularity,shape", [("time_channel", 4 * 6), ("channel", 6), ("layer", 1)])
def test_granularities(granularity, shape):
    model = TinySNN().to(DEVICE)
    reg = mt.MPDSGR(model, eta=1.0, granularity=granularity)
    model(make_input((4, 3, 1, 8, 8), 1))
    for omega in reg.layer_overlaps():
        assert omega.shape == (shape,)
        assert ((omega >= 0) & (omega <= 1)).all()


def test_gamma_override_changes_the_window():
    model = TinySNN().to(DEVICE)
    narrow = mt.MPDSGR(model, eta=1.0, gamma=0.1)
    model(make_input((4, 3, 1, 8, 8), 2))
    wide = mt.MPDSGR(model, eta=1.0, gamma=5.0)
    assert narrow.mean_overlap() < wide.mean_overlap()


def test_records_cleared_every_forward_and_shared_layer_kept_twice():
    model = TinySNN(shared=True).to(DEVICE)
    reg = mt.MPDSGR(model, eta=1.0, granularity="layer")
    x = make_input((3, 2, 1, 8, 8), 3)
    model(x)
    assert len(model.lif1.mpd_records) == 2  # one layer used twice in a forward
    assert reg.layer_overlaps()[0].shape == (2,)
    model(x)
    assert len(model.lif1.mpd_records) == 2
    reg.remove()
    model(x)
    assert len(model.lif1.mpd_records) == 1


def test_detach_records_keeps_values_for_monitoring():
    model = TinySNN().to(DEVICE)
    reg = mt.MPDSGR(model, eta=1.0)
    model(make_input((3, 2, 1, 8, 8), 5))
    before = reg.mean_overlap()
    assert all(mean.requires_grad for mean, _ in model.lif1.mpd_records)
    reg.detach_records()
    assert not any(mean.requires_grad or var.requires_grad for layer in reg.layers for mean, var in layer.mpd_records)
    assert reg.mean_overlap() == before


def test_eta_zero_is_free_but_still_monitors():
    model = TinySNN().to(DEVICE)
    reg = mt.MPDSGR(model, eta=0.0)
    model(make_input((3, 2, 1, 8, 8), 4))
    assert float(reg()) == 0.0 and not reg().requires_grad
    assert 0.0 < reg.mean_overlap() < 1.0


def test_errors():
    with pytest.raises(ValueError, match="model has no mt.LIF layers"):
        mt.MPDSGR(nn.Linear(2, 2), eta=1.0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        mt.MPDSGR("model", eta=1.0)
    model = TinySNN()
    with pytest.raises(ValueError, match="eta must be >= 0"):
        mt.MPDSGR(model, eta=-0.1)
    with pytest.raises(ValueError, match="granularity must be one of"):
        mt.MPDSGR(model, eta=1.0, granularity="neuron")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        mt.MPDSGR(model, eta=1.0, gamma=0.0)
    reg = mt.MPDSGR(model, eta=1.0)
    with pytest.raises(RuntimeError, match="run a forward pass of the model first"):
        reg()
    with pytest.raises(ValueError, match="mean and var must have the same shape"):
        mt.mpd_overlap(torch.zeros(2, 3), torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="gamma .* must be > 0"):
        mt.mpd_overlap(torch.zeros(2), torch.ones(2), -1.0)


def _train(model, eta, steps, seed=0):
    """A few SGD steps on a fixed synthetic task; returns the mean Omega after training."""
    g = torch.Generator().manual_seed(seed)
    reg = mt.MPDSGR(model, eta=eta)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = (torch.rand(16, 1, 8, 8, generator=g) > 0.5).float().to(DEVICE)
    y = torch.randint(0, 4, (16,), generator=g).to(DEVICE)
    xt = x.unsqueeze(0).repeat(4, 1, 1, 1, 1)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), y) + reg()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        model(xt)
    return reg.mean_overlap()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=[pytest.mark.gpu, pytest.mark.slow])])
def test_regularizer_lowers_overlap(backend):
    """From one initialization, eta > 0 ends with clearly lower Omega than eta = 0."""
    torch.manual_seed(0)
    base = TinySNN(backend=backend).to(DEVICE)
    plain = _train(copy.deepcopy(base), eta=0.0, steps=12)
    regularized = _train(copy.deepcopy(base), eta=2.0, steps=12)
    assert regularized < 0.7 * plain, (plain, regularized)


# ---------------------------------------------------------------- the relative window


def test_relative_window_depends_only_on_the_mean_in_standard_deviations():
    """window="relative": Omega = Phi(k - |m|/sigma) - Phi(-k - |m|/sigma), the same for u and c u
    (a BatchNorm gain cannot lower it), where the surrogate window's Omega falls as u spreads."""
    torch.manual_seed(0)
    model = TinySNN(backend="torch").to(DEVICE)
    relative = mt.MPDSGR(model, eta=1.0, window="relative", k=0.7)
    x = make_input((4, 3, 1, 8, 8), 5)
    model(x)
    for layer, omega in zip((model.lif1, model.lif2), relative.layer_overlaps()):
        (mean, var), = layer.mpd_records
        z = mean.abs() / torch.sqrt(var + mt.DEFAULT_EPS)
        expected = torch.special.ndtr(0.7 - z) - torch.special.ndtr(-0.7 - z)
        assert_close("relative Omega", omega, expected.reshape(-1), atol=1e-6, rtol=1e-5)
    scaled = (torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.3, 2.0, 0.1]))
    for c in (0.5, 3.0):
        m, v = scaled
        base = relative.options.overlap(m, v, 1.0)
        torch.testing.assert_close(relative.options.overlap(c * m, c * c * v, 1.0), base, atol=1e-4, rtol=1e-4)
    surrogate = mt.MPDSGR(model, eta=1.0)
    m, v = torch.tensor([0.5, -0.3, 0.0]), torch.tensor([0.3, 0.5, 0.1])  # means inside the window
    assert (surrogate.options.overlap(3 * m, 9 * v, 1.0) < surrogate.options.overlap(m, v, 1.0)).all()  # spreading lowers it


def test_relative_window_gradient_matches_finite_differences():
    mean = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    var = torch.tensor([0.5, 1.5, 0.2], dtype=torch.float64, requires_grad=True)
    reg = mt.MPDSGR(TinySNN(), eta=1.0, window="relative", k=1.3)
    assert torch.autograd.gradcheck(lambda m, v: reg.options.overlap(m, v, 1.0), (mean, var))


def test_relative_window_bad_options():
    model = TinySNN()
    with pytest.raises(ValueError, match="window must be one of"):
        mt.MPDSGR(model, eta=1.0, window="wide")
    with pytest.raises(ValueError, match="k .* must be > 0"):
        mt.MPDSGR(model, eta=1.0, window="relative", k=0.0)
    with pytest.raises(ValueError, match="relative window is set by k"):
        mt.MPDSGR(model, eta=1.0, window="relative", gamma=1.0)
    assert "window='relative', k=2" in repr(mt.MPDSGR(model, eta=1.0, window="relative", k=2.0))


class _Two(nn.Module):
    """Two named LIF layers, for the messages."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.first = mt.LIF(backend="torch")
        self.second = mt.LIF(backend="torch")

    def forward(self, x):
        return self.second(self.first(self.fc(x)) + x[..., :1])


def test_reg_refuses_a_forward_without_graph_and_says_why():
    model = _Two()
    reg = mt.MPDSGR(model, eta=1.0)
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        model(x)
    with pytest.raises(RuntimeError, match=r"without an autograd graph \(it ran under torch.no_grad\(\)"):
        reg()
    with torch.inference_mode():
        model(x)
    with pytest.raises(RuntimeError, match="would be a constant and regularize nothing"):
        reg()
    with torch.no_grad():  # reading it for a log is fine, and so is mean_overlap
        assert float(reg()) == pytest.approx(reg.mean_overlap())
    model(x)  # a training forward: a differentiable loss again
    assert reg().requires_grad
    assert mt.MPDSGR(_Two(), eta=0.0)() == 0  # eta = 0 asks nothing of the forward


def test_non_finite_statistics_name_the_layer():
    model = _Two()
    reg = mt.MPDSGR(model, eta=1.0)
    x = torch.randn(3, 2, 4)
    model(x)
    reg().backward()
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")  # the first layer's channel 0 at every step and image
    model(x)
    with pytest.raises(FloatingPointError, match=r"LIF layer 0 \('first'\): mean not finite in 3 and variance "
                                                 r"in 3 of 18 \(time step, channel\) cells"):
        reg()
    with pytest.raises(FloatingPointError, match="first"):
        reg.mean_overlap()


def test_options_object_is_the_keywords_validated_once():
    model = TinySNN()
    opts = mt.MPDOptions(granularity="channel", window="relative", k=2.0)
    by_object = mt.MPDSGR(model, eta=0.5, options=opts)
    by_keywords = mt.MPDSGR(TinySNN(), eta=0.5, granularity="channel", window="relative", k=2.0)
    assert by_object.options == by_keywords.options == opts and by_object.granularity == "channel"
    assert repr(by_object) == repr(by_keywords)
    with pytest.raises(ValueError, match="either as options=MPDOptions"):
        mt.MPDSGR(model, eta=0.5, options=opts, k=3.0)
    with pytest.raises(TypeError, match="options must be an mt.MPDOptions"):
        mt.MPDSGR(model, eta=0.5, options={"k": 2.0})
    with pytest.raises(ValueError, match="granularity must be one of"):
        mt.MPDOptions(granularity="neuron")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.k = 1.0
    layer = mt.LIF(surrogate=mt.Sigmoid(4.0))
    assert mt.MPDOptions().layer_gamma(layer) == layer.surrogate.window
    assert mt.MPDOptions(gamma=0.3).layer_gamma(layer) == 0.3
