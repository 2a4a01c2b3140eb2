"""The Triton kernels against the pure-PyTorch reference (TRITON_INTERPRET=1 without a GPU).

Forward (spikes, statistics, final state) and backward (gradient of x and
v_init through every output, the fused MPD term included), over random shapes
and every neuron option.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DEVICE,
    LAYOUTS,
    assert_close,
    compare_with_reference,
    input_shapes,
    make_input,
    neuron_options,
    output_weights,
    poison_kernel_outputs,
    rel_error,
)
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import mpd_triton as mt
from mpd_triton.kernels import cpu as cpu_kernels
from mpd_triton.kernels import lif as lif_kernels
from mpd_triton.reference import stat_dims


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_kernel_outputs(monkeypatch)


ALL_SURROGATES = [mt.Triangle(0.8), mt.Rectangular(0.4), mt.Sigmoid(3.0), mt.ATan(1.5), mt.SuperSpike(6.0)]
# The fused kernels: Triton (the interpreter without a GPU) and C (the CPU kernels, for CPU tensors, where a
# compiler built them). The tests of what both must do run on both; tests/library/test_cpu_kernels.py has what is
# particular to the C ones.
FUSED_BACKENDS = ["triton"] + (["cpu"] if DEVICE.type == "cpu" and mt.cpu_kernels_unavailable() is None else [])
# The same, with the Triton cases in the GPU subset (`pytest -m gpu`, bench/device_run.sh).
GPU_BACKENDS = [pytest.param(b, marks=pytest.mark.gpu) if b == "triton" else b for b in FUSED_BACKENDS]


@pytest.mark.parametrize("surrogate", ALL_SURROGATES, ids=lambda s: s.name)
@pytest.mark.parametrize("v_reset", [0.0, -0.2, None], ids=["hard0", "hard-0.2", "soft"])
@pytest.mark.parametrize("detach_reset", [False, True], ids=["attached", "detached"])
@pytest.mark.parametrize("tau,decay_input", [(2.0, True), (3.0, False), (math.inf, False)], ids=["decay", "nodecay", "IF"])
@pytest.mark.parametrize("backend,shape", [
    pytest.param(b, s, marks=pytest.mark.gpu) if b == "triton" and len(s) == 5 else (b, s)  # GPU: the conv shape
    for b in FUSED_BACKENDS for s in ((6, 3, 5, 3, 3), (5, 7, 11))],
    ids=lambda v: v if isinstance(v, str) else ("conv" if len(v) == 5 else "linear"))
def test_every_option_combination(surrogate, v_reset, detach_reset, tau, decay_input, backend, shape):
    """Every neuron option on a ragged conv shape and a linear one ([T, B, F]: the C kernels walk
    channels innermost there), every output in the loss, with an initial state."""
    opts = dict(tau=tau, v_th=0.9, v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset,
                surrogate=surrogate)
    x = make_input(shape, 1234, scale=1.2, offset=0.6)
    v_init = make_input(shape[1:], 99, scale=0.3, offset=0.0)
    compare_with_reference(backend, x, opts, 1234, ("spikes", "overlap", "state"), v_init=v_init)


TERMS = st.sampled_from([
    ("spikes",), ("stats",), ("overlap",), ("state",), ("spikes", "stats"), ("spikes", "overlap", "state"),
])


@given(shape=input_shapes(), opts=neuron_options(), seed=st.integers(0, 2**31 - 1), terms=TERMS,
       scale=st.floats(0.3, 3.0), offset=st.floats(-1.0, 2.0), channels_innermost=st.booleans())
def test_kernel_matches_reference(shape, opts, seed, terms, scale, offset, channels_innermost):
    x = make_input(shape, seed, scale=scale, offset=offset)
    if channels_innermost:  # the channels-last layout, generalized to any rank (kept by clone())
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)
    compare_with_reference("triton", x, opts, seed, terms)


@given(shape=input_shapes(max_T=8), opts=neuron_options(), seed=st.integers(0, 2**31 - 1), terms=TERMS)
def test_kernel_matches_reference_with_initial_state(shape, opts, seed, terms):
    x = make_input(shape, seed)
    v_init = make_input(shape[1:], seed + 7, scale=0.5, offset=0.0)
    compare_with_reference("triton", x, opts, seed, terms, v_init=v_init)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 70, 1, 2100), (2, 3, 5, 37, 41), (4, 130, 300), (2, 3, 2, 100, 100),
                                   (3, 200, 3, 5)])
def test_kernel_multi_tile_shapes(shape, backend):
    """Shapes whose statistics span many tiles (P > the merge block), ragged edges, rows longer
    than a C kernel's tile."""
    x = make_input(shape, 11)
    opts = dict(tau=2.0, v_th=1.0, v_reset=0.0, decay_input=True, detach_reset=False, surrogate=mt.Triangle())
    compare_with_reference(backend, x, opts, 11, ("spikes", "overlap"))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_contiguous_input_gives_same_result(backend):
    opts = dict(tau=2.0, surrogate=mt.ATan())
    base = make_input((6, 4, 5, 3, 3), 3)
    x_nc = base.transpose(3, 4)  # not contiguous
    assert not x_nc.is_contiguous()
    x_c = x_nc.contiguous()
    a = mt.lif(x_nc, **opts, backend=backend, return_stats=True)
    b = mt.lif(x_c, **opts, backend=backend, return_stats=True)
    for name, p, q in zip(("spikes", "mean", "var"), a, b):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inference_path_without_grad_matches(backend):
    x = make_input((5, 3, 4, 6), 5)
    with torch.no_grad():
        s1, m1, v1 = mt.lif(x, backend=backend, return_stats=True)
    s2, m2, v2 = mt.lif(x.clone().requires_grad_(True), backend=backend, return_stats=True)
    assert torch.equal(s1, s2.detach()) and torch.equal(m1, m2.detach()) and torch.equal(v1, v2.detach())


