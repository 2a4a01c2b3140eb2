"""Public API: bad input fails clearly before any launch, backend choice, return values, LIF module."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DEVICE, make_input

import mpd_triton as mt
from mpd_triton.kernels import lif as lif_kernels
from mpd_triton.kernels import runtime

BACKENDS = ["torch", "triton", "cpu"]


@pytest.fixture
def no_launch(monkeypatch):
    """Any kernel launch fails the test: validation must happen first."""

    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(lif_kernels, "lif_forward", boom)
    monkeypatch.setattr(lif_kernels, "lif_backward", boom)


GOOD = make_input((3, 2, 4), 0)

BAD_X = [
    (torch.zeros(3, 4), ValueError, r"x must have shape \[T, B, F\] or \[T, B, C, \*spatial\].*got 2 dims"),
    (torch.zeros(5), ValueError, "got 1 dims"),
    (torch.zeros(3, 2, 4, dtype=torch.int32), TypeError, "x must be a float32, float16 or bfloat16 tensor, got dtype torch.int32"),
    (torch.zeros(3, 2, 4, dtype=torch.bool), TypeError, "got dtype torch.bool"),
    (torch.zeros(0, 2, 4), ValueError, "x has T = 0 time steps"),
    (torch.zeros(3, 0, 4), ValueError, r"x is empty \(shape \(3, 0, 4\)\)"),
    (torch.zeros(3, 2, 4, 0, 5), ValueError, "x is empty"),
    ([[[1.0]]], TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x,exc,msg", BAD_X)
def test_bad_x(no_launch, backend, x, exc, msg):
    with pytest.raises(exc, match=msg):
        mt.lif(x, backend=backend)


BAD_PARAMS = [
    (dict(tau=0.0), ValueError, "tau must be > 0"),
    (dict(tau=-2.0), ValueError, "tau must be > 0"),
    (dict(tau=math.nan), ValueError, "tau must not be NaN"),
    (dict(tau=math.inf), ValueError, "tau = inf with decay_input=True"),
    (dict(tau="2"), TypeError, "tau must be a real number, got str"),
    (dict(v_th=math.nan), ValueError, "v_th must not be NaN"),
    (dict(v_th=math.inf), ValueError, "v_th must be finite"),
    (dict(v_reset=math.nan), ValueError, "v_reset must not be NaN"),
    (dict(v_reset=1.0), ValueError, r"v_reset \(1\) >= v_th \(1\): with a hard reset the neuron rests at v_reset"),
    (dict(v_th=0.5, v_reset=0.7), ValueError, "fires at every step whatever its input; use v_reset < v_th"),
    (dict(v_th=0.0, v_reset=None), ValueError, r"v_th \(0\) <= 0 with a soft reset"),
    (dict(v_th=-1.0, v_reset=-2.0, tau=math.inf), ValueError, "tau = inf with decay_input=True"),
    (dict(decay_input=1), TypeError, "decay_input must be True or False"),
    (dict(detach_reset="no"), TypeError, "detach_reset must be True or False"),
    (dict(surrogate="relu"), ValueError, "surrogate: unknown name 'relu'"),
    (dict(surrogate=None), TypeError, "surrogate must be a Surrogate object"),
    (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'triton', 'cpu', 'torch'\)"),
    (dict(return_stats=1), TypeError, "return_stats must be True or False"),
    (dict(v_init=torch.zeros(3, 4)), ValueError, r"v_init must have shape x.shape\[1:\] = \(2, 4\)"),
    (dict(v_init=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "v_init must be a floating-point tensor"),
    (dict(v_init=torch.zeros(2, 4, device="meta")), ValueError, "v_init is on meta but x is on"),
    (dict(v_init=1.0), TypeError, "v_init must be None or a tensor"),
    # GOOD is [T, B, F] = [3, 2, 4]: a per-channel surrogate_param is [4]
    (dict(surrogate_param=2.0), TypeError, r"surrogate_param must be None or a tensor of shape \[C\] = \[4\]"),
    (dict(surrogate_param=torch.ones(3)), ValueError, r"surrogate_param must have shape \[C\] = \[4\].*got \(3,\)"),
    (dict(surrogate_param=torch.ones(2, 4)), ValueError, r"of 3 dims each 1 or equal to x's \(3, 2, 4\); got \(2, 4\)"),
    (dict(surrogate_param=torch.ones(3, 3, 4)), ValueError, r"got \(3, 3, 4\)"),
    (dict(surrogate_param=torch.ones(4, dtype=torch.int64)), TypeError, "surrogate_param must be a floating-point"),
    (dict(surrogate_param=torch.ones(4, device="meta")), ValueError, "surrogate_param is on meta but x is on"),
    (dict(surrogate_param=torch.tensor([1.0, 0.0, 1.0, 1.0])), ValueError, "finite and > 0 everywhere.*got 0.0"),
    (dict(surrogate_param=torch.tensor([1.0, 1.0, -2.0, 1.0])), ValueError, "got -2.0"),
    (dict(surrogate_param=torch.full((1, 2, 4), math.nan)), ValueError, "got nan"),
    (dict(surrogate_param=torch.full((3, 1, 1), math.inf)), ValueError, "got inf"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,exc,msg", BAD_PARAMS, ids=lambda p: str(p)[:40] if isinstance(p, dict) else None)
def test_bad_parameters(no_launch, backend, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        mt.lif(GOOD, **{"backend": backend, **kwargs})


def test_triton_backend_needs_gpu_or_interpreter(monkeypatch, no_launch):
    monkeypatch.setattr(runtime, "INTERPRETED", False)
    with pytest.raises(ValueError, match="backend='triton' needs a CUDA tensor.*TRITON_INTERPRET=1"):
        mt.lif(torch.zeros(2, 2, 2), backend="triton")


def test_float64_goes_to_the_reference():
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert mt.lif(x).dtype == torch.float64  # auto -> torch
    with pytest.raises(TypeError, match="backend='triton' takes float32, float16 or bfloat16 input, got torch.float64"):
        mt.lif(x, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_values(backend):
    x = make_input((4, 3, 5, 2), 1)
    s = mt.lif(x, backend=backend)
    assert isinstance(s, torch.Tensor) and s.shape == x.shape
    s2, mean, var = mt.lif(x, backend=backend, return_stats=True)
    assert mean.shape == var.shape == (4, 5) and mean.dtype == torch.float32
    s3, v_T = mt.lif(x, backend=backend, return_state=True)
    assert v_T.shape == x.shape[1:]
    s4, mean4, var4, v_T4 = mt.lif(x, backend=backend, return_stats=True, return_state=True)
    assert torch.equal(s, s2) and torch.equal(s, s3) and torch.equal(s, s4)
    assert ((s == 0) | (s == 1)).all()


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda_and_the_cpu_kernels_on_the_cpu():
    x = make_input((2, 2, 3), 0)
    from mpd_triton.functional import _resolve_backend

    if x.is_cuda:
        expected = "triton"
    else:
        expected = "cpu" if mt.cpu_kernels_unavailable() is None else "torch"
    assert _resolve_backend("auto", x) == expected
    assert _resolve_backend("auto", x.double()) == "torch"  # the kernels take float32, float16, bfloat16


def test_state_carries_over_between_calls():
    """Two halves with the final state passed on == one call over all T."""
    x = make_input((8, 2, 3, 4), 3)
    for backend in BACKENDS:
        full = mt.lif(x, tau=2.0, backend=backend)
        a, v = mt.lif(x[:5], tau=2.0, backend=backend, return_state=True)
        b = mt.lif(x[5:], tau=2.0, backend=backend, v_init=v)
        assert torch.equal(torch.cat([a, b]), full), backend


# ------------------------------------------------------------------ nn.Module


def test_lif_module_forward_and_records():
    layer = mt.LIF(tau=2.0, surrogate="atan", record_mpd=True)
    x = make_input((4, 2, 3, 5, 5), 2).requires_grad_(True)
    s = layer(x)
    assert s.shape == x.shape
    assert len(layer.mpd_records) == 1
    mean, var = layer.mpd_records[0]
    assert mean.shape == (4, 3) and mean.requires_grad
    layer(x)
    assert len(layer.mpd_records) == 1  # only the last call unless an MPDSGR owns the layer
    _, m_ref, v_ref = mt.lif(x, tau=2.0, surrogate="atan", return_stats=True)
    assert torch.allclose(layer.mpd_records[0][0], m_ref) and torch.allclose(layer.mpd_records[0][1], v_ref)


def test_lif_module_parameters_and_repr():
    layer = mt.LIF(tau=3.0, v_th=0.5, v_reset=None, surrogate=mt.Sigmoid(2.0))
    assert layer.tau == 3.0 and layer.v_th == 0.5 and layer.v_reset is None
    assert "soft reset" in repr(layer) and "Sigmoid(alpha=2" in repr(layer)
    layer.surrogate = "triangle"
    assert isinstance(layer.surrogate, mt.Triangle)
    with pytest.raises(ValueError, match="surrogate: unknown name"):
        layer.surrogate = "nope"
    with pytest.raises(ValueError, match="backend must be one of"):
        mt.LIF(backend="gpu")
    with pytest.raises(ValueError, match="tau must be > 0"):
        mt.LIF(tau=-1)
    with pytest.raises(TypeError, match="record_mpd must be True or False"):
        mt.LIF(record_mpd="yes")


def test_lif_module_surrogate_param_attribute():
    """mt.LIF.surrogate_param (None by default) reaches mt.lif: the backward changes, the forward not;
    a bad tensor is refused with mt.lif's message."""
    layer = mt.LIF(tau=2.0, surrogate=mt.ATan(2.0), backend="torch")
    assert layer.surrogate_param is None
    x = make_input((3, 2, 4, 3, 3), 5)

    def grad():
        xx = x.clone().requires_grad_(True)
        s = layer(xx)
        s.sum().backward()
        return s.detach(), xx.grad

    s0, g0 = grad()
    layer.surrogate_param = torch.full((4,), 2.0, device=x.device)
    s1, g1 = grad()
    layer.surrogate_param = torch.tensor([2.0, 8.0, 0.5, 2.0], device=x.device)
    s2, g2 = grad()
    assert torch.equal(s0, s1) and torch.equal(s0, s2)
    assert torch.equal(g0, g1) and not torch.allclose(g0[:, :, 1], g2[:, :, 1])
    assert torch.equal(g0[:, :, 0], g2[:, :, 0])  # channel 0 kept alpha = 2
    layer.surrogate_param = torch.ones(3, device=x.device)
    with pytest.raises(ValueError, match=r"surrogate_param must have shape \[C\] = \[4\]"):
        layer(x)


