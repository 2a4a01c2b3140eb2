"""Surrogate gradients: the PyTorch formula and the Triton helper side by side.

Every surrogate replaces ds/du of the Heaviside spike s = H(u), u = h - V_th, by
a function g(u). Each class here carries

* ``grad(u, param=None)``: the PyTorch formula (used by the reference and the
  tests); ``param`` overrides ``self.param`` with a tensor broadcast against u
  (a parameter per channel or per element, as ``mt.lif(surrogate_param=)``),
* ``kind`` / ``param``: what the Triton kernels need; ``surrogate_grad`` below
  dispatches on ``kind`` at compile time to the matching ``@triton.jit`` helper,
* ``window``: the half-width gamma of the interval [-gamma, gamma] that MPD-SGR
  treats as "the surrogate gradient is available here".

Window convention for surrogates with unbounded support (Sigmoid, ATan,
SuperSpike): gamma is the half-width at which g falls to ``WINDOW_PEAK_FRACTION``
(one tenth) of its peak g(0). Triangle and Rectangular have compact support, and
their window is exactly that support. Every class takes ``gamma=`` to override.
"""

from __future__ import annotations

import math
import numbers

import torch

from .kernels.runtime import TRITON_MISSING, jit

if TRITON_MISSING is None:
    import triton.language as tl

__all__ = [
    "Surrogate",
    "Triangle",
    "Rectangular",
    "Sigmoid",
    "ATan",
    "SuperSpike",
    "as_surrogate",
    "surrogate_grad",
    "WINDOW_PEAK_FRACTION",
    "SURROGATE_NAMES",
    "SURROGATE_KINDS",
    "check_surrogate_kind",
    "spike_function",
]

WINDOW_PEAK_FRACTION = 0.1

# The ids the kernels dispatch on, one per class below (the C kernels' enum in kernels/lif_cpu.c
# has the same values; a test compares the two), and the same as Triton constants for the jit code.
_TRIANGLE, _RECTANGULAR, _SIGMOID, _ATAN, _SUPERSPIKE = 0, 1, 2, 3, 4
if TRITON_MISSING is None:  # (without triton the jit helpers below are plain functions that never run)
    _K_TRIANGLE: tl.constexpr = tl.constexpr(_TRIANGLE)
    _K_RECTANGULAR: tl.constexpr = tl.constexpr(_RECTANGULAR)
    _K_SIGMOID: tl.constexpr = tl.constexpr(_SIGMOID)
    _K_ATAN: tl.constexpr = tl.constexpr(_ATAN)
    _K_SUPERSPIKE: tl.constexpr = tl.constexpr(_SUPERSPIKE)


def _positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not value < math.inf or value <= 0.0:  # comparisons (NaN and inf fail the first): symbolic floats trace
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


class Surrogate:
    """Base class. Subclasses set ``kind`` and implement ``grad``."""

    kind: int
    name: str

    def __init__(self, param: float, window: float):
        self.param = param
        self.window = window

    def grad(self, u: torch.Tensor, param: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        """g(u); ``param`` (broadcast against u) replaces ``self.param`` when given."""
        raise NotImplementedError

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """Heaviside spike of ``u`` whose backward is this surrogate (pure PyTorch)."""
        return spike_function(u, self)

    def __eq__(self, other) -> bool:
        return (
            type(self) is type(other)
            and self.param == other.param
            and self.window == other.window
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.param, self.window))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._param_name}={self.param:g}, window={self.window:g})"

    _param_name = "param"


class Triangle(Surrogate):
    """g(u) = max(0, gamma - |u|) / gamma^2 (SNN-RAT, FEEL, SR use gamma = 1)."""

    kind, name, _param_name = _TRIANGLE, "triangle", "gamma"

    def __init__(self, gamma: float = 1.0):
        gamma = _positive_finite("gamma", gamma)
        super().__init__(gamma, gamma)

    def grad(self, u, param=None):
        gamma = self.param if param is None else param
        return torch.clamp(gamma - u.abs(), min=0.0) / (gamma * gamma)


@jit
def _triangle_grad(u, gamma):
    return tl.maximum(gamma - tl.abs(u), 0.0) / (gamma * gamma)


class Rectangular(Surrogate):
    """g(u) = 1[|u| < gamma] / (2 gamma)."""

    kind, name, _param_name = _RECTANGULAR, "rectangular", "gamma"

    def __init__(self, gamma: float = 0.5):
        gamma = _positive_finite("gamma", gamma)
        super().__init__(gamma, gamma)

    def grad(self, u, param=None):
        gamma = self.param if param is None else param
        return (u.abs() < gamma).to(u.dtype) / (2.0 * gamma)


@jit
def _rectangular_grad(u, gamma):
    return tl.where(tl.abs(u) < gamma, 1.0 / (2.0 * gamma), 0.0)


class Sigmoid(Surrogate):
    """g(u) = alpha * sig(alpha u) * (1 - sig(alpha u)).

    Window: g(gamma) = g(0) / 10, i.e. gamma = 2 atanh(sqrt(0.9)) / alpha.
    """

    kind, name, _param_name = _SIGMOID, "sigmoid", "alpha"

    def __init__(self, alpha: float = 4.0, gamma: float | None = None):
        alpha = _positive_finite("alpha", alpha)
        if gamma is None:
            gamma = 2.0 * math.atanh(math.sqrt(1.0 - WINDOW_PEAK_FRACTION)) / alpha
        super().__init__(alpha, _positive_finite("gamma", gamma))

    def grad(self, u, param=None):
        alpha = self.param if param is None else param
        sig = torch.sigmoid(alpha * u)
        return alpha * sig * (1.0 - sig)


