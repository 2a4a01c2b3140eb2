"""Public functional API: input validation and backend dispatch.

The fused kernels are reached through the custom operators of ``ops`` (their
autograd formula lives there), so ``torch.compile(fullgraph=True)`` traces
``lif`` without graph breaks on both backends.
"""

from __future__ import annotations

import warnings

import torch

from . import ops as _ops  # registers torch.ops.mpd_triton.* too
from .kernels import cpu as _cpu_kernels
from .kernels import runtime as _runtime
from .neuron import LIFConfig, check_bool, check_float_tensor, check_surrogate_param
from .reference import lif_reference
from .surrogates import Surrogate

__all__ = ["lif", "lif_with_config", "BACKENDS", "KERNEL_DTYPES", "triton_interpreted", "cpu_kernels_unavailable"]

BACKENDS = ("auto", "triton", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def triton_interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return _runtime.INTERPRETED


def cpu_kernels_unavailable() -> str | None:
    """Why backend="cpu" cannot run here (no C compiler, disabled, ...), or None. The first
    call builds the C kernels if needed (seconds, once per machine)."""
    return _cpu_kernels.unavailable_reason()


_warned_cpu_fallback = False


def _cpu_fallback_warning() -> None:
    global _warned_cpu_fallback
    reason = _cpu_kernels.unavailable_reason()
    if not _warned_cpu_fallback and not reason.startswith("disabled"):
        _warned_cpu_fallback = True
        warnings.warn(f"mpd_triton: the fused CPU kernels are unavailable ({reason}); backend='auto' runs the "
                      "PyTorch reference on the CPU, several times slower", RuntimeWarning, stacklevel=4)


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [T, B, C, *spatial] or [T, B, F], got {type(x).__name__}")
    if x.dtype not in _REFERENCE_DTYPES:
        raise TypeError(f"x must be a float32, float16 or bfloat16 tensor, got dtype {x.dtype}")
    if x.dim() < 3:
        raise ValueError(
            f"x must have shape [T, B, F] or [T, B, C, *spatial] (time first, then batch), "
            f"got {x.dim()} dims: {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"x has T = 0 time steps (shape {tuple(x.shape)}); need T >= 1")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); every dimension must be >= 1")


def _check_v_init(v_init, x: torch.Tensor) -> None:
    if v_init is None:
        return
    check_float_tensor("v_init", v_init, x, str(tuple(x.shape[1:])))
    if tuple(v_init.shape) != tuple(x.shape[1:]):
        raise ValueError(f"v_init must have shape x.shape[1:] = {tuple(x.shape[1:])}, got {tuple(v_init.shape)}")


def _resolve_backend(backend, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if x.dtype not in KERNEL_DTYPES:
            return "torch"
        if x.is_cuda:
            return "triton" if _runtime.TRITON_MISSING is None else "torch"
        if x.device.type == "cpu":
            if _cpu_kernels.available(x.dtype):
                return "cpu"
            if not _cpu_kernels.available():
                _cpu_fallback_warning()
        return "torch"
    if backend == "triton":
        if _runtime.TRITON_MISSING is not None:
            raise ValueError(f"backend='triton' is unavailable: {_runtime.TRITON_MISSING}; backend='auto' runs the "
                             "C kernels on the CPU and the PyTorch reference elsewhere")
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"backend='triton' takes float32, float16 or bfloat16 input, got {x.dtype}; use backend='torch'"
            )
        if not x.is_cuda and not _runtime.INTERPRETED:
            raise ValueError(
                f"backend='triton' needs a CUDA tensor, x is on {x.device}; set TRITON_INTERPRET=1 before "
                "triton is first imported to run the kernels on the CPU, or use backend='torch'"
            )
    if backend == "cpu":
        if x.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs a CPU tensor, x is on {x.device}; use backend='auto'")
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"backend='cpu' takes float32, float16 or bfloat16 input, got {x.dtype}; use backend='torch'"
            )
        reason = _cpu_kernels.unavailable_reason()
        if reason is not None:
            raise ValueError(f"backend='cpu' is unavailable: {reason}; use backend='torch'")
        if not _cpu_kernels.available(x.dtype):
            raise TypeError("backend='cpu': this machine's C compiler has no float16 type; pass float32 or "
                            "bfloat16, or use backend='torch'")
    return backend