@pytest.mark.parametrize("backend", mt.BACKENDS)
def test_surrogate_param_reaches_every_backend(backend):
    """Every backend (and whatever "auto" picks for this device) honours surrogate_param: the gradient is
    the reference's with it, not the scalar surrogate's."""
    x = make_input((3, 2, 4, 5), 9)
    param = torch.tensor([0.5, 2.0, 4.0, 8.0], device=x.device)

    def grad(backend, **kw):
        xx = x.clone().requires_grad_(True)
        mt.lif(xx, surrogate=mt.ATan(2.0), backend=backend, **kw).sum().backward()
        return xx.grad

    expected = grad("torch", surrogate_param=param)
    assert not torch.allclose(expected, grad("torch"))
    torch.testing.assert_close(grad(backend, surrogate_param=param), expected, rtol=1e-5, atol=1e-6)


def test_lif_module_backends_agree():
    x = make_input((5, 3, 4, 3, 3), 4)
    a = mt.LIF(backend="torch")(x)
    b = mt.LIF(backend="triton")(x)
    assert torch.equal(a, b)


def test_device_of_outputs():
    x = make_input((2, 2, 3), 0)
    s, m, v = mt.lif(x, backend="triton", return_stats=True)
    assert s.device == x.device == m.device == v.device == DEVICE or DEVICE.type == "cuda"


