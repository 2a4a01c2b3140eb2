"""The reference itself: against the design's equations written out independently,
against float64, and against finite differences where the function is smooth."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, rel_error
from hypothesis import given
from hypothesis import strategies as st

import mpd_triton as mt
from mpd_triton.reference import membrane_stats


def _design_lif_scalar(xs, tau, v_th, v_reset, decay_input, detach_reset, g, grad_s):
    """docs/design.md, section 2, literally, for one neuron in float64 Python floats:
    forward (with "/ tau") and the hand-written BPTT recursion for e_t."""
    v_r = 0.0 if v_reset is None else v_reset
    v = v_r
    hs, ss = [], []
    for x in xs:
        if decay_input:
            h = v + (x - (v - v_r)) / tau
        else:
            h = v - (v - v_r) / tau + x
        s = 1.0 if h >= v_th else 0.0
        v = h * (1 - s) + v_r * s if v_reset is not None else h - v_th * s
        hs.append(h)
        ss.append(s)
    grads = [0.0] * len(xs)
    gv = 0.0
    for t in reversed(range(len(xs))):
        gt = g(hs[t] - v_th)
        if v_reset is not None:
            dv_dh = (1 - ss[t]) + (0.0 if detach_reset else (v_r - hs[t]) * gt)
        else:
            dv_dh = 1 - (0.0 if detach_reset else v_th * gt)
        e = grad_s[t] * gt + gv * dv_dh
        grads[t] = e / tau if decay_input else e
        gv = e * (1 - 1 / tau)
    return hs, ss, grads


@given(
    xs=st.lists(st.floats(-1.0, 3.0), min_size=1, max_size=12),
    tau=st.sampled_from([1.0, 2.0, 4.0, 7.5]),
    v_th=st.floats(0.3, 1.5),
    v_reset=st.sampled_from([0.0, None, -0.4]),
    decay_input=st.booleans(),
    detach_reset=st.booleans(),
    surrogate=st.sampled_from([mt.Triangle(), mt.Sigmoid(), mt.ATan(), mt.SuperSpike(), mt.Rectangular()]),
    seed=st.integers(0, 1000),
)
def test_reference_follows_the_design_equations(xs, tau, v_th, v_reset, decay_input, detach_reset, surrogate, seed):
    grad_s = torch.randn(len(xs), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    hs, ss, grads = _design_lif_scalar(xs, tau, v_th, v_reset, decay_input, detach_reset,
                                       lambda u: float(surrogate.grad(torch.tensor(u, dtype=torch.float64))),
                                       grad_s.tolist())
    x = torch.tensor(xs, dtype=torch.float64)[:, None, None].requires_grad_(True)
    cfg = mt.LIFConfig(tau, v_th, v_reset, decay_input, detach_reset, surrogate)
    out = mt.lif_reference(x, cfg)
    # "* inv_tau" and "/ tau" differ in the last bit: allow a spike flip only at that level.
    u_design = torch.tensor(hs, dtype=torch.float64) - v_th
    if not torch.equal(out.spikes.flatten(), torch.tensor(ss, dtype=torch.float64)):
        assert float(u_design.abs().min()) < 1e-12
        return
    assert_close("u", out.u.flatten(), u_design, atol=1e-12, rtol=1e-12)
    (out.spikes.flatten() * grad_s).sum().backward()
    assert_close("grad_x", x.grad.flatten(), torch.tensor(grads, dtype=torch.float64), atol=1e-12, rtol=1e-10)


def test_float32_reference_close_to_float64():
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(8, 16, 6, 5, 5, generator=g, dtype=torch.float64) * 1.5 + 0.5
    cfg = mt.LIFConfig(tau=2.0, surrogate=mt.Sigmoid())
    o32 = mt.lif_reference(x64.float(), cfg, return_stats=True)
    o64 = mt.lif_reference(x64, cfg, return_stats=True)
    assert o32.spikes.dtype == torch.float32 and o64.spikes.dtype == torch.float64
    agree = (o32.spikes.double() == o64.spikes).double().mean()
    assert agree > 0.9999
    assert rel_error(o32.mean, o64.mean) < 1e-5 and rel_error(o32.var, o64.var) < 1e-5


def _x_away_from_threshold(shape, cfg, seed):
    """float64 input whose membrane potential stays >= 1e-3 away from the threshold at every step."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(100):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.2 + 0.6
        if float(mt.lif_reference(x, cfg).u.abs().min()) > 1e-3:
            return x
    raise AssertionError("could not draw an input away from the threshold")


