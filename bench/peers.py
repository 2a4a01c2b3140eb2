"""SpikingJelly 2.0 as the peer: its LIF kernel, and MPD-SGR statistics computed the way its user would.

SpikingJelly 2.0 has no ``backend=`` argument any more: the LIF implementation
on CUDA is picked per process from the environment variable
``SJ_LIF_CUDA_IMPLEMENTATION`` (``auto`` tries its compiled CUDA extension,
then Triton, then PyTorch), read when spikingjelly is imported. The harness
pins it to ``triton`` unless the caller set it, and records the implementation
SpikingJelly reports.

The neuron is called through ``functional.lif_multi_step`` with a float32
initial state: that is the call ``LIFNode(step_mode='m')`` makes for float32
input, and it runs SpikingJelly's kernel for bfloat16 input too (the module
keeps its state in the input dtype, which sends bfloat16 to SpikingJelly's
PyTorch fallback).

SpikingJelly exposes the membrane potential after reset (``store_v_seq``), not
the pre-spike potential h that MPD-SGR needs, so the peer rebuilds h from
v_{t-1} and x_t with the charge equation and reduces (h - V_th) per (t, c) in
PyTorch, as a SpikingJelly user adding MPD-SGR would.
"""

from __future__ import annotations

import math
import os

import torch

import mpd_triton as mt
from mpd_triton.convert import surrogate_to_spikingjelly

__all__ = ["SPIKINGJELLY_IMPLEMENTATION_ENV", "load_spikingjelly", "spikingjelly_implementation",
           "pre_spike_potential", "SpikingJellyLIF"]

SPIKINGJELLY_IMPLEMENTATION_ENV = "SJ_LIF_CUDA_IMPLEMENTATION"

_loaded = None  # (namespace or None, reason or None), cached: the import is slow and reads the env once


def load_spikingjelly():
    """(spikingjelly.activation_based, None) or (None, why it cannot be imported)."""
    global _loaded
    if _loaded is None:
        # Read by spikingjelly at import: the peer timed is its Triton kernel (docs/benchmarks.md,
        # "What is measured").
        os.environ.setdefault(SPIKINGJELLY_IMPLEMENTATION_ENV, "triton")
        try:
            from spikingjelly import activation_based
            from spikingjelly.activation_based import functional, surrogate  # noqa: F401 (loads the attributes used)
        except Exception as error:  # ImportError, or a broken install: either way the provider is skipped
            _loaded = (None, f"spikingjelly is not importable ({type(error).__name__}: {error})")
        else:
            _loaded = (activation_based, None)
    return _loaded


def spikingjelly_implementation(device: torch.device) -> str:
    """The LIF implementation spikingjelly runs on ``device`` ("triton", "cuda", "torch", or "cpu")."""
    sj, reason = load_spikingjelly()
    if sj is None:
        raise ImportError(reason)
    if device.type != "cuda":
        return "cpu"
    return str(sj.functional.neuron_implementation("lif", device)["implementation"])


def _spikingjelly_surrogate(surrogate: mt.Surrogate, sj):
    """The spikingjelly surrogate with the same g(u) (the correspondence of mpd_triton.convert)."""
    return surrogate_to_spikingjelly(surrogate, sj.surrogate)


def pre_spike_potential(x: torch.Tensor, v_init: torch.Tensor, v_seq: torch.Tensor,
                        config: mt.LIFConfig) -> torch.Tensor:
    """h_t of every step (float32) from the post-reset potentials v_1..v_T and the input (docs/design.md, section 2)."""
    v_prev = torch.cat([v_init.unsqueeze(0), v_seq[:-1]])
    current = x.float()
    if config.decay_input:
        return v_prev + (current - (v_prev - config.v_rest)) / config.tau
    return v_prev - (v_prev - config.v_rest) / config.tau + current


class SpikingJellyLIF(mt.LIF):
    """An ``mt.LIF`` whose neuron is SpikingJelly's and whose statistics are plain PyTorch.

    Being an ``mt.LIF``, it records ``(mean, var)`` for ``mt.MPDSGR`` exactly
    as the fused layer does, so the MPD-SGR loss is the same code for every
    provider; only how the spikes and the statistics are computed differs.
    """

    def __init__(self, tau: float = 2.0, v_th: float = 1.0, v_reset: float | None = 0.0,
                 decay_input: bool = True, detach_reset: bool = False,
                 surrogate: mt.Surrogate | str = mt.Triangle(1.0), record_mpd: bool = False):
        super().__init__(tau, v_th, v_reset, decay_input, detach_reset, surrogate, backend="torch",
                         record_mpd=record_mpd)
        self._sj, reason = load_spikingjelly()
        if self._sj is None:
            raise ImportError(reason)
        if not (1.0 < self.config.tau < math.inf):
            raise ValueError(f"spikingjelly's LIF needs 1 < tau < inf, got tau = {self.config.tau}")
        self._surrogate_pair = None  # (mt surrogate, spikingjelly surrogate), rebuilt when the surrogate changes
        self._sj_surrogate()  # refuse an unmatched surrogate now, not at the first forward

    @classmethod
    def like(cls, layer: mt.LIF) -> "SpikingJellyLIF":
        """The SpikingJelly twin of an mt.LIF layer (same neuron, same recording)."""
        c = layer.config
        return cls(c.tau, c.v_th, c.v_reset, c.decay_input, c.detach_reset, c.surrogate,
                   record_mpd=layer.record_mpd)

    def _sj_surrogate(self):
        surrogate = self.config.surrogate
        if self._surrogate_pair is None or self._surrogate_pair[0] != surrogate:
            self._surrogate_pair = (surrogate, _spikingjelly_surrogate(surrogate, self._sj))
        return self._surrogate_pair[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        v_init = torch.full(x.shape[1:], c.v_rest, dtype=torch.float32, device=x.device)
        spikes, _, v_seq = self._sj.functional.lif_multi_step(
            x, v_init, c.tau, c.decay_input, c.v_th, c.v_reset, self._sj_surrogate(), c.detach_reset,
            store_v_seq=self.record_mpd,
        )
        if not self.record_mpd:
            return spikes
        mean, var = mt.membrane_stats(pre_spike_potential(x, v_init, v_seq, c) - c.v_th)
        self.record_stats(mean, var)
        return spikes

    def extra_repr(self) -> str:
        return super().extra_repr().replace("backend='torch'", "neuron=spikingjelly")