def _lif_fused(backend: str, x, v_init, cfg: LIFConfig, stats: bool, save_state: bool, surrogate_param=None):
    # u is saved for backward only when a gradient can be asked for.
    save_u = torch.is_grad_enabled() and (x.requires_grad or (v_init is not None and v_init.requires_grad))
    spikes, mean, var, v_T = _ops.fused_lif(backend, x, v_init, cfg.kernel_params, stats, save_state, save_u,
                                            surrogate_param)
    return spikes, (mean if stats else None), (var if stats else None), (v_T if save_state else None)


# LIFConfig's defaults: lif's neuron arguments are its fields, and default to what it defaults to.


def lif(
    x: torch.Tensor,
    tau: float = 2.0,
    v_th: float = 1.0,
    v_reset: float | None = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: Surrogate | str = "triangle",
    backend: str = "auto",
    *,
    return_stats: bool = False,
    v_init: torch.Tensor | None = None,
    return_state: bool = False,
    surrogate_param: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Multi-step LIF neuron over time-major input.

    Args:
        x: [T, B, C, *spatial] or [T, B, F]; float32, float16 or bfloat16
            (float64 with backend="torch").
        tau: membrane time constant, > 0; ``math.inf`` with decay_input=False
            is an integrate-and-fire neuron.
        v_th: firing threshold.
        v_reset: hard-reset value, or None for a soft reset (subtract v_th).
        decay_input: h = v + (x - (v - v_rest)) / tau if True, else
            h = v - (v - v_rest) / tau + x.
        detach_reset: treat the spike inside the reset as a constant in backward.
        surrogate: a Surrogate object (mt.Triangle(1.0), ...) or its name (the
            default, "triangle", is mt.Triangle(1.0)).
        backend: "triton" (the fused Triton kernels), "cpu" (the fused C
            kernels for CPU tensors), "torch" (the reference), "auto" (triton
            for CUDA tensors where triton is installed, cpu for CPU tensors where a C compiler built the
            kernels, torch otherwise and for float64).
        return_stats: also return mean and biased variance of u = h - v_th per
            time step and channel, [T, C] float32, differentiable.
        v_init: initial membrane potential [B, C, *spatial] (default: v_reset,
            or 0 for a soft reset).
        return_state: also return the final membrane potential v_T.
        surrogate_param: a tensor that replaces the surrogate's scalar parameter
            (gamma or alpha) in the backward only: [C] (one per channel), or of
            x's rank with dims 1 or x's (e.g. x.shape: one per element and time
            step); finite, > 0, on x's device. The forward is unaffected.
            Attacks set it (mpd_triton.attacks, ASSG).

    Returns:
        The spikes (x.dtype, same shape as x); with
            return_stats ``(spikes, mean, var)``; with return_state the final
            state is appended. The triton backend reads x through its strides
            and writes spikes and the final state channels-last when x is (see
            docs/compile.md for what is copied).
    """
    return lif_with_config(x, LIFConfig(tau, v_th, v_reset, decay_input, detach_reset, surrogate), backend,
                           return_stats=return_stats, v_init=v_init, return_state=return_state,
                           surrogate_param=surrogate_param)


def lif_with_config(x: torch.Tensor, config: LIFConfig, backend: str = "auto", *, return_stats: bool = False,
                    v_init: torch.Tensor | None = None, return_state: bool = False,
                    surrogate_param: torch.Tensor | None = None):
    """``mt.lif`` with the neuron given as a validated ``LIFConfig`` (what ``mt.LIF`` calls at every
    forward: the neuron was checked once, when the config was made). Same outputs as ``mt.lif``."""
    if not isinstance(config, LIFConfig):
        raise TypeError(f"config must be an mt.LIFConfig, got {type(config).__name__}")
    _check_x(x)
    _check_v_init(v_init, x)
    check_bool("return_stats", return_stats)
    check_bool("return_state", return_state)
    check_surrogate_param(surrogate_param, x)
    resolved = _resolve_backend(backend, x)
    if resolved != "torch":
        spikes, mean, var, v_T = _lif_fused(resolved, x, v_init, config, return_stats, return_state, surrogate_param)
    else:
        out = lif_reference(x, config, v_init=v_init, return_stats=return_stats, surrogate_param=surrogate_param)
        spikes, mean, var, v_T = out.spikes, out.mean, out.var, out.v
    result = (spikes,)
    if return_stats:
        result += (mean, var)
    if return_state:
        result += (v_T,)
    return result[0] if len(result) == 1 else result