@pytest.mark.parametrize("with_stats", [False, True])
def test_double_backward_refused(with_stats):
    """The backward kernel is not differentiable: mpd_triton::lif_bwd has no autograd formula."""
    x = make_input((3, 2, 4), 0).requires_grad_(True)
    s, mean, var = mt.lif(x, backend="triton", surrogate="sigmoid", return_stats=True)
    loss = s.sum() + (mt.mpd_overlap(mean, var, 1.0).sum() if with_stats else 0.0)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|lif_bwd.default but no autograd formula"):
        g.sum().backward()


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "broken"),
    [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
     ("3.8.0", "2.4.0", False), ("3.5.1+git", "2.5.0", True), ("3.6.0", "1.26.4", False)],
)
def test_interpreter_numpy_guard(triton_version, numpy_version, broken):
    """mpd_triton warns at import, and conftest stops the run with a clear line, where triton < 3.7's
    interpreter meets numpy >= 2.4 (checked by hand: triton 3.6.0 + numpy 2.4.6 fails every kernel
    test, + numpy 2.3.5 passes them)."""
    from mpd_triton.kernels.runtime import interpreter_numpy_problem

    problem = interpreter_numpy_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert "numpy<2.4" in problem and triton_version in problem


def test_neuron_parameters_are_written_out_and_in_step_with_lifconfig():
    """mt.lif, mt.LIF, NeuronOptions and train's RunConfig list the neuron's parameters in their own
    source (for readers, IDEs and type checkers); they must stay LIFConfig's: names, order, defaults."""
    import dataclasses
    import inspect

    from models import NeuronOptions
    from train.config import RunConfig

    config = [(f.name, f.default) for f in dataclasses.fields(mt.LIFConfig)]
    n = len(config)

    def params(fn, skip):
        return [(p.name, p.default) for p in list(inspect.signature(fn).parameters.values())[skip:skip + n]]

    assert params(mt.lif, 1) == config  # after x
    assert params(mt.LIF.__init__, 1) == config  # after self
    assert all(p.kind is p.KEYWORD_ONLY for p in list(inspect.signature(mt.LIF).parameters.values())[n:])
    options = [(f.name, f.default) for f in dataclasses.fields(NeuronOptions)]
    assert options[:n] == config
    run = [(f.name, f.default) for f in dataclasses.fields(RunConfig)]
    names = [name for name, _ in run]
    start = names.index(options[0][0])
    assert run[start:start + len(options)] == options  # NeuronOptions' fields, in one block
    assert mt.LIF(0.5 + 1.5).config == mt.LIFConfig(2.0) and mt.LIF(surrogate="atan").surrogate == mt.ATan()
