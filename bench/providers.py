"""What the kernel benchmark times: one LIF layer, statistics off or on, through each provider.

Every provider computes the same thing for the same neuron (``NEURON``):
spikes, and with statistics on the per-(t, c) mean and variance of
u = h - V_th and the MPD-SGR loss of the layer, mean(Omega). Its step
returns the tensors a training step differentiates: ``(spikes,)`` or
``(spikes, mpd_loss)``; ``pass_callable`` turns a step into the timed
forward, backward, or both.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch._functorch import config as functorch_config

import mpd_triton as mt

from .measure import PASSES
from .peers import (
    SPIKINGJELLY_IMPLEMENTATION_ENV,
    SpikingJellyLIF,
    load_spikingjelly,
    spikingjelly_implementation,
)

__all__ = ["NEURON", "MPD_ETA", "Provider", "PROVIDERS", "PROVIDER_NAMES", "mpd_loss", "make_input",
           "make_output_grads", "pass_callable"]

# The neuron every provider runs: the SNN-RAT/FEEL/SR/MPD-SGR LIF with the triangle surrogate
# (spikingjelly's PiecewiseQuadratic(alpha=1) is the same g(u)).
NEURON = mt.LIFConfig(tau=2.0, v_th=1.0, v_reset=0.0, decay_input=True, detach_reset=False,
                      surrogate=mt.Triangle(1.0))
MPD_ETA = 0.1  # weight of the MPD-SGR loss in the backward; its value does not change the work

Step = Callable[[torch.Tensor], tuple]


def mpd_loss(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """One layer's L_MPD: mean Omega over (t, c) with the neuron's surrogate window."""
    return mt.mpd_overlap(mean, var, NEURON.surrogate.window).mean()


def _lif_step(backend: str, stats: bool) -> Step:
    c = NEURON

    def step(x):
        out = mt.lif(x, c.tau, c.v_th, c.v_reset, c.decay_input, c.detach_reset, c.surrogate, backend,
                     return_stats=stats)
        if not stats:
            return (out,)
        spikes, mean, var = out
        return spikes, mpd_loss(mean, var)

    return step


class Provider:
    name: str
    description: str

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this provider cannot run here, or None."""
        return None

    def implementation(self, device: torch.device) -> str:
        raise NotImplementedError

    def step(self, stats: bool) -> Step:
        raise NotImplementedError


class MpdTritonProvider(Provider):
    name = "mpd_triton"
    description = "mt.lif(..., backend='triton'): the fused kernels, statistics in the same pass"

    def unavailable(self, device, dtype):
        if device.type != "cuda" and not mt.triton_interpreted():
            return ("no CUDA, and TRITON_INTERPRET=1 was not set before triton was imported: "
                    "the Triton kernels need a GPU or the interpreter")
        return None

    def implementation(self, device):
        return "triton" if device.type == "cuda" else "triton interpreter"

    def step(self, stats):
        return _lif_step("triton", stats)


class MpdTritonCpuProvider(Provider):
    name = "mpd_triton_cpu"
    description = "mt.lif(..., backend='cpu'): the fused C kernels for CPU tensors, statistics in the same pass"

    def unavailable(self, device, dtype):
        if device.type != "cpu":
            return f"the fused C kernels run on the CPU, this measurement is on {device.type}"
        reason = mt.cpu_kernels_unavailable()
        if reason is not None:
            return f"the CPU kernels are unavailable: {reason}"
        return None

    def implementation(self, device):
        return f"C kernels, {torch.get_num_threads()} threads"

    def step(self, stats):
        return _lif_step("cpu", stats)


class TorchEagerProvider(Provider):
    name = "torch_eager"
    description = "mt.lif(..., backend='torch'): the pure-PyTorch reference, eager"

    def implementation(self, device):
        return "torch eager"

    def step(self, stats):
        return _lif_step("torch", stats)


