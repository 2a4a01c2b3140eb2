"""Shared test helpers: device, informative comparisons, strategies, NaN poisoning, a free port."""

from __future__ import annotations

import math
import socket

import torch
from hypothesis import strategies as st

import mpd_triton as mt
from mpd_triton.kernels import cpu as cpu_kernels
from mpd_triton.kernels import lif as lif_kernels
from mpd_triton.reference import stat_dims

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                 mask: torch.Tensor | None = None) -> None:
    """Elementwise |actual - expected| <= atol + rtol |expected|; on failure say where and by how much."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if mask is not None:
        mask = mask.cpu().expand_as(a)
        a, e = a[mask], e[mask]
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values, first at {bad}")
    diff = (a - e).abs()
    bound = atol + rtol * e.abs()
    over = diff > bound
    if over.any():
        full_index = over.nonzero()[0].tolist()
        i = tuple(full_index)
        raise AssertionError(
            f"{name}: {int(over.sum())} of {a.numel()} elements differ beyond atol={atol:g}, rtol={rtol:g}; "
            f"max |diff| = {float(diff.max()):.3e} (max |expected| = {float(e.abs().max()):.3e}); "
            f"first at {list(i)}: actual {float(a[i]):.8g}, expected {float(e[i]):.8g}"
        )


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| in float64."""
    a, e = approx.detach().double(), exact.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


# ---------------------------------------------------------------- a fused backend against the reference


def _run_lif(backend, x, opts, *, terms, weights, v_init=None, surrogate_param=None):
    """Forward + backward of a weighted sum of the chosen outputs; returns outputs and grads."""
    x = x.detach().clone().requires_grad_(True)
    v0 = v_init.detach().clone().requires_grad_(True) if v_init is not None else None
    spikes, mean, var, v_T = mt.lif(x, **opts, backend=backend, return_stats=True, v_init=v0, return_state=True,
                                    surrogate_param=surrogate_param)
    loss = 0.0
    if "spikes" in terms:
        loss = loss + (spikes.float() * weights["spikes"]).sum()
    if "stats" in terms:
        loss = loss + (mean * weights["mean"]).sum() + (var * weights["var"]).sum()
    if "overlap" in terms:
        loss = loss + mt.mpd_overlap(mean, var, opts["surrogate"].window).mean()
    if "state" in terms:
        loss = loss + (v_T.float() * weights["state"]).sum()
    loss.backward()
    return dict(spikes=spikes.detach(), mean=mean.detach(), var=var.detach(), v_T=v_T.detach(),
                grad_x=x.grad, grad_v0=v0.grad if v0 is not None else None)


def output_weights(x, seed):
    g = torch.Generator().manual_seed(seed + 1)
    T, C = x.shape[0], x.shape[2]

    def r(*shape):
        return torch.randn(shape, generator=g).to(DEVICE)

    return dict(spikes=r(*x.shape), mean=r(T, C), var=r(T, C), state=r(*x.shape[1:]))


# Low-precision input: the kernels save u in the input dtype and write v_T and dL/dx in it, the reference keeps
# u in float32, so the final state and the gradients agree to about the dtype's precision (relative to the
# largest value); statistics, computed in float32 by both, keep the float32 tolerances.
LOW_PRECISION_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def compare_with_reference(backend, x, opts, seed, terms, *, v_init=None, surrogate_param=None):
    """A fused backend against the reference: forward (spikes exactly, statistics, final state) and
    the gradients of x and v_init of a random weighting of the chosen outputs (``terms``); x in
    float32, or bfloat16 / float16 (LOW_PRECISION_TOLERANCE)."""
    weights = output_weights(x, seed)
    ref = _run_lif("torch", x, opts, terms=terms, weights=weights, v_init=v_init, surrogate_param=surrogate_param)
    out = _run_lif(backend, x, opts, terms=terms, weights=weights, v_init=v_init, surrogate_param=surrogate_param)
    u_ref = mt.lif_reference(x.float(), mt.LIFConfig(**opts), v_init=v_init).u

    # Spikes must agree exactly, except where u sits at rounding level of the
    # threshold (possible on a GPU with FMA); such a neuron's later steps then
    # legitimately diverge and it is left out of the remaining comparisons.
    flips = out["spikes"] != ref["spikes"]
    if flips.any():
        first = flips.float().cumsum(0).eq(1) & flips
        near = u_ref.abs() <= 1e-5 * (1.0 + abs(opts["v_th"]))
        assert bool((near | ~first).all()), (
            f"spikes differ where |u| = {float(u_ref[first & ~near].abs().min()):.3e} is not at rounding level"
        )
    neuron_ok = ~flips.any(0, keepdim=True)
    channel_ok = neuron_ok.all(dim=stat_dims(x.dim()), keepdim=True)
    grad_mask = channel_ok if ("stats" in terms or "overlap" in terms) else neuron_ok

    assert_close("spikes", out["spikes"], ref["spikes"], atol=0, rtol=0, mask=neuron_ok)
    stat_mask = channel_ok.reshape(1, -1)
    scale = 1.0 + float(u_ref.abs().max())
    assert_close("mean", out["mean"], ref["mean"], atol=2e-6 * scale, rtol=1e-5, mask=stat_mask)
    assert_close("var", out["var"], ref["var"], atol=4e-6 * scale * scale, rtol=1e-4, mask=stat_mask)
    low = LOW_PRECISION_TOLERANCE.get(x.dtype)
    assert_close("v_T", out["v_T"], ref["v_T"], atol=(low or 1e-5) * scale, rtol=low or 1e-5, mask=neuron_ok[0])
    gscale = 1.0 + float(ref["grad_x"].abs().max())
    grad_atol, grad_rtol = (low * gscale, low) if low else (2e-5 * gscale, 1e-4)
    assert_close("grad_x", out["grad_x"], ref["grad_x"], atol=grad_atol, rtol=grad_rtol, mask=grad_mask)
    if v_init is not None:
        assert_close("grad_v_init", out["grad_v0"], ref["grad_v0"], atol=grad_atol, rtol=grad_rtol, mask=grad_mask[0])


