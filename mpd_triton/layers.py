"""nn.Module wrapper of the multi-step LIF neuron."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .functional import BACKENDS, lif_with_config
from .neuron import LIFConfig, check_bool
from .surrogates import Surrogate

__all__ = ["LIF", "BACKWARD_MODES", "rate_backward"]

BACKWARD_MODES = ("bptt", "rate")


def rate_backward(x: torch.Tensor, spikes: torch.Tensor, config: LIFConfig) -> torch.Tensor:
    """The spikes, with a backward through the firing rate (BPTR) instead of through time.

    Each neuron is treated as a rate unit r = clip(k * mean_t x_t, 0, 1), with
    k = 1 / V_th the slope of an integrate-and-fire neuron's rate curve (times
    1/tau when the input is decayed): dL/dx_t = (k / T) * sum_t' dL/ds_t' for
    neurons whose observed rate is strictly between 0 and 1, and 0 for silent
    or saturated ones. The forward values are the true spikes.
    """
    rate = spikes.detach().float().mean(0, keepdim=True)
    active = ((rate > 0) & (rate < 1)).to(x.dtype)
    gain = (config.inv_tau if config.decay_input else 1.0) / max(abs(config.v_th), 1e-12)
    proxy = (gain * active) * x.mean(0, keepdim=True)
    return spikes.detach() + (proxy - proxy.detach()).expand_as(spikes)


class LIF(nn.Module):
    """Multi-step LIF layer: [T, B, C, *spatial] or [T, B, F] in, spikes of the same shape out.

    With ``record_mpd=True`` each forward also computes the per-(t, c) mean and
    variance of the membrane potential (fused into the same kernel pass) and
    keeps them in ``mpd_records`` for :class:`mpd_triton.MPDSGR`.

    The neuron parameters are those of :func:`mpd_triton.lif`; they can be
    changed after construction (``layer.surrogate = mt.Sigmoid()`` swaps the
    surrogate, e.g. for an attacker's gradient). ``surrogate_param`` (None by
    default) is passed to :func:`mpd_triton.lif`: a tensor that replaces the
    surrogate's scalar parameter per channel or per element in the backward
    (the ASSG attack sets it before each forward). ``backward_mode = "rate"``
    replaces backpropagation through time by the rate backward of
    :func:`rate_backward` (an attacker's option; statistics are not recorded then).
    """

    def __init__(self, tau: float = 2.0, v_th: float = 1.0, v_reset: float | None = 0.0, decay_input: bool = True,
                 detach_reset: bool = False, surrogate: Surrogate | str = "triangle", *, backend: str = "auto",
                 record_mpd: bool = False):
        """The neuron's parameters are :class:`mpd_triton.LIFConfig`'s (the same names, order and
        defaults; tests/library/test_api.py keeps them in step), validated once, here."""
        super().__init__()
        self.config = LIFConfig(tau=tau, v_th=v_th, v_reset=v_reset, decay_input=decay_input,
                                detach_reset=detach_reset, surrogate=surrogate)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.record_mpd = check_bool("record_mpd", record_mpd)
        # When an MPDSGR owns this layer it clears the records at the start of each
        # model forward, so several calls per forward are all kept; otherwise only
        # the last call's statistics are kept.
        self.keep_all_records = False
        self.mpd_records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.backward_mode = "bptt"
        self.surrogate_param: torch.Tensor | None = None

    # Neuron parameters, read through the validated config.
    def _replace(self, **changes):
        self.config = dataclasses.replace(self.config, **changes)

    @property
    def surrogate(self) -> Surrogate:
        return self.config.surrogate

    @surrogate.setter
    def surrogate(self, value):
        self._replace(surrogate=value)

    @property
    def tau(self) -> float:
        return self.config.tau

    @property
    def v_th(self) -> float:
        return self.config.v_th

    @property
    def v_reset(self):
        return self.config.v_reset

    def clear_mpd_records(self) -> None:
        self.mpd_records = []

    def record_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Keep one call's statistics for MPDSGR (all calls of a forward when an MPDSGR owns the layer)."""
        if self.keep_all_records:
            self.mpd_records.append((mean, var))
        else:
            self.mpd_records = [(mean, var)]

    @classmethod
    def from_config(cls, config: LIFConfig, *, backend: str = "auto", record_mpd: bool = False) -> "LIF":
        """A layer for an already validated neuron."""
        if not isinstance(config, LIFConfig):
            raise TypeError(f"config must be an mt.LIFConfig, got {type(config).__name__}")
        layer = cls(backend=backend, record_mpd=record_mpd)
        layer.config = config
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backward_mode == "rate":
            spikes = lif_with_config(x.detach(), self.config, self.backend)
            return rate_backward(x, spikes, self.config)
        if self.backward_mode != "bptt":
            raise ValueError(f"backward_mode must be one of {BACKWARD_MODES}, got {self.backward_mode!r}")
        if not self.record_mpd:
            return lif_with_config(x, self.config, self.backend, surrogate_param=self.surrogate_param)
        spikes, mean, var = lif_with_config(x, self.config, self.backend, return_stats=True,
                                            surrogate_param=self.surrogate_param)
        self.record_stats(mean, var)
        return spikes

    def extra_repr(self) -> str:
        c = self.config
        reset = f"v_reset={c.v_reset:g}" if c.hard_reset else "soft reset"
        return (f"tau={c.tau:g}, v_th={c.v_th:g}, {reset}, decay_input={c.decay_input}, "
                f"detach_reset={c.detach_reset}, surrogate={c.surrogate!r}, backend={self.backend!r}, "
                f"record_mpd={self.record_mpd}")