@pytest.mark.parametrize("backend", [pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.slow]) if b == "triton" else b
                                     for b in FUSED_BACKENDS])  # the interpreter: slow on the CPU
@pytest.mark.parametrize("with_stats", [False, True])
def test_deterministic_bitwise(with_stats, backend):
    x = make_input((8, 9, 6, 40, 50), 21)

    def once():
        xx = x.clone().requires_grad_(True)
        s, m, v = mt.lif(xx, backend=backend, return_stats=True, surrogate=mt.Sigmoid())
        loss = s.sum() + (mt.mpd_overlap(m, v, 1.0).sum() if with_stats else 0.0)
        loss.backward()
        return s, m, v, xx.grad

    first, second = once(), once()
    for name, p, q in zip(("spikes", "mean", "var", "grad_x"), first, second):
        assert torch.equal(p, q), f"{name} differs between two identical calls"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 64, 3, 300), (3, 2, 2, 3000), (2, 500, 4)])
def test_statistics_accurate_when_mean_dwarfs_std(shape, backend):
    """|mean| / std = 1e3: a sum-and-sum-of-squares reduction would lose the variance."""
    g = torch.Generator().manual_seed(0)
    # Integrate-and-fire with no spikes: u_t = sum_{k<=t} x_k - v_th, far below threshold.
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[0] += -1000.0
    x = x.float().to(DEVICE)
    _, mean, var = mt.lif(x, tau=math.inf, decay_input=False, backend=backend, return_stats=True)
    u64 = torch.cumsum(x.double(), 0) - 1.0
    dims = stat_dims(x.dim())
    mean64, var64 = u64.mean(dim=dims), u64.var(dim=dims, unbiased=False)
    assert float((mean64.abs() / var64.sqrt()).min()) > 500
    assert rel_error(var.cpu(), var64.cpu()) < 1e-3, rel_error(var.cpu(), var64.cpu())
    assert rel_error(mean.cpu(), mean64.cpu()) < 1e-6


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("surrogate", [mt.Triangle(), mt.Rectangular(), mt.Sigmoid(), mt.ATan(), mt.SuperSpike()])
@pytest.mark.parametrize("v_reset", [0.0, None])
def test_exactly_at_and_next_to_threshold(surrogate, v_reset, backend):
    """h == V_th fires (u = 0 gives the surrogate's peak); one ulp below does not."""
    v_th = 1.0
    one = torch.tensor(v_th)
    below = torch.nextafter(one, torch.tensor(-math.inf))  # float32 ulps
    above = torch.nextafter(one, torch.tensor(math.inf))
    # IF neuron (h = v + x) from v = 0: step 1 lands exactly on the chosen value.
    first = torch.stack([one, below, above, torch.tensor(0.0), 2.0 * one])
    x = torch.stack([first, torch.full_like(first, 0.25), torch.full_like(first, v_th)])[:, None, :].to(DEVICE)
    opts = dict(tau=math.inf, v_th=v_th, v_reset=v_reset, decay_input=False, surrogate=surrogate)
    xs = x.clone().requires_grad_(True)
    s = mt.lif(xs, **opts, backend=backend)
    assert s[0, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    (s[0].sum()).backward()
    xr = x.clone().requires_grad_(True)
    sr = mt.lif(xr, **opts, backend="torch")
    (sr[0].sum()).backward()
    assert torch.equal(s, sr)
    peak = float(surrogate.grad(torch.zeros(())))
    assert float(xs.grad[0, 0, 0]) == pytest.approx(peak, rel=1e-6)
    assert_close("grad at threshold", xs.grad, xr.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
def test_threshold_hits_in_leaky_sequence():
    """tau = 2, decay_input: x = 2 makes h exactly V_th = 1 at several steps."""
    below_two = float(torch.nextafter(torch.tensor(2.0), torch.tensor(0.0)))
    x = torch.tensor([2.0, 2.0, 0.0, 2.0, below_two, 2.0])[:, None, None].repeat(1, 2, 3).to(DEVICE)
    for backend in ["torch"] + FUSED_BACKENDS:
        s = mt.lif(x, tau=2.0, v_th=1.0, backend=backend)
        assert s[:, 0, 0].tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0], backend


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_precision_no_worse_than_plain_pytorch(dtype, seed, backend):
    """Distance from a float64 reference: the kernel (float32 state, low-precision I/O)
    is no worse than plain PyTorch computing in that precision."""
    if backend == "cpu" and not cpu_kernels.available(dtype):
        pytest.skip(f"this machine's C compiler has no {dtype}")
    shape = (8, 6, 5, 7, 7)
    x = make_input(shape, seed, dtype=dtype)
    opts = dict(tau=2.0, v_th=1.0, surrogate=mt.Sigmoid())
    cfg = mt.LIFConfig(**opts)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE)

    def grads(fn, xin):
        xin = xin.detach().clone().requires_grad_(True)
        s, mean, var = fn(xin)
        loss = (s.double() * w).sum() / w.numel() + mt.mpd_overlap(mean.double(), var.double(), 1.0).mean()
        loss.backward()
        return s.detach().double(), mean.detach().double(), var.detach().double(), xin.grad.double()

    exact = grads(lambda xx: mt.lif(xx, **opts, backend="torch", return_stats=True), x.double())
    kernel = grads(lambda xx: mt.lif(xx, **opts, backend=backend, return_stats=True), x)

    def plain_fn(xx):
        out = mt.lif_reference(xx, cfg, return_stats=True, compute_dtype=dtype)
        return out.spikes, out.mean, out.var

    plain = grads(plain_fn, x)
    names = ("spikes", "mean", "var", "grad_x")
    for name, k, p, e in zip(names, kernel, plain, exact):
        err_k, err_p = rel_error(k.cpu(), e.cpu()), rel_error(p.cpu(), e.cpu())
        # One rounding of the output to `dtype` is unavoidable for both.
        floor = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
        assert err_k <= max(err_p, floor), f"{name}: kernel error {err_k:.3e} > plain {dtype} error {err_p:.3e}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_float16_and_bfloat16_outputs_keep_dtype(backend):
    for dtype in (torch.float16, torch.bfloat16):
        x = make_input((4, 2, 3, 5), 0, dtype=dtype).requires_grad_(True)
        s, m, v, vT = mt.lif(x, backend=backend, return_stats=True, return_state=True)
        assert s.dtype == dtype and vT.dtype == dtype and m.dtype == torch.float32 and v.dtype == torch.float32
        s.sum().backward()
        assert x.grad.dtype == dtype