# ---------------------------------------------------------------- memory formats


def _channels_last_steps(x):
    """[T, B, C, H, W] whose [T*B, C, H, W] view is torch.channels_last (BatchNorm2d output in that format)."""
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, x.shape[:2])


# name: builds (leaf, x) from dense values of x's shape; the gradient compared is the leaf's.
LAYOUTS = {
    "contiguous": lambda v: (lambda leaf: (leaf, leaf))(v.clone().requires_grad_(True)),
    "channels_last": lambda v: (lambda leaf: (leaf, leaf))(_channels_last_steps(v).requires_grad_(True)),
    # The direct encoding's first layer: one current repeated over T (time stride 0).
    "expanded_over_T": lambda v: (lambda leaf: (leaf, leaf.expand(v.shape)))(v[0].clone().requires_grad_(True)),
    "channels_last_expanded_over_T": lambda v: (lambda leaf: (leaf, leaf.expand(v.shape)))(
        v[0].contiguous(memory_format=torch.channels_last).requires_grad_(True)),
    "batch_major": lambda v: (lambda leaf: (leaf, leaf.transpose(0, 1)))(
        v.transpose(0, 1).contiguous().requires_grad_(True)),
    # Spatial dims that do not merge into one stride: the one case that is copied.
    "transposed_spatial": lambda v: (lambda leaf: (leaf, leaf.transpose(3, 4)))(
        v.transpose(3, 4).contiguous().requires_grad_(True)),
}


# ---------------------------------------------------------------- strategies

SURROGATES = st.one_of(
    st.builds(mt.Triangle, st.floats(0.25, 2.0)),
    st.builds(mt.Rectangular, st.floats(0.2, 1.0)),
    st.builds(mt.Sigmoid, st.floats(1.0, 8.0)),
    st.builds(mt.ATan, st.floats(0.5, 4.0)),
    st.builds(mt.SuperSpike, st.floats(2.0, 20.0)),
)


@st.composite
def neuron_options(draw) -> dict:
    tau = draw(st.one_of(st.just(math.inf), st.sampled_from([1.0, 2.0, 4.0]), st.floats(0.6, 10.0)))
    decay_input = False if math.isinf(tau) else draw(st.booleans())
    return dict(
        tau=tau,
        v_th=draw(st.sampled_from([1.0, 0.5]) | st.floats(0.25, 2.0)),  # above every v_reset below
        v_reset=draw(st.sampled_from([0.0, None, -0.3, 0.2])),
        decay_input=decay_input,
        detach_reset=draw(st.booleans()),
        surrogate=draw(SURROGATES),
    )


@st.composite
def input_shapes(draw, max_T: int = 16) -> tuple[int, ...]:
    T = draw(st.integers(1, max_T))
    B = draw(st.integers(1, 5))
    C = draw(st.integers(1, 9))
    spatial = draw(st.sampled_from([(), (1,), (7,), (3, 5), (4, 4), (2, 3, 3)]))
    if spatial == (7,):
        spatial = (draw(st.integers(1, 13)),)
    return (T, B, C) + spatial


def make_input(shape, seed: int, *, dtype=torch.float32, scale: float = 1.5, offset: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    return x.to(dtype).to(DEVICE)


# ---------------------------------------------------------------- NaN poisoning


class _PoisonedTorch:
    """Stands in for ``torch`` inside the kernel launch module: every new
    floating-point buffer starts as NaN, so an element a kernel forgot to
    write fails the comparison."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    @staticmethod
    def empty_like(*args, **kwargs):
        t = torch.empty_like(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t


def poison_kernel_outputs(monkeypatch) -> None:
    """Both kernel launch modules (Triton and C) allocate NaN-filled buffers."""
    monkeypatch.setattr(lif_kernels, "torch", _PoisonedTorch())
    monkeypatch.setattr(cpu_kernels, "torch", _PoisonedTorch())


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun's rendezvous (a fixed one can be taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(path, num_classes: int = 10, seed: int = 0, data: str = "fmnist-subset"):
    """A model.pt as train.run writes it, of an untrained small SNN (T = 2, the PyTorch backend), for the
    command-line tests of train.eval and the study's scripts."""
    from models import build_model
    from train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    spec = {"model": "small", "in_channels": 1, "num_classes": num_classes, "image_size": 28, "T": 2,
            "encoding": "direct", "neuron": {"backend": "torch"}, "mean": [0.286], "std": [0.353], "data": data}
    kwargs = {k: v for k, v in spec.items() if k not in ("model", "data")}
    model = build_model("small", width=16, hidden=128, **kwargs)
    save_checkpoint(path, {"run": "plain", "eta": 0.0, "config": {}, "model": model.state_dict(),
                           "model_spec": spec})
    return path
