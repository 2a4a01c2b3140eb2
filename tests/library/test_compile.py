"""torch.compile(fullgraph=True): no graph breaks, compiled == eager, the custom operators, float32 scalars.

Both backends: "torch" (the reference, what "auto" picks on the CPU) and
"triton" (the custom ops mpd_triton::lif_fwd / lif_bwd; without a GPU their
launcher runs the kernels under the Triton interpreter, also inside a
compiled graph, since the ops are opaque to Inductor). Models are the small
CPU network at toy sizes: each compile takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import DEVICE, assert_close, make_input
from torch._inductor.utils import run_and_get_code
from torch.optim.sgd import sgd

import mpd_triton as mt
from models import build_model
from mpd_triton.kernels import lif as lif_kernels

# The C kernels take CPU tensors only; the Triton cases are in the GPU subset (`pytest -m gpu`,
# bench/device_run.sh), where Inductor compiles for the GPU around the kernels' operators.
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.gpu)] + (["cpu"] if DEVICE.type == "cpu" else [])
T, BATCH, IMAGE = 2, 3, 8
SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, dampening=0.0, nesterov=False, maximize=False)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_one_graph(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    reasons = [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


def _model(backend, seed=0, *, channels_last=False):
    torch.manual_seed(seed)
    model = build_model("small", in_channels=1, num_classes=4, image_size=IMAGE, T=T, width=4, hidden=8,
                        neuron=dict(surrogate="sigmoid", backend=backend)).to(DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, mt.MPDSGR(model, eta=0.5)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 1, IMAGE, IMAGE, generator=g).to(DEVICE)
    labels = torch.randint(0, 4, (BATCH,), generator=g).to(DEVICE)
    return images, labels


def _loss_fn(model, reg):
    def loss_fn(images, labels):
        logits = model(images)
        mpd = reg()
        return F.cross_entropy(logits, labels) + mpd, logits, mpd

    return loss_fn


def _train_step(model, reg):
    """Forward, MPD-SGR loss, backward and the SGD update (torch.optim's functional sgd: what
    SGD.step computes; SGD.step itself graph-breaks on purpose, see torch.optim.optimizer)."""
    params = list(model.parameters())
    momentum = [torch.zeros_like(p) for p in params]

    def step(images, labels):
        logits = model(images)
        loss = F.cross_entropy(logits, labels) + reg()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            sgd(params, list(grads), momentum, **SGD_OPTIONS)
        reg.detach_records()
        return loss.detach()

    return step


# ---------------------------------------------------------------- no graph breaks


@pytest.mark.parametrize("backend", BACKENDS)
def test_lif_traces_as_one_graph(backend):
    x = make_input((3, 2, 4, 3, 3), 0).requires_grad_(True)
    v_init = make_input((2, 4, 3, 3), 1, scale=0.2, offset=0.0)

    def fn(x, v_init):
        s, mean, var, v_T = mt.lif(x, tau=2.0, v_th=0.8, v_reset=None, surrogate=mt.ATan(2.0), backend=backend,
                                   return_stats=True, v_init=v_init, return_state=True)
        return s.sum() + mt.mpd_overlap(mean, var, 1.0).mean() + v_T.sum()

    _assert_one_graph(fn, x, v_init)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_forward_traces_as_one_graph(backend):
    model, reg = _model(backend)
    images, labels = _batch()
    _assert_one_graph(_loss_fn(model, reg), images, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vgg11_with_mpdsgr_traces_as_one_graph(backend):
    """The paper's CIFAR-10 model (the cifar10-vgg11 preset): a spiking VGG11 with MPD-SGR (8x8 images
    and a narrow classifier to keep it quick)."""
    torch.manual_seed(0)
    model = build_model("vgg11", in_channels=3, num_classes=4, image_size=8, T=T, hidden=16,
                        neuron=dict(backend=backend)).to(DEVICE)
    reg = mt.MPDSGR(model, eta=0.5)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=g).to(DEVICE)
    labels = torch.tensor([0, 3]).to(DEVICE)
    _assert_one_graph(_loss_fn(model, reg), images, labels)


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="in-graph backward needs torch._dynamo.config.trace_autograd_ops")
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_traces_as_one_graph(backend):
    model, reg = _model(backend)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        _assert_one_graph(_train_step(model, reg), *_batch())


# ---------------------------------------------------------------- compiled == eager


def _statistics(reg):
    return [t.detach() for layer in reg.layers for record in layer.mpd_records for t in record]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_matches_eager(backend):
    """Outputs, MPD-SGR term, every parameter gradient and the recorded statistics."""
    images, labels = _batch(1)
    results = []
    for compiled in (False, True):
        model, reg = _model(backend, seed=3)
        loss_fn = _loss_fn(model, reg)
        if compiled:
            loss_fn = torch.compile(loss_fn, fullgraph=True)
        loss, logits, mpd = loss_fn(images, labels)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results.append((logits.detach(), mpd.detach(), grads, _statistics(reg)))
    (logits_e, mpd_e, grads_e, stats_e), (logits_c, mpd_c, grads_c, stats_c) = results
    assert_close("logits", logits_c, logits_e, atol=1e-5, rtol=1e-5)
    assert_close("eta * L_MPD", mpd_c, mpd_e, atol=1e-6, rtol=1e-5)
    assert len(stats_c) == len(stats_e) == 6
    for i, (c, e) in enumerate(zip(stats_c, stats_e)):
        assert_close(f"statistic {i}", c, e, atol=1e-5, rtol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        assert_close(f"grad {name}", grads_c[name], grads_e[name], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not hasattr(torch._dynamo.config, "trace_autograd_ops"),
                    reason="in-graph backward needs torch._dynamo.config.trace_autograd_ops")
def test_compiled_training_step_matches_eager():
    """Two steps of the whole step compiled as one graph (triton backend) against eager.

    AOTAutograd without Inductor: with the backward and the SGD update in one
    graph, Inductor (CPU, torch 2.14.1) miscompiles the update of nn.Linear
    weights even without any LIF (docs/compile.md); the Inductor path is
    covered by test_compiled_model_matches_eager."""
    batches = [_batch(4), _batch(5)]
    params = []
    for compiled in (False, True):
        model, reg = _model("triton", seed=6)
        step = _train_step(model, reg)
        if compiled:
            step = torch.compile(step, fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            losses = [step(*batch) for batch in batches]
        params.append((losses, [p.detach().clone() for p in model.parameters()], _statistics(reg)))
    (losses_e, params_e, stats_e), (losses_c, params_c, stats_c) = params
    for i, (c, e) in enumerate(zip(losses_c, losses_e)):
        assert_close(f"loss {i}", c, e, atol=1e-6, rtol=1e-5)
    for i, (c, e) in enumerate(zip(params_c, params_e)):
        assert_close(f"parameter {i} after two steps", c, e, atol=1e-5, rtol=1e-4)
    for i, (c, e) in enumerate(zip(stats_c, stats_e)):
        assert_close(f"statistic {i}", c, e, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_dynamic_batch_size():
    """One graph for every batch size (dynamic=True): the layout logic and the validation
    take symbolic sizes and floats."""
    def fn(x):
        s, mean, var = mt.lif(x, surrogate=mt.Triangle(0.8), backend="triton", return_stats=True)
        return s.float().mean() + mt.mpd_overlap(mean, var, 0.8).mean()

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch in (2, 3, 5):
        xe = make_input((3, batch, 4, 5), batch).requires_grad_(True)
        xc = xe.detach().clone().requires_grad_(True)
        fn(xe).backward()
        compiled(xc).backward()
        assert_close(f"grad_x, batch {batch}", xc.grad, xe.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
def test_channels_last_model_matches_contiguous():
    """A channels-last model (the LIF layers see channels-last [T, B, C, H, W]) computes
    what the contiguous one does, eager and compiled with fullgraph=True (by Inductor on a GPU;
    on the CPU by AOTAutograd alone, where Inductor would take most of a minute)."""
    images, labels = _batch(7)
    out = {}
    for channels_last, compiled in ((False, False), (True, False), (True, True)):
        model, reg = _model("triton", seed=8, channels_last=channels_last)
        loss_fn = _loss_fn(model, reg)
        if compiled:
            loss_fn = torch.compile(loss_fn, fullgraph=True, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        loss, logits, _ = loss_fn(x, labels)
        loss.backward()
        out[channels_last, compiled] = (logits.detach(), [p.grad for p in model.parameters()])
    expected_logits, expected_grads = out[False, False]
    for key in ((True, False), (True, True)):
        what = "compiled, channels-last" if key[1] else "channels-last"
        assert_close(f"logits ({what})", out[key][0], expected_logits, atol=1e-5, rtol=1e-5)
        for i, (c, e) in enumerate(zip(out[key][1], expected_grads)):
            assert_close(f"grad {i} ({what})", c, e, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- float32 scalars


def _float64_lines(codes):
    return [line for code in codes for line in code.splitlines()
            if any(word in line for word in ("double", "float64", "fp64"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_arguments_stay_float32(backend, monkeypatch):
    """Neuron floats passed as Python floats into a compiled function: no float64 in the
    generated code, and the kernels get Python floats (Triton's fp32)."""
    scalars = []
    launch = lif_kernels.KERNELS["forward"]

    class Recorder:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                scalars.extend(arg for arg in args[-3:])  # inv_tau, v_th, v_rest
                return launch[grid](*args, **kwargs)

            return run

    monkeypatch.setitem(lif_kernels.KERNELS, "forward", Recorder())

    def fn(x, tau, v_th, gamma):
        s, mean, var = mt.lif(x, tau=tau, v_th=v_th, surrogate=mt.Triangle(gamma), backend=backend,
                              return_stats=True)
        return s, mt.mpd_overlap(mean, var, gamma)

    x = make_input((3, 2, 4, 5), 2)
    (s, omega), codes = run_and_get_code(torch.compile(fn, fullgraph=True), x, 3.0, 0.7, 0.9)
    assert not _float64_lines(codes), _float64_lines(codes)
    assert omega.dtype == torch.float32
    s_eager, _ = fn(x, 3.0, 0.7, 0.9)
    assert torch.equal(s, s_eager)
    if backend == "triton":
        assert scalars and all(type(v) is float for v in scalars), scalars
        from triton.runtime.jit import mangle_type

        assert {mangle_type(v) for v in scalars} == {"fp32"}


# ---------------------------------------------------------------- the custom operators


def _channels_last_steps(x):
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, x.shape[:2])


