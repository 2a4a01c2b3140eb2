"""Pure-PyTorch multi-step LIF: the oracle of every kernel test and the CPU path.

It is written the plain way on purpose: a Python loop over T, a Heaviside spike
whose backward is the surrogate, and ``torch.mean`` / ``torch.var`` for the
membrane statistics; every gradient (BPTT, the MPD-SGR term through the
statistics) comes from autograd, independently of the fused kernels'
hand-derived backward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .neuron import LIFConfig, check_surrogate_param, surrogate_param_at
from .surrogates import spike_function

__all__ = ["lif_reference", "membrane_stats", "stat_dims", "ReferenceOutputs"]


def stat_dims(ndim: int) -> tuple[int, ...]:
    """Dims of a [T, B, C, *spatial] (or [T, B, F]) tensor reduced for per-(t, c) statistics."""
    return (1,) + tuple(range(3, ndim))


def membrane_stats(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(t, c) mean and biased variance of u = h - V_th, shape [T, C]."""
    dims = stat_dims(u.dim())
    return u.mean(dim=dims), u.var(dim=dims, unbiased=False)


class ReferenceOutputs(NamedTuple):
    spikes: torch.Tensor  # [T, ...] in x.dtype
    mean: torch.Tensor | None  # [T, C] compute dtype
    var: torch.Tensor | None  # [T, C] compute dtype
    v: torch.Tensor | None  # final state [...] in x.dtype
    u: torch.Tensor  # [T, ...] u = h - V_th in the compute dtype (for tests and plots)


def lif_reference(
    x: torch.Tensor,
    config: LIFConfig,
    *,
    v_init: torch.Tensor | None = None,
    return_stats: bool = False,
    compute_dtype: torch.dtype | None = None,
    surrogate_param: torch.Tensor | None = None,
) -> ReferenceOutputs:
    """Run the LIF of docs/design.md (section 2) over x [T, B, ...].

    compute_dtype defaults to float32 (float64 for float64 input); pass the
    input's own low precision to get "plain PyTorch in that precision".
    surrogate_param: as ``mt.lif``'s (a tensor that replaces the surrogate's
    scalar parameter per channel or per element in the backward).
    """
    check_surrogate_param(surrogate_param, x)
    if compute_dtype is None:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cfg = config
    inv_tau, v_rest, v_th = cfg.inv_tau, cfg.v_rest, cfg.v_th
    if v_init is None:
        v = torch.full(x.shape[1:], v_rest, dtype=compute_dtype, device=x.device)
    else:
        v = v_init.to(compute_dtype)
    spikes, us = [], []
    for t in range(x.shape[0]):
        xt = x[t].to(compute_dtype)
        if cfg.decay_input:
            h = v + (xt - (v - v_rest)) * inv_tau
        else:
            h = v - (v - v_rest) * inv_tau + xt
        u = h - v_th
        param_t = surrogate_param_at(surrogate_param, t, u.dim())
        s = spike_function(u, cfg.surrogate, None if param_t is None else param_t.to(compute_dtype))
        s_reset = s.detach() if cfg.detach_reset else s
        if cfg.hard_reset:
            v = h * (1.0 - s_reset) + cfg.v_reset * s_reset
        else:
            v = h - v_th * s_reset
        spikes.append(s)
        us.append(u)
    u_all = torch.stack(us)
    mean = var = None
    if return_stats:
        mean, var = membrane_stats(u_all)
    return ReferenceOutputs(torch.stack(spikes).to(x.dtype), mean, var, v.to(x.dtype), u_all)