@jit
def _sigmoid_grad(u, alpha):
    sig = tl.sigmoid(alpha * u)
    return alpha * sig * (1.0 - sig)


class ATan(Surrogate):
    """g(u) = (alpha / 2) / (1 + (pi/2 * alpha * u)^2).

    Window: g(gamma) = g(0) / 10, i.e. gamma = 6 / (pi alpha).
    """

    kind, name, _param_name = _ATAN, "atan", "alpha"

    def __init__(self, alpha: float = 2.0, gamma: float | None = None):
        alpha = _positive_finite("alpha", alpha)
        if gamma is None:
            gamma = 2.0 * math.sqrt(1.0 / WINDOW_PEAK_FRACTION - 1.0) / (math.pi * alpha)
        super().__init__(alpha, _positive_finite("gamma", gamma))

    def grad(self, u, param=None):
        alpha = self.param if param is None else param
        z = (math.pi / 2.0) * alpha * u
        return (alpha / 2.0) / (1.0 + z * z)


@jit
def _atan_grad(u, alpha):
    z = 1.5707963267948966 * alpha * u
    return (alpha * 0.5) / (1.0 + z * z)


class SuperSpike(Surrogate):
    """g(u) = 1 / (1 + alpha |u|)^2 (Zenke & Ganguli 2018).

    Window: g(gamma) = g(0) / 10, i.e. gamma = (sqrt(10) - 1) / alpha.
    """

    kind, name, _param_name = _SUPERSPIKE, "superspike", "alpha"

    def __init__(self, alpha: float = 10.0, gamma: float | None = None):
        alpha = _positive_finite("alpha", alpha)
        if gamma is None:
            gamma = (math.sqrt(1.0 / WINDOW_PEAK_FRACTION) - 1.0) / alpha
        super().__init__(alpha, _positive_finite("gamma", gamma))

    def grad(self, u, param=None):
        alpha = self.param if param is None else param
        d = 1.0 + alpha * u.abs()
        return 1.0 / (d * d)


@jit
def _superspike_grad(u, alpha):
    d = 1.0 + alpha * tl.abs(u)
    return 1.0 / (d * d)


@jit
def surrogate_grad(u, param, KIND: tl.constexpr):
    """g(u) for the surrogate with compile-time id KIND (the ``kind`` of a class above); any other
    id fails to compile (the launchers refuse it before that, with a clear error)."""
    if KIND == _K_TRIANGLE:
        return _triangle_grad(u, param)
    elif KIND == _K_RECTANGULAR:
        return _rectangular_grad(u, param)
    elif KIND == _K_SIGMOID:
        return _sigmoid_grad(u, param)
    elif KIND == _K_ATAN:
        return _atan_grad(u, param)
    elif KIND == _K_SUPERSPIKE:
        return _superspike_grad(u, param)
    else:
        tl.static_assert(False, "unknown surrogate id")


class _SpikeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, surrogate, param):
        ctx.save_for_backward(u, param)
        ctx.surrogate = surrogate
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad_spike):
        u, param = ctx.saved_tensors
        return grad_spike * ctx.surrogate.grad(u, param), None, None


def spike_function(u: torch.Tensor, surrogate: Surrogate, param: torch.Tensor | None = None) -> torch.Tensor:
    """s = 1[u >= 0] with ds/du := surrogate.grad(u, param) (param: a tensor broadcast against u
    that replaces the surrogate's scalar parameter, or None). No gradient flows to param."""
    return _SpikeFunction.apply(u, surrogate, None if param is None else param.detach())


_BY_NAME = {cls.name: cls for cls in (Triangle, Rectangular, Sigmoid, ATan, SuperSpike)}
SURROGATE_NAMES = tuple(_BY_NAME)
# The ids the kernels dispatch on (Triton helpers above, the C kernels' enum), and their names.
SURROGATE_KINDS = {cls.kind: cls.name for cls in _BY_NAME.values()}


def check_surrogate_kind(kind) -> int:
    """kind itself if it is one of SURROGATE_KINDS, else a ValueError (an unknown id must not fall
    through to some surrogate's formula)."""
    if kind not in SURROGATE_KINDS:
        raise ValueError(f"unknown surrogate id {kind!r}; known: "
                         + ", ".join(f"{k} ({name})" for k, name in SURROGATE_KINDS.items()))
    return kind


def as_surrogate(surrogate) -> Surrogate:
    """Accept a Surrogate object or one of ``SURROGATE_NAMES`` (default parameters)."""
    if isinstance(surrogate, Surrogate):
        return surrogate
    if isinstance(surrogate, str):
        cls = _BY_NAME.get(surrogate.lower())
        if cls is None:
            raise ValueError(
                f"surrogate: unknown name {surrogate!r}; expected one of {', '.join(SURROGATE_NAMES)} "
                "or a Surrogate object such as mt.Triangle(1.0)"
            )
        return cls()
    raise TypeError(
        f"surrogate must be a Surrogate object (mt.Triangle(1.0), ...) or a name, got {type(surrogate).__name__}"
    )
