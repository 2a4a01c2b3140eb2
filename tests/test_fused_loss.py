"""The MPD-SGR loss inside the LIF node (``mt.lif(..., mpd_gamma=)``) and MPDSGR's use of it.

The node's loss must be the unfused composition ``mt.mpd_overlap(mean, var, gamma, eps).mean()`` on
the same backend, value and gradients (bit for bit where both run the same float32 C loops or the
same torch operations), with one autograd node instead of three. tests/test_kernels.py and
tests/test_cpu_kernels.py compare it with the reference over random shapes and neuron options
(the "fused_overlap" term).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_input, neuron_options
from hypothesis import given, settings
from hypothesis import strategies as st
from test_mpd import TinySNN

import mpd_triton as mt

CPU = mt.cpu_kernels_unavailable() is None
# backend -> the unfused composition gives the same bits (the same float32 operations in the same order)
BACKENDS = ["torch", "triton"] + (["cpu"] if CPU else [])


def _fused_and_unfused(backend, x, opts, gamma, eps, *, stats_grad, v_init=None, seed=0):
    """(outputs, grads) of one loss through the fused node and through mpd_overlap(...).mean()."""
    g = torch.Generator().manual_seed(seed)
    w_spikes = torch.randn(x.shape, generator=g)
    w_mean, w_var = torch.randn(x.shape[0], x.shape[2], generator=g), torch.randn(x.shape[0], x.shape[2], generator=g)
    results = []
    for fused in (True, False):
        xi = x.detach().clone().requires_grad_(True)
        v0 = v_init.detach().clone().requires_grad_(True) if v_init is not None else None
        if fused:
            spikes, mean, var, loss = mt.lif(xi, **opts, backend=backend, return_stats=True, v_init=v0,
                                             mpd_gamma=gamma, mpd_eps=eps)
            if backend != "torch":  # one node: the LIF's own (the reference is autograd's graph)
                assert loss.grad_fn is spikes.grad_fn
        else:
            spikes, mean, var = mt.lif(xi, **opts, backend=backend, return_stats=True, v_init=v0)
            loss = mt.mpd_overlap(mean, var, gamma, eps).mean()
        total = (spikes.float() * w_spikes).sum() + 2.5 * loss
        if stats_grad:
            total = total + (mean * w_mean).sum() + (var * w_var).sum()
        total.backward()
        results.append(dict(spikes=spikes.detach(), mean=mean.detach(), var=var.detach(), loss=loss.detach(),
                            grad_x=xi.grad, grad_v0=v0.grad if v0 is not None else None))
    return results


@settings(max_examples=30, deadline=None)
@given(backend=st.sampled_from(BACKENDS), shape=st.sampled_from([(3, 2, 4, 5), (4, 3, 7), (2, 2, 3, 2, 3), (1, 1, 1)]),
       opts=neuron_options(), seed=st.integers(0, 2**31 - 1), gamma=st.floats(0.2, 2.0),
       eps=st.sampled_from([1e-5, 0.0, 0.3]), stats_grad=st.booleans(), with_v_init=st.booleans())
def test_fused_loss_is_the_unfused_composition(backend, shape, opts, seed, gamma, eps, stats_grad, with_v_init):
    x = make_input(shape, seed)
    v_init = make_input(shape[1:], seed + 3, scale=0.4, offset=0.0) if with_v_init else None
    fused, unfused = _fused_and_unfused(backend, x, opts, gamma, eps, stats_grad=stats_grad, v_init=v_init, seed=seed)
    for name in ("spikes", "mean", "var", "loss", "grad_x") + (("grad_v0",) if with_v_init else ()):
        # bit for bit; NaN where both are (eps = 0 and a cell of one element: sigma = 0)
        torch.testing.assert_close(fused[name], unfused[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert fused["loss"].shape == () and fused["loss"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_without_statistics_and_without_grad(backend):
    """mpd_gamma alone returns (spikes, loss); under no_grad (no node) the same values."""
    x = make_input((3, 2, 4, 6), 1).requires_grad_(True)
    spikes, loss = mt.lif(x, backend=backend, mpd_gamma=0.9)
    s_ref, mean, var = mt.lif(x, backend=backend, return_stats=True)
    assert torch.equal(spikes, s_ref) and torch.equal(loss, mt.mpd_overlap(mean, var, 0.9).mean())
    with torch.no_grad():
        spikes_ng, loss_ng, v_T = mt.lif(x, backend=backend, mpd_gamma=0.9, return_state=True)
    assert loss_ng.grad_fn is None and torch.equal(loss_ng, loss) and torch.equal(spikes_ng, spikes)
    assert v_T.shape == x.shape[1:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_loss_against_float64(backend):
    """The node's loss and its gradient against the float64 reference composition."""
    x = make_input((4, 3, 5, 6), 7, scale=1.0, offset=0.8)
    xi = x.clone().requires_grad_(True)
    _, loss = mt.lif(xi, backend=backend, mpd_gamma=1.0)
    loss.backward()
    x64 = x.double().requires_grad_(True)
    _, mean, var = mt.lif(x64, backend="torch", return_stats=True)
    ref = mt.mpd_overlap(mean, var, 1.0).mean()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-7
    scale = float(x64.grad.abs().max())
    assert float((xi.grad.double() - x64.grad).abs().max()) <= 1e-4 * scale + 1e-9