@pytest.mark.parametrize("v_reset", [0.0, None])
@pytest.mark.parametrize("decay_input", [True, False])
def test_statistics_gradient_against_finite_differences(v_reset, decay_input):
    """With detach_reset the path x -> (mean, var) -> Omega is smooth between spike
    flips, and autograd's gradient is the true derivative: gradcheck it."""
    cfg = mt.LIFConfig(tau=2.0, v_th=1.0, v_reset=v_reset, decay_input=decay_input, detach_reset=True,
                       surrogate=mt.Sigmoid())
    x = _x_away_from_threshold((4, 3, 2, 2, 2), cfg, 7).requires_grad_(True)

    def stats(x):
        out = mt.lif_reference(x, cfg, return_stats=True)
        return out.mean, out.var

    def overlap(x):
        return mt.mpd_overlap(*stats(x), gamma=cfg.surrogate.window)

    assert torch.autograd.gradcheck(stats, (x,), eps=1e-7, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(overlap, (x,), eps=1e-7, atol=1e-6, rtol=1e-5)


def test_overlap_gradcheck_and_formula():
    g = torch.Generator().manual_seed(1)
    mean = (torch.randn(5, 7, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    var = (torch.rand(5, 7, generator=g, dtype=torch.float64) * 3 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, v: mt.mpd_overlap(m, v, 0.8), (mean, var))
    # Against the textbook form Phi((mean + gamma)/sigma) - Phi((mean - gamma)/sigma) via erf.
    sigma = torch.sqrt(var + mt.DEFAULT_EPS)
    phi = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))  # noqa: E731
    textbook = phi((mean + 0.8) / sigma) - phi((mean - 0.8) / sigma)
    assert_close("omega", mt.mpd_overlap(mean, var, 0.8), textbook, atol=1e-12, rtol=1e-10)


def test_overlap_keeps_precision_far_from_the_window():
    mean = torch.tensor([40.0, -40.0, 10.0], dtype=torch.float32, requires_grad=True)
    var = torch.tensor([1.0, 1.0, 1.0])
    omega = mt.mpd_overlap(mean, var, 1.0)
    sigma = math.sqrt(1.0 + mt.DEFAULT_EPS)
    phi = lambda z: 0.5 * math.erfc(-z / math.sqrt(2.0))  # noqa: E731
    expected = phi((1.0 - 10.0) / sigma) - phi((-1.0 - 10.0) / sigma)
    assert float(omega[2].detach()) == pytest.approx(expected, rel=1e-4, abs=0)  # ~1e-19: 1 - 1 would give 0
    assert float(omega[0].detach()) == float(omega[1].detach()) >= 0
    omega[2].backward()
    assert mean.grad[2] < 0  # still pushes the mean further out


def test_membrane_stats_and_granularities():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(4, 6, 3, 5, 2, generator=g, dtype=torch.float64) * 2 + 1
    mean, var = membrane_stats(u)
    assert mean.shape == (4, 3)
    flat = u.permute(0, 2, 1, 3, 4).reshape(4, 3, -1)
    assert_close("mean", mean, flat.mean(-1), atol=1e-12, rtol=0)
    assert_close("var", var, flat.var(-1, unbiased=False), atol=1e-12, rtol=0)
    m_c, v_c = mt.combine_stats(mean, var, "channel")
    per_c = u.permute(2, 0, 1, 3, 4).reshape(3, -1)
    assert_close("channel mean", m_c, per_c.mean(-1), atol=1e-12, rtol=0)
    assert_close("channel var", v_c, per_c.var(-1, unbiased=False), atol=1e-12, rtol=0)
    m_l, v_l = mt.combine_stats(mean, var, "layer")
    assert float(m_l) == pytest.approx(float(u.mean()), abs=1e-12)
    assert float(v_l) == pytest.approx(float(u.var(unbiased=False)), abs=1e-12)
    with pytest.raises(ValueError, match="granularity must be one of"):
        mt.combine_stats(mean, var, "pixel")


@pytest.mark.parametrize("surrogate", [mt.Triangle(), mt.Rectangular(), mt.Sigmoid(), mt.ATan(), mt.SuperSpike()],
                         ids=lambda s: s.name)
def test_per_channel_surrogate_param_equals_one_scalar_surrogate_per_channel(surrogate):
    """The oracle of the per-channel / per-element surrogate parameter, built without it: channels
    of a LIF are independent, so running each channel alone with the scalar surrogate of its own
    parameter must give the same gradient (and per-element, each single neuron alone)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 2, 3, 4, generator=g, dtype=torch.float64) * 1.5 + 0.6)
    param = torch.rand(3, generator=g, dtype=torch.float64) * 2 + 0.3
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)
    cfg = mt.LIFConfig(tau=2.0, v_th=0.9, surrogate=surrogate)

    def grad_x(xin, config, **kw):
        xin = xin.clone().requires_grad_(True)
        (mt.lif_reference(xin, config, **kw).spikes * w[:, :, : xin.shape[2]]).sum().backward()
        return xin.grad

    split = []
    for c in range(3):
        cfg_c = mt.LIFConfig(tau=2.0, v_th=0.9, surrogate=type(surrogate)(float(param[c])))
        xin = x[:, :, c:c + 1].clone().requires_grad_(True)
        (mt.lif_reference(xin, cfg_c).spikes * w[:, :, c:c + 1]).sum().backward()
        split.append(xin.grad)
    expected = torch.cat(split, dim=2)
    assert_close("per channel", grad_x(x, cfg, surrogate_param=param), expected, atol=1e-12, rtol=1e-10)
    assert_close("per element", grad_x(x, cfg, surrogate_param=param.view(1, 1, 3, 1).expand(x.shape).clone()),
                 expected, atol=1e-12, rtol=1e-10)
    # and it is not the scalar surrogate's gradient (the test could fail)
    assert not torch.allclose(grad_x(x, cfg), expected)
    # per element and time step: one neuron (b, c, s) with a different parameter at each t
    per_t = torch.rand(x.shape, generator=g, dtype=torch.float64) + 0.5
    full = grad_x(x, cfg, surrogate_param=per_t)
    b, c, s = 1, 2, 3
    us = mt.lif_reference(x[:, b:b + 1, c:c + 1, s:s + 1], cfg).u.flatten()
    # design recursion for that neuron with g_t = surrogate.grad(u_t, param_t)
    _, _, grads = _design_lif_scalar(x[:, b, c, s].tolist(), 2.0, 0.9, 0.0, True, False,
                                     _per_step_grad(surrogate, us, per_t[:, b, c, s]), w[:, b, c, s].tolist())
    assert_close("per element and step", full[:, b, c, s], torch.tensor(grads, dtype=torch.float64),
                 atol=1e-12, rtol=1e-10)


def _per_step_grad(surrogate, us, params):
    """g(u) for the design recursion, with the parameter of the step whose u it is given."""
    table = {float(u): float(p) for u, p in zip(us, params)}
    return lambda u: float(surrogate.grad(torch.tensor(u, dtype=torch.float64),
                                          torch.tensor(table[min(table, key=lambda k: abs(k - u))],
                                                       dtype=torch.float64)))
