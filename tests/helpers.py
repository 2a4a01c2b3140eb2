"""Shared test helpers: device, informative comparisons, strategies, NaN poisoning."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

import mpd_triton as mt
from mpd_triton.kernels import lif as lif_kernels

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
        v_th=draw(st.sampled_from([1.0, 0.5]) | st.floats(0.2, 2.0)),
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
    monkeypatch.setattr(lif_kernels, "torch", _PoisonedTorch())