@pytest.mark.parametrize("bad,error", [
    (dict(mpd_gamma=0.0), ValueError), (dict(mpd_gamma=-1.0), ValueError), (dict(mpd_gamma=math.nan), ValueError),
    (dict(mpd_gamma=math.inf), ValueError), (dict(mpd_gamma="1"), TypeError), (dict(mpd_gamma=True), TypeError),
    (dict(mpd_gamma=torch.tensor(1.0)), TypeError), (dict(mpd_gamma=1.0, mpd_eps=-1e-3), ValueError),
    (dict(mpd_eps=None), TypeError),
])
def test_bad_mpd_arguments(bad, error):
    with pytest.raises(error, match="mpd_"):
        mt.lif(make_input((2, 1, 3), 0), **bad)


# ---------------------------------------------------------------- MPDSGR


def _loss_and_grads(model, reg, x):
    model.zero_grad()
    out = model(x)
    loss = out.square().mean() + reg()
    loss.backward()
    return reg.loss().detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("shared", [False, True], ids=["two layers", "one layer twice"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_mpdsgr_takes_the_layers_losses(shared, backend):
    """With its default options MPDSGR's loss comes from the LIF nodes (the records carry it) and equals,
    with the same gradients, the loss recomputed from the statistics (the path of other options)."""
    torch.manual_seed(0)
    model = TinySNN(backend=backend, shared=shared)
    reg = mt.MPDSGR(model, eta=0.7)
    x = make_input((3, 4, 1, 8, 8), 2)
    assert all(layer.fused_mpd_loss == (None, reg.eps) for layer in reg.layers)
    fused_loss, fused_grads = _loss_and_grads(model, reg, x)
    for layer in reg.layers:
        assert len(layer.mpd_losses) == len(layer.mpd_records) == (2 if shared else 1)
        assert all(loss is not None and loss[1] == layer.surrogate.window for loss in layer.mpd_losses)
    for layer in reg.layers:
        layer.fused_mpd_loss = None
    loss, grads = _loss_and_grads(model, reg, x)
    assert all(loss is None for layer in reg.layers for loss in layer.mpd_losses)
    assert torch.allclose(fused_loss, loss, rtol=1e-6, atol=0)
    for a, b in zip(fused_grads, grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    if not shared:  # one call per layer: the same operations, the same bits
        assert torch.equal(fused_loss, loss) and all(torch.equal(a, b) for a, b in zip(fused_grads, grads))


def test_mpdsgr_options_that_are_not_fused():
    """Other granularities and the relative window recompute from the statistics; a window or eps changed
    after the forward is honoured (the node's loss is for the old one); remove() turns the fusion off."""
    torch.manual_seed(1)
    x = make_input((3, 2, 1, 8, 8), 3)
    for options in (dict(granularity="channel"), dict(granularity="layer"), dict(window="relative")):
        model = TinySNN()
        reg = mt.MPDSGR(model, eta=1.0, **options)
        assert all(layer.fused_mpd_loss is None for layer in reg.layers)
        model(x)
        assert torch.isfinite(reg.loss())
    model = TinySNN()
    reg = mt.MPDSGR(model, eta=1.0)
    model(x)
    expected = torch.stack([mt.mpd_overlap(*layer.mpd_records[0], 0.5).mean() for layer in reg.layers]).mean()
    reg.gamma = 0.5
    assert torch.equal(reg.loss(), expected)
    reg.gamma, reg.eps = None, 0.1
    expected = torch.stack([mt.mpd_overlap(*layer.mpd_records[0], 1.0, 0.1).mean() for layer in reg.layers]).mean()
    assert torch.equal(reg.loss(), expected)
    reg.eps = mt.mpd.DEFAULT_EPS
    reg.granularity = "layer"  # changed after the forward: not the node's loss
    assert torch.allclose(reg.loss(), torch.stack([omega.mean() for omega in reg.layer_overlaps()]).mean())
    reg.remove()
    assert all(layer.fused_mpd_loss is None for layer in reg.layers)


def test_mpdsgr_detach_records_detaches_the_losses():
    model = TinySNN()
    reg = mt.MPDSGR(model, eta=1.0)
    model(make_input((2, 2, 1, 8, 8), 4))
    assert reg.loss().requires_grad
    reg.detach_records()
    assert not reg.loss().requires_grad
    assert all(not loss[0].requires_grad for layer in reg.layers for loss in layer.mpd_losses)