PARAMS = tuple(mt.LIFConfig(tau=2.0, v_th=0.9, v_reset=-0.1, surrogate=mt.Sigmoid(3.0)).kernel_params)
SOFT_PARAMS = tuple(mt.LIFConfig(tau=math.inf, v_reset=None, decay_input=False, detach_reset=True,
                                 surrogate=mt.SuperSpike()).kernel_params)


def _fwd_samples():
    x = make_input((3, 2, 4, 2, 3), 0)
    v_init = make_input((2, 4, 2, 3), 1, scale=0.3, offset=0.0)

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    return [
        (leaf(x), leaf(v_init), *PARAMS, True, True, True),
        (leaf(_channels_last_steps(x)), None, *SOFT_PARAMS, True, False, True),
        (x[0].expand(x.shape), None, *PARAMS, False, True, False),
        (leaf(x.to(torch.bfloat16)), None, *PARAMS, True, True, True),
    ]


# The Triton kernels' operators (in the GPU subset) and the C kernels' (suffix _cpu, CPU tensors only); the
# same schemas.
OP_SUFFIXES = [pytest.param("", marks=pytest.mark.gpu)] + (
    ["_cpu"] if DEVICE.type == "cpu" and mt.cpu_kernels_unavailable() is None else [])


@pytest.mark.parametrize("suffix", OP_SUFFIXES, ids=lambda s: s or "triton")
@pytest.mark.parametrize("index", range(4))
def test_opcheck_lif_fwd(index, suffix):
    torch.library.opcheck(getattr(torch.ops.mpd_triton, f"lif_fwd{suffix}").default, _fwd_samples()[index])


