"""The LIF neuron's parameters and conventions, shared by the reference and the kernels.

Multi-step, time-major LIF (docs/design.md, section 2). For t = 1..T::

    decay_input=True :  h_t = v_{t-1} + (x_t - (v_{t-1} - v_rest)) * inv_tau
    decay_input=False:  h_t = v_{t-1} - (v_{t-1} - v_rest) * inv_tau + x_t
    u_t = h_t - V_th ;  s_t = 1 if u_t >= 0 else 0
    hard reset: v_t = h_t * (1 - s_t) + v_reset * s_t     (v_rest = v_reset)
    soft reset: v_t = h_t - V_th * s_t                    (v_rest = 0)

``inv_tau = 1 / tau`` (0 for tau = inf). ``KernelParams`` is the same neuron as
the fused kernels and their custom operators take it: plain floats, bools and
the surrogate's integer id. Both implementations evaluate these
expressions in this order, so in float32 they agree bit for bit wherever the
arithmetic is IEEE (the interpreter; on a GPU, FMA contraction may move the
last bit).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .surrogates import Surrogate, as_surrogate

__all__ = ["LIFConfig", "KernelParams", "check_real", "check_bool", "check_float_tensor", "check_surrogate_param",
           "surrogate_param_at"]


def check_real(name: str, value, *, allow_inf: bool = False, positive: bool = False,
               nonnegative: bool = False) -> float:
    """A Python/NumPy real number (not bool), not NaN; +-inf only if allowed; > 0 or >= 0 if asked."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons rather than math.isnan / math.isinf: they also take the symbolic floats
    # of torch.compile(dynamic=True).
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if abs(value) == math.inf and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_float_tensor(name: str, value, x: torch.Tensor, shape_text: str) -> None:
    """value is a floating-point tensor on x's device (a tensor argument given beside the input x);
    shape_text says what shape it should have, for the message."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be None or a tensor of shape {shape_text}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}; put both on one device")


def check_surrogate_param(value, x: torch.Tensor) -> torch.Tensor | None:
    """Validate ``surrogate_param`` of ``mt.lif`` for input x [T, B, C, *spatial] (or [T, B, F]).

    None, or a floating-point tensor on x's device, finite and > 0, of shape [C]
    (one value per channel; C = F for [T, B, F] input) or of x's rank with every
    dim either 1 or x's (broadcast: [1, B, C, 1, 1] per sample and channel, x.shape
    per element). Returns it unchanged.
    """
    if value is None:
        return None
    shape = tuple(x.shape)
    what = f"[C] = [{shape[2]}] or a shape of {x.dim()} dims each 1 or equal to x's {shape}"
    check_float_tensor("surrogate_param", value, x, what)
    ok = (tuple(value.shape) == (shape[2],) if value.dim() == 1 else
          value.dim() == x.dim() and all(n in (1, m) for n, m in zip(value.shape, shape)))
    if not ok:
        raise ValueError(f"surrogate_param must have shape {what}; got {tuple(value.shape)}")
    # A data-dependent check (a device sync); skipped while torch.compile traces.
    if not torch.compiler.is_compiling() and not bool(((value > 0) & torch.isfinite(value)).all()):
        bad = value[~((value > 0) & torch.isfinite(value))].flatten()[0].item()
        raise ValueError(f"surrogate_param must be finite and > 0 everywhere (it is the surrogate's gamma or "
                         f"alpha), got {bad}")
    return value


def surrogate_param_at(value: torch.Tensor | None, t: int, step_dims: int) -> torch.Tensor | None:
    """The part of a validated ``surrogate_param`` that applies to time step t, shaped to broadcast
    against that step's [B, C, *spatial] (``step_dims`` dims)."""
    if value is None:
        return None
    if value.dim() == 1:
        return value.view((value.shape[0],) + (1,) * (step_dims - 2))
    return value[t if value.shape[0] > 1 else 0]


class KernelParams(NamedTuple):
    """A validated LIFConfig flattened to what an operator schema can carry (no Python objects).

    The ``mpd_triton::lif_fwd`` / ``lif_bwd`` operators' schemas are made from these fields, their
    names, types and order (mpd_triton/ops.py): a field added here is an argument there.
    """

    inv_tau: float
    v_th: float
    v_rest: float
    decay_input: bool
    hard_reset: bool
    detach_reset: bool
    surrogate_kind: int  # Surrogate.kind: which surrogate the backward evaluates (mt.SURROGATE_KINDS)
    surrogate_param: float  # Surrogate.param (gamma or alpha)


@dataclass(frozen=True)
class LIFConfig:
    """Validated neuron parameters. Construct it to check user input."""

    tau: float = 2.0
    v_th: float = 1.0
    v_reset: float | None = 0.0
    decay_input: bool = True
    detach_reset: bool = False
    surrogate: Surrogate | str = "triangle"  # a string default: Dynamo (torch 2.11) cannot bind an object default

    def __post_init__(self):
        tau = check_real("tau", self.tau, allow_inf=True)
        if tau <= 0.0:
            raise ValueError(f"tau must be > 0 (tau = inf gives an integrate-and-fire neuron), got {tau}")
        object.__setattr__(self, "tau", tau)
        object.__setattr__(self, "v_th", check_real("v_th", self.v_th))
        if self.v_reset is not None:
            object.__setattr__(self, "v_reset", check_real("v_reset", self.v_reset))
        check_bool("decay_input", self.decay_input)
        check_bool("detach_reset", self.detach_reset)
        object.__setattr__(self, "surrogate", as_surrogate(self.surrogate))
        # Parameters that make no neuron: one that rests at or above its threshold fires at every step,
        # whatever its input (its spikes carry nothing, and its u never leaves the surrogate's reach).
        if self.v_reset is not None and self.v_reset >= self.v_th:
            raise ValueError(
                f"v_reset ({self.v_reset:g}) >= v_th ({self.v_th:g}): with a hard reset the neuron rests at v_reset, "
                "at or above its threshold, so it fires at every step whatever its input; use v_reset < v_th"
            )
        if self.v_reset is None and self.v_th <= 0.0:
            raise ValueError(
                f"v_th ({self.v_th:g}) <= 0 with a soft reset (v_reset=None): the neuron rests at 0, at or above its "
                "threshold, so it fires at every step whatever its input; use v_th > 0"
            )
        if tau == math.inf and self.decay_input:
            raise ValueError(
                "tau = inf with decay_input=True multiplies the input by 1/tau = 0, so the neuron "
                "never sees its input; use decay_input=False for an integrate-and-fire neuron"
            )

    @property
    def inv_tau(self) -> float:
        return 0.0 if self.tau == math.inf else 1.0 / self.tau

    @property
    def hard_reset(self) -> bool:
        return self.v_reset is not None

    @property
    def v_rest(self) -> float:
        """The level the leak decays toward: v_reset for a hard reset, 0 for a soft one."""
        return self.v_reset if self.v_reset is not None else 0.0

    @property
    def kernel_params(self) -> KernelParams:
        sg = self.surrogate
        return KernelParams(self.inv_tau, self.v_th, self.v_rest, self.decay_input, self.hard_reset,
                            self.detach_reset, sg.kind, sg.param)