class TorchCompileProvider(Provider):
    name = "torch_compile"
    description = ("the pure-PyTorch reference (and the MPD loss) under torch.compile(fullgraph=True), "
                   "donated buffers off")

    def __init__(self):
        self._compiled: dict[bool, Step] = {}

    def implementation(self, device):
        return "torch.compile (inductor)"

    def step(self, stats):
        if stats not in self._compiled:
            # Each shape, dtype and T is a new graph; never fall back to eager silently when the cache fills.
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 256)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
            # A backward compiled with donated buffers refuses retain_graph=True, which the timed
            # backward-only pass needs; without donation the backward only may not reuse saved memory in place.
            functorch_config.donated_buffer = False
            self._compiled[stats] = torch.compile(_lif_step("torch", stats), fullgraph=True)
        return self._compiled[stats]


class SpikingJellyProvider(Provider):
    name = "spikingjelly"
    description = ("spikingjelly 2.0 lif_multi_step (on CUDA its Triton kernel, on the CPU its PyTorch "
                   "multi-step loop); statistics on: plus per-(t, c) statistics from its v_seq and the MPD loss "
                   "in PyTorch")

    def __init__(self, require_triton: bool = True):
        # On CUDA the peer is its Triton kernel; require_triton=False also accepts its other CUDA paths.
        self.require_triton = require_triton

    def unavailable(self, device, dtype):
        sj, reason = load_spikingjelly()
        if sj is None:
            return reason
        if not self.require_triton or device.type != "cuda":
            return None  # on the CPU: its PyTorch implementation, what its CPU users run
        try:
            chosen = spikingjelly_implementation(device)
        except Exception as error:  # spikingjelly found no CUDA implementation it could load
            return f"spikingjelly has no LIF implementation here ({type(error).__name__}: {error})"
        if chosen != "triton":
            return (f"spikingjelly chose its {chosen!r} LIF implementation, not triton "
                    f"({SPIKINGJELLY_IMPLEMENTATION_ENV} must be 'triton' or unset when it is imported)")
        return None

    def implementation(self, device):
        return f"spikingjelly {spikingjelly_implementation(device)}"

    def step(self, stats):
        c = NEURON
        layer = SpikingJellyLIF(c.tau, c.v_th, c.v_reset, c.decay_input, c.detach_reset, c.surrogate,
                                record_mpd=stats)

        def step(x):
            spikes = layer(x)
            if not stats:
                return (spikes,)
            mean, var = layer.mpd_records[-1]
            return spikes, mpd_loss(mean, var)

        return step


PROVIDERS: dict[str, Provider] = {
    p.name: p for p in (MpdTritonProvider(), MpdTritonCpuProvider(), TorchEagerProvider(), TorchCompileProvider(),
                        SpikingJellyProvider())
}
PROVIDER_NAMES = tuple(PROVIDERS)


def make_input(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Membrane input x ~ N(V_th, 1) (a quarter of the neurons fire per step), requiring grad like a layer's input."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).add_(NEURON.v_th)
    return x.to(dtype).requires_grad_()


def make_output_grads(x: torch.Tensor, stats: bool, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Gradients of (spikes,) or (spikes, mpd_loss): random for the spikes, eta for the loss."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    grad_spikes = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)
    if not stats:
        return (grad_spikes,)
    return grad_spikes, torch.tensor(MPD_ETA, device=x.device)


def pass_callable(step: Step, x: torch.Tensor, grads: tuple[torch.Tensor, ...], pass_name: str):
    """The zero-argument callable that runs one pass. For "backward" the forward runs once, here."""
    if pass_name == "forward":
        return lambda: step(x)
    if pass_name == "backward":
        outputs = step(x)
        return lambda: torch.autograd.backward(outputs, grads, retain_graph=True)
    if pass_name == "both":
        return lambda: torch.autograd.backward(step(x), grads)
    raise ValueError(f"pass must be one of {PASSES}, got {pass_name!r}")