# ---------------------------------------------------------------- memory formats


CHANNELS_LAST_LAYOUTS = ("channels_last", "channels_last_expanded_over_T")
COPYING_LAYOUTS = ("transposed_spatial",)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_formats_match_reference(layout, backend):
    """Strided inputs read in place, outputs written in the input's format, every gradient
    (spikes weighted by a contiguous tensor: grad_spikes and u differ in layout)."""
    shape = (4, 3, 5, 3, 4)
    values = make_input(shape, 31)
    v_init = make_input(shape[1:], 32, scale=0.3, offset=0.0)
    weights = output_weights(values, 31)
    opts = dict(tau=2.0, v_th=0.9, v_reset=0.0, surrogate=mt.Sigmoid(3.0))
    out = {}
    for run in ("torch", backend):
        leaf, x = LAYOUTS[layout](values)
        v0 = v_init.clone().requires_grad_(True)
        s, mean, var, v_T = mt.lif(x, **opts, backend=run, return_stats=True, v_init=v0, return_state=True)
        loss = ((s * weights["spikes"]).sum() + (mean * weights["mean"]).sum() + (var * weights["var"]).sum()
                + (v_T * weights["state"]).sum())
        loss.backward()
        out[run] = dict(spikes=s, mean=mean, var=var, v_T=v_T, grad_x=leaf.grad, grad_v_init=v0.grad)
    s = out[backend]["spikes"]
    if layout in CHANNELS_LAST_LAYOUTS:
        assert s.flatten(0, 1).is_contiguous(memory_format=torch.channels_last), s.stride()
        assert out[backend]["v_T"].is_contiguous(memory_format=torch.channels_last)
    else:
        assert s.is_contiguous(), s.stride()
    assert_close("spikes", s, out["torch"]["spikes"], atol=0, rtol=0)
    for name in ("mean", "var", "v_T", "grad_x", "grad_v_init"):
        assert_close(name, out[backend][name], out["torch"][name], atol=2e-5, rtol=1e-4)