def test_operator_schemas():
    """The schemas ops.py makes from KernelParams' fields: the neuron's arguments, by name and type, between
    the tensors and the flags (a change here changes the operators' interface)."""
    neuron = ("float inv_tau, float v_th, float v_rest, bool decay_input, bool hard_reset, bool detach_reset, "
              "SymInt surrogate_kind, float surrogate_param")
    for suffix in ("", "_cpu"):
        fwd, bwd = (str(getattr(torch.ops.mpd_triton, f"{name}{suffix}").default._schema)
                    for name in ("lif_fwd", "lif_bwd"))
        assert fwd == (f"mpd_triton::lif_fwd{suffix}(Tensor x, Tensor? v_init, {neuron}, bool stats, bool save_state, "
                       "bool save_u, Tensor? surrogate_param_tensor=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
        assert bwd == (f"mpd_triton::lif_bwd{suffix}(Tensor? grad_spikes, Tensor u_saved, Tensor? mpd_a, "
                       f"Tensor? mpd_b, Tensor? grad_v_T, {neuron}, bool need_grad_v0, "
                       "Tensor? surrogate_param_tensor=None) -> (Tensor, Tensor)")


@pytest.mark.parametrize("suffix", OP_SUFFIXES, ids=lambda s: s or "triton")
def test_opcheck_lif_bwd(suffix):
    fwd, bwd = (getattr(torch.ops.mpd_triton, f"{name}{suffix}") for name in ("lif_fwd", "lif_bwd"))
    x = make_input((3, 2, 4, 2, 3), 0)
    for params, x_in in ((PARAMS, x), (SOFT_PARAMS, _channels_last_steps(x))):
        _, u_saved, mean, _, _ = fwd(x_in, None, *params, True, True, True)
        T, C = mean.shape
        grad_spikes = make_input(x.shape, 3)  # contiguous, whatever u_saved's layout
        mpd_a, mpd_b = make_input((T, C), 4), make_input((T, C), 5)
        grad_v_T = torch.ones_like(u_saved[0])
        torch.library.opcheck(bwd.default, (grad_spikes, u_saved, mpd_a, mpd_b, grad_v_T, *params, True))
        torch.library.opcheck(bwd.default, (None, u_saved, None, None, None, *params, False))


@pytest.mark.gpu
def test_op_outputs_match_lif():
    """The operator is what mt.lif runs: same spikes and statistics; empty placeholders
    for the outputs not asked for."""
    x = make_input((3, 2, 4, 5), 9)
    spikes, u_saved, mean, var, v_T = torch.ops.mpd_triton.lif_fwd(x, None, *PARAMS, False, False, False)
    assert u_saved.numel() == mean.numel() == var.numel() == v_T.numel() == 0
    cfg = dict(tau=2.0, v_th=0.9, v_reset=-0.1, surrogate=mt.Sigmoid(3.0), backend="triton")
    assert torch.equal(spikes, mt.lif(x, **cfg))
    _, _, mean, var, _ = torch.ops.mpd_triton.lif_fwd(x, None, *PARAMS, True, False, False)
    _, mean_lif, var_lif = mt.lif(x, **cfg, return_stats=True)
    assert torch.equal(mean, mean_lif) and torch.equal(var, var_lif)


@pytest.mark.gpu
def test_compiled_module_keeps_one_record_per_layer():
    """torch.compile(model): MPDSGR's pre-hook that clears the records runs in the graph."""
    model, reg = _model("triton")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for seed in (0, 1):
        images, labels = _batch(seed)
        (F.cross_entropy(compiled(images), labels) + reg()).backward()
        assert [len(layer.mpd_records) for layer in reg.layers] == [1, 1, 1]


@pytest.mark.gpu
def test_lif_module_compiles_with_records():
    layer = mt.LIF(tau=2.0, surrogate="atan", backend="triton", record_mpd=True)
    x = make_input((3, 2, 4, 5), 10)
    eager = layer(x)
    (mean_e, var_e), = layer.mpd_records
    compiled = torch.compile(copy.deepcopy(layer), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)
    (mean_c, var_c), = compiled.mpd_records
    assert torch.equal(mean_c, mean_e) and torch.equal(var_c, var_e)


def test_lif_config_defaults_are_plain_values():
    """Dynamo of torch 2.11 (the oldest torch we support) cannot bind a dataclass __init__
    default that is a user object ("SourcelessBuilder.create does not know how to wrap
    Triangle"): every compiled model broke until LIFConfig's surrogate default became a
    string. Newer torch traces either, so this checks the cause directly; `make
    test-oldest` runs the whole suite on torch 2.11 / triton 3.6."""
    import dataclasses

    for field in dataclasses.fields(mt.LIFConfig):
        assert field.default is dataclasses.MISSING or field.default is None or \
            type(field.default) in (bool, int, float, str), (field.name, field.default)
    assert mt.LIFConfig().surrogate == mt.Triangle(1.0)
