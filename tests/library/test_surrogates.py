"""Surrogate gradients: Triton helper == PyTorch formula, window conventions, construction."""

import math

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, assert_close

import mpd_triton as mt
from mpd_triton.surrogates import surrogate_grad

ALL = [mt.Triangle(), mt.Rectangular(), mt.Sigmoid(), mt.ATan(), mt.SuperSpike(),
       mt.Triangle(0.3), mt.Rectangular(1.7), mt.Sigmoid(10.0), mt.ATan(0.7), mt.SuperSpike(3.0)]


@triton.jit
def _apply_surrogate(u_ptr, g_ptr, n, param, KIND: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    u = tl.load(u_ptr + i, mask=m, other=0.0)
    tl.store(g_ptr + i, surrogate_grad(u, param, KIND), mask=m)


@pytest.mark.parametrize("sg", ALL, ids=repr)
def test_triton_helper_matches_torch_formula(sg):
    w = sg.window
    special = torch.tensor([0.0, -0.0, w, -w, 0.999999 * w, -1.000001 * w, 1e-30, -1e-30, 50.0, -50.0, 1e6])
    u = torch.cat([special, torch.linspace(-3 * w, 3 * w, 997)]).to(DEVICE)
    g = torch.full_like(u, math.nan)
    _apply_surrogate[(triton.cdiv(u.numel(), 256),)](u, g, u.numel(), sg.param, KIND=sg.kind, BLOCK=256)
    assert_close(f"{sg!r}", g, sg.grad(u), atol=1e-7, rtol=2e-6)


@pytest.mark.parametrize("sg", [mt.Sigmoid(), mt.ATan(), mt.SuperSpike(), mt.Sigmoid(9.0), mt.ATan(0.5)], ids=repr)
def test_smooth_window_is_where_g_falls_to_a_tenth_of_its_peak(sg):
    u = torch.tensor([0.0, sg.window, -sg.window], dtype=torch.float64)
    g = sg.grad(u)
    assert g[1] / g[0] == pytest.approx(mt.WINDOW_PEAK_FRACTION, rel=1e-9)
    assert g[2] / g[0] == pytest.approx(mt.WINDOW_PEAK_FRACTION, rel=1e-9)


@pytest.mark.parametrize("cls", [mt.Triangle, mt.Rectangular])
def test_compact_window_is_the_support(cls):
    sg = cls(0.7)
    assert sg.window == 0.7
    u = torch.tensor([0.7, -0.7, 0.7 * (1 - 1e-6), 0.8], dtype=torch.float64)
    g = sg.grad(u)
    assert g[0] == 0 and g[1] == 0 and g[2] > 0 and g[3] == 0


def test_surrogates_integrate_to_one_where_they_should():
    u = torch.linspace(-200, 200, 2_000_001, dtype=torch.float64)
    du = float(u[1] - u[0])
    for sg in (mt.Triangle(0.5), mt.Rectangular(0.5), mt.Sigmoid(4.0)):
        assert float(sg.grad(u).sum()) * du == pytest.approx(1.0, abs=1e-3), sg
    assert float(mt.ATan(2.0).grad(u).sum()) * du == pytest.approx(1.0, abs=3e-3)  # heavy tails


def test_window_override_and_defaults():
    assert mt.Sigmoid(4.0, gamma=1.0).window == 1.0
    assert mt.Triangle().param == 1.0 and mt.Rectangular().param == 0.5
    assert mt.Sigmoid().param == 4.0 and mt.ATan().param == 2.0 and mt.SuperSpike().param == 10.0
    assert mt.ATan(2.0).window == pytest.approx(6.0 / (math.pi * 2.0))


def test_names_and_errors():
    for name in mt.SURROGATE_NAMES:
        assert mt.as_surrogate(name).name == name
    assert isinstance(mt.as_surrogate("ATan"), mt.ATan)
    with pytest.raises(ValueError, match="surrogate: unknown name 'relu'"):
        mt.as_surrogate("relu")
    with pytest.raises(TypeError, match="surrogate must be a Surrogate"):
        mt.as_surrogate(3)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
            mt.Triangle(bad)
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            mt.Sigmoid(bad)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        mt.ATan("2")
    with pytest.raises(TypeError, match="gamma must be a real number"):
        mt.Triangle(True)


def test_equality_and_spike_function():
    assert mt.Triangle(1.0) == mt.Triangle(1.0) and mt.Triangle(1.0) != mt.Rectangular(1.0)
    assert len({mt.Sigmoid(), mt.Sigmoid()}) == 1
    u = torch.tensor([-2.0, -0.5, 0.0, 0.5], requires_grad=True)
    s = mt.Triangle(1.0)(u)
    assert s.tolist() == [0.0, 0.0, 1.0, 1.0]
    s.sum().backward()
    assert u.grad.tolist() == [0.0, 0.5, 1.0, 0.5]