class _CopyCounter(TorchDispatchMode):
    COPIES = ("copy_", "clone", "_to_copy")

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func.overloadpacket.__name__ in self.COPIES
        return func(*args, **(kwargs or {}))


def _launch_copies(x) -> int:
    """Copies made by a forward + backward launch (the interpreter's own host copies included)."""
    params = mt.LIFConfig().kernel_params
    grad_spikes = torch.ones(x.shape, device=x.device)  # contiguous, whatever x's format
    with _CopyCounter() as counter:
        _, u_saved, _, _, _ = lif_kernels.lif_forward(x, params, stats=True, save_state=True)
        lif_kernels.lif_backward(grad_spikes, u_saved, params, grad_v_T=torch.ones_like(u_saved[0]), need_grad_v0=True)
    return counter.copies


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "contiguous"])
def test_only_unmergeable_inputs_are_copied(layout):
    values = make_input((3, 2, 4, 3, 5), 8)
    baseline = _launch_copies(values)
    _, x = LAYOUTS[layout](values)
    assert _launch_copies(x.detach()) == baseline + int(layout in COPYING_LAYOUTS)


# ---------------------------------------------------------------- surrogate parameter per channel / element


def _surrogate_param(kind: str, shape, seed: int) -> torch.Tensor:
    """A surrogate_param tensor of the given granularity for input shape [T, B, C, *spatial]."""
    g = torch.Generator().manual_seed(seed)
    T, B, C = shape[:3]
    ones = (1,) * (len(shape) - 3)
    size = {"channel": (C,), "element": tuple(shape), "sample_channel": (1, B, C) + ones,
            "time_position": (T, 1, 1) + tuple(shape[3:])}[kind]
    return (torch.rand(size, generator=g, dtype=torch.float64) * 1.5 + 0.3).float().to(DEVICE)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("surrogate", ALL_SURROGATES, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["channel", "element", "sample_channel", "time_position"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_surrogate_param_tensor_matches_reference(surrogate, kind, layout, backend):
    """The kernel's per-channel (loaded once) and strided per-element surrogate parameter against the
    reference, every output in the loss (the MPD term included), with v_init."""
    shape = (4, 3, 5, 3, 2)
    values = make_input(shape, 41, scale=1.2, offset=0.6)
    v_init = make_input(shape[1:], 42, scale=0.3, offset=0.0)
    param = _surrogate_param(kind, shape, 43)
    weights = output_weights(values, 41)
    opts = dict(tau=2.0, v_th=0.9, v_reset=0.0, surrogate=surrogate)
    out = {}
    for run in ("torch", backend):
        leaf, x = LAYOUTS[layout](values)
        v0 = v_init.clone().requires_grad_(True)
        s, mean, var, v_T = mt.lif(x, **opts, backend=run, return_stats=True, v_init=v0, return_state=True,
                                   surrogate_param=param)
        loss = ((s * weights["spikes"]).sum() + mt.mpd_overlap(mean, var, surrogate.window).mean()
                + (v_T * weights["state"]).sum())
        loss.backward()
        out[run] = dict(spikes=s, grad_x=leaf.grad, grad_v_init=v0.grad)
    assert_close("spikes", out[backend]["spikes"], out["torch"]["spikes"], atol=0, rtol=0)
    for name in ("grad_x", "grad_v_init"):
        assert_close(name, out[backend][name], out["torch"][name], atol=2e-5, rtol=1e-4)


# A conv layer of the benchmark (bench/kernels.py: 128 channels of 16 x 16 positions) at T*N = 2^22 on a GPU,
# its statistics reduced over many tiles; in the interpreter a small one.
CONV_LAYER = (8, 16, 128, 16, 16) if DEVICE.type == "cuda" else (3, 2, 8, 4, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "batch_major"])
def test_conv_layer_in_every_dtype_and_layout(dtype, layout):
    """The Triton kernels on a conv layer in each input dtype and memory layout (strided ones read in place),
    with a per-channel surrogate parameter, every output and the MPD term in the loss, against the
    reference: spikes exactly (but at rounding level of the threshold), statistics, state, dL/dx."""
    _, x = LAYOUTS[layout](make_input(CONV_LAYER, 71, dtype=dtype))
    param = _surrogate_param("channel", CONV_LAYER, 72)
    opts = dict(tau=2.0, v_th=1.0, v_reset=0.0, surrogate=mt.Triangle(1.0))  # the benchmark's neuron
    compare_with_reference("triton", x.detach(), opts, 71, ("spikes", "stats", "overlap", "state"),
                           surrogate_param=param)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_surrogate_param_for_fully_connected_input_and_low_precision(backend):
    """[T, B, F] input (C = F) with a per-feature and a per-element parameter; bfloat16 I/O."""
    x = make_input((5, 4, 7), 51)
    for param in (_surrogate_param("channel", x.shape, 52), _surrogate_param("element", x.shape, 53)):
        for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
            grads = {}
            for run in ("torch", backend):
                xx = x.to(dtype).clone().requires_grad_(True)
                s = mt.lif(xx, surrogate=mt.ATan(2.0), backend=run, surrogate_param=param)
                (s.float() * torch.linspace(-1, 1, s.numel()).view(s.shape).to(DEVICE)).sum().backward()
                grads[run] = xx.grad.float()
            assert_close(f"grad_x {dtype} {tuple(param.shape)}", grads[backend], grads["torch"], atol=tol, rtol=tol)


@pytest.mark.gpu
def test_surrogate_param_changes_only_the_backward_and_scalar_path_is_unchanged(monkeypatch):
    """A constant tensor equal to the scalar gives the scalar path's gradient bit for bit; another value
    changes the gradient, never the spikes; no tensor keeps the scalar kernel variant (SG_PARAM = 0)."""
    x = make_input((3, 2, 4, 5), 61)
    sur = mt.Sigmoid(3.0)

    def run(param):
        xx = x.clone().requires_grad_(True)
        s = mt.lif(xx, surrogate=sur, backend="triton", surrogate_param=param)
        s.sum().backward()
        return s.detach(), xx.grad

    modes = []
    launch = lif_kernels.KERNELS["backward"]

    class Recorder:
        def __getitem__(self, grid):
            def run_kernel(*args, **kwargs):
                modes.append(kwargs["SG_PARAM"])
                return launch[grid](*args, **kwargs)
            return run_kernel

    monkeypatch.setitem(lif_kernels.KERNELS, "backward", Recorder())
    s0, g0 = run(None)
    s1, g1 = run(torch.full((4,), 3.0, device=DEVICE))
    s2, g2 = run(torch.full((3, 2, 4, 5), 3.0, device=DEVICE))
    s3, g3 = run(torch.full((4,), 1.0, device=DEVICE))
    assert modes == [lif_kernels.SG_PARAM_SCALAR, lif_kernels.SG_PARAM_CHANNEL, lif_kernels.SG_PARAM_STRIDED,
                     lif_kernels.SG_PARAM_CHANNEL]
    assert torch.equal(g0, g1) and torch.equal(g0, g2)
    assert torch.equal(s0, s3) and not torch.allclose(g0, g3)


@pytest.mark.gpu
def test_unknown_surrogate_id_is_refused_not_treated_as_another():
    params = mt.LIFConfig().kernel_params
    x = make_input((3, 2, 4), 0)
    _, u_saved, _, _, _ = lif_kernels.lif_forward(x, params)
    with pytest.raises(ValueError, match=r"unknown surrogate id 5; known: 0 \(triangle\)"):
        lif_kernels.lif_backward(None, u_saved, params._replace(surrogate_kind=5))


def test_surrogate_ids_agree_with_the_c_kernels_enum():
    """The C kernels dispatch on their own enum: its values must be the Python classes' kind."""
    import re
    from pathlib import Path

    source = (Path(mt.__file__).parent / "kernels" / "lif_cpu.c").read_text()
    enum = dict((name.lower(), int(value)) for name, value in re.findall(r"SG_([A-Z]+) = (\d+)", source)
                if name != "COUNT")
    assert enum == {name: kind for kind, name in mt.SURROGATE_KINDS.items()}
