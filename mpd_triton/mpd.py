"""MPD-SGR: the Gaussian overlap of the membrane potential distribution with the
surrogate window, and the regularizer that averages it over a model's LIF layers.

    sigma = sqrt(var + eps)
    Omega = Phi((mean + gamma) / sigma) - Phi((mean - gamma) / sigma)
    L_MPD = mean over layers of (mean over the statistics' entries of Omega)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .kernels import cpu as _cpu_kernels
from .neuron import check_real

__all__ = ["mpd_overlap", "window_overlap", "combine_stats", "MPDSGR", "MPDOptions", "DEFAULT_EPS", "GRANULARITIES",
           "MPD_WINDOWS"]

DEFAULT_EPS = 1e-5
GRANULARITIES = ("time_channel", "channel", "layer")
# "surrogate": the window [-gamma, gamma] of the surrogate (or MPDSGR's gamma), the paper's;
# "relative": [-k sigma, k sigma] for each cell's own sigma (Omega then depends on |mean| / sigma only).
MPD_WINDOWS = ("surrogate", "relative")


def mpd_overlap(mean: torch.Tensor, var: torch.Tensor, gamma, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Share of a Gaussian N(mean, var + eps) that lies in [-gamma, gamma].

    Evaluated as Phi((gamma - |mean|)/sigma) - Phi((-gamma - |mean|)/sigma): the
    same number (Omega is even in mean), but both terms are lower tails, so it
    keeps its relative precision (and a non-zero gradient) when |mean| >> gamma,
    where the textbook form subtracts two numbers close to 1.
    """
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        raise TypeError("mean and var must be tensors")
    if mean.shape != var.shape:
        raise ValueError(f"mean and var must have the same shape, got {tuple(mean.shape)} and {tuple(var.shape)}")
    if not mean.is_floating_point() or not var.is_floating_point():
        raise TypeError(f"mean and var must be floating-point tensors, got {mean.dtype} and {var.dtype}")
    if mean.device != var.device:
        raise ValueError(f"mean is on {mean.device} but var is on {var.device}")
    if isinstance(gamma, torch.Tensor):
        if gamma.device != mean.device and gamma.dim() > 0:
            raise ValueError(f"gamma is on {gamma.device} but mean is on {mean.device}")
    else:
        gamma = check_real("gamma (the surrogate window half-width)", gamma, positive=True)
    eps = check_real("eps", eps, nonnegative=True)
    if isinstance(gamma, torch.Tensor):  # a tensor window: autograd through the formula (gamma may need a gradient)
        _, z1, z2 = _window_z(mean, var, gamma, eps)
        return normal_cdf(z1) - normal_cdf(z2)
    return _Overlap.apply(mean, var, gamma, eps)


_INV_SQRT_2PI = 0.3989422804014327
_SQRT1_2 = 0.7071067811865476


def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Phi(z) = erfc(-z / sqrt 2) / 2, accurate in the lower tail. (``torch.special.ndtr`` computes
    (1 + erf(z / sqrt 2)) / 2 in torch 2.14: exactly 0 below about z = -8.3 in float64 and -5.5 in
    float32, and few correct digits before, so an Omega far outside the window came out as 0.)"""
    return 0.5 * torch.special.erfc(z * -_SQRT1_2)


class _Overlap(torch.autograd.Function):
    """Omega with its gradient in closed form: one autograd node instead of a dozen (each a kernel
    launch on a GPU and tens of microseconds on a CPU, per layer and step). With z1 = (gamma - |m|) /
    sigma, z2 = (-gamma - |m|) / sigma and phi the standard normal density:

        dOmega/d|m|   = (phi(z2) - phi(z1)) / sigma
        dOmega/dsigma = (z2 phi(z2) - z1 phi(z1)) / sigma,   dsigma/dvar = 1 / (2 sigma)

    and d|m|/dm = sign(m) (0 at m = 0, as autograd's abs). Float32 CPU statistics go through one C
    loop each way (``kernels.cpu.overlap_forward`` / ``overlap_backward``: the same formula in float32
    with erfc and exp written out so that the loops vectorize, as accurate as the torch operations but
    not bit for bit theirs) when the CPU kernels are built, outside torch.compile and other tracing
    (``kernels.runtime.traced``) and outside a backward that builds a graph (there the backward
    recomputes z from mean and var, so that it is itself differentiable)."""

    @staticmethod
    def forward(ctx, mean, var, gamma: float, eps: float):
        ctx.gamma, ctx.eps = gamma, eps
        ctx.in_c = _in_c(mean, var)
        if ctx.in_c:
            ctx.save_for_backward(mean, var)
            return _cpu_kernels.overlap_forward(mean, var, gamma, eps)
        sigma, z1, z2 = _window_z(mean, var, gamma, eps)
        ctx.save_for_backward(mean, var, sigma, z1, z2)
        return normal_cdf(z1) - normal_cdf(z2)

    @staticmethod
    def backward(ctx, grad):
        need_mean, need_var = ctx.needs_input_grad[:2]
        if ctx.in_c and not torch.is_grad_enabled():
            mean, var = ctx.saved_tensors
            grad_mean, grad_var = _cpu_kernels.overlap_backward(mean, var, grad, ctx.gamma, ctx.eps, need_mean, need_var)
            return grad_mean, grad_var, None, None
        mean, var, *saved = ctx.saved_tensors
        if torch.is_grad_enabled() or not saved:  # a graph of the backward is asked for: z from the inputs
            sigma, z1, z2 = _window_z(mean, var, ctx.gamma, ctx.eps)
        else:
            sigma, z1, z2 = saved
        phi1 = torch.exp(-0.5 * z1 * z1) * _INV_SQRT_2PI
        phi2 = torch.exp(-0.5 * z2 * z2) * _INV_SQRT_2PI
        g = grad / sigma
        grad_mean = g * (phi2 - phi1) * torch.sign(mean) if need_mean else None
        grad_var = g * (z2 * phi2 - z1 * phi1) / (2 * sigma) if need_var else None
        return grad_mean, grad_var, None, None


def _window_z(mean: torch.Tensor, var: torch.Tensor, gamma, eps: float):
    """(sigma, z1, z2) of Omega: sigma = sqrt(var + eps), z1,2 = (+-gamma - |mean|) / sigma (gamma a float
    or a tensor)."""
    sigma = torch.sqrt(var + eps)
    m = mean.abs()
    return sigma, (gamma - m) / sigma, (-gamma - m) / sigma


def _in_c(mean: torch.Tensor, var: torch.Tensor) -> bool:
    """Omega of these statistics goes through the C loops of the CPU kernels."""
    return _cpu_kernels.takes_float32(mean, var)


def window_overlap(mean: torch.Tensor, var: torch.Tensor, gamma, window: str = "surrogate", k: float = 1.0,
                   eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Omega for MPDSGR's ``window``: "surrogate", the share inside [-gamma, gamma]; "relative",
    inside [-k sigma, k sigma] with each cell's own sigma = sqrt(var + eps) (gamma unused)."""
    if window == "relative":  # gamma = k sigma: autograd through the window too
        return mpd_overlap(mean, var, k * torch.sqrt(var + eps), eps)
    if window != "surrogate":
        raise ValueError(f"window must be one of {MPD_WINDOWS}, got {window!r}")
    return mpd_overlap(mean, var, gamma, eps)


def combine_stats(mean: torch.Tensor, var: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool per-(t, c) statistics [T, C] to a coarser granularity.

    Every (t, c) cell holds the same number of elements, so the pooled mean is
    the plain mean of the cell means and the pooled variance is the mean of
    the cell variances plus the variance of the cell means (Chan's formula for
    equal counts). Returns [T, C] ("time_channel"), [C] ("channel") or [] ("layer").
    """
    if granularity == "time_channel":
        return mean, var
    if granularity == "channel":
        dims = (0,)
    elif granularity == "layer":
        dims = (0, 1)
    else:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    pooled_mean = mean.mean(dim=dims)
    spread = (mean - pooled_mean).square().mean(dim=dims)
    return pooled_mean, var.mean(dim=dims) + spread


@dataclass(frozen=True)
class MPDOptions:
    """How MPD-SGR measures Omega: validated once, here, and shared by ``MPDSGR`` and whatever reports
    Omega beside it (the training's per-layer diagnostics), so that both measure the same thing.

    Args:
        granularity: "time_channel" (per time step and channel, as in the paper), "channel" or
            "layer": the Gaussian is fitted per cell.
        gamma: window half-width for every layer; None uses each layer's surrogate window.
        eps: added to the variance before the square root.
        window: "surrogate" (the paper): Omega is the Gaussian's share inside [-gamma, gamma].
            "relative": inside [-k sigma, k sigma] with each cell's own sigma = sqrt(var + eps),
            so that Omega = Phi(k - |mean|/sigma) - Phi(-k - |mean|/sigma) depends only on how
            many standard deviations the threshold lies from the mean. A layer whose input is
            BatchNorm-ed can lower the surrogate-window Omega by spreading u (a larger gain),
            which moves potentials out of the window but multiplies the gradient of those left
            inside; the relative window does not reward that (docs/study/README.md measures it).
        k: the relative window's half-width in standard deviations.
    """

    granularity: str = "time_channel"
    gamma: float | None = None
    eps: float = DEFAULT_EPS
    window: str = "surrogate"
    k: float = 1.0

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.gamma is not None:
            object.__setattr__(self, "gamma", check_real("gamma", self.gamma, positive=True))
        object.__setattr__(self, "eps", check_real("eps", self.eps, nonnegative=True))
        if self.window not in MPD_WINDOWS:
            raise ValueError(f"window must be one of {MPD_WINDOWS}, got {self.window!r}")
        object.__setattr__(self, "k", check_real("k (the relative window's half-width in standard deviations)",
                                                 self.k, positive=True))
        if self.window == "relative" and self.gamma is not None:
            raise ValueError("gamma sets the surrogate window; the relative window is set by k")

    def layer_gamma(self, layer) -> float:
        """The surrogate window's half-width used for ``layer`` (an mt.LIF): ``gamma``, or its surrogate's."""
        return self.gamma if self.gamma is not None else layer.surrogate.window

    def overlap(self, mean: torch.Tensor, var: torch.Tensor, gamma: float) -> torch.Tensor:
        """Omega of per-(t, c) statistics [T, C], pooled to the granularity, in this window."""
        return window_overlap(*combine_stats(mean, var, self.granularity), gamma, self.window, self.k, self.eps)


class MPDSGR:
    """MPD-SGR regularizer over every ``mt.LIF`` layer of ``model``.

    Turns on ``record_mpd`` in each LIF layer and clears the records at the
    start of every forward pass of ``model``; calling the object returns
    ``eta * L_MPD`` of the last forward pass, differentiable::

        reg = mt.MPDSGR(model, eta=0.1)
        loss = criterion(model(x), y) + reg()

    ``reg()`` refuses (RuntimeError, saying why) after a forward that recorded no autograd graph
    (one run under ``torch.no_grad()``, where the regularizer would silently be a constant), unless
    it is itself called without gradients; NaN or infinite statistics raise FloatingPointError
    naming the layer.

    Args:
        model: a module containing mt.LIF layers.
        eta: weight of the regularizer (>= 0; 0 gives the plain baseline but
            still records Omega for monitoring).
        granularity: how Omega is measured, as ``MPDOptions`` takes it (the paper's: per time
            step and channel).
        gamma: as ``MPDOptions`` (None: each layer's surrogate window).
        eps: as ``MPDOptions``.
        window: as ``MPDOptions``.
        k: as ``MPDOptions``.
        options: an ``MPDOptions`` instead of the five keywords (from a saved configuration).
    """

    def __init__(self, model: nn.Module, eta: float, *, granularity: str = "time_channel", gamma: float | None = None,
                 eps: float = DEFAULT_EPS, window: str = "surrogate", k: float = 1.0,
                 options: MPDOptions | None = None):
        from .layers import LIF

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        eta = check_real("eta", eta, nonnegative=True)
        keywords = MPDOptions(granularity=granularity, gamma=gamma, eps=eps, window=window, k=k)
        if options is None:
            options = keywords
        elif not isinstance(options, MPDOptions):
            raise TypeError(f"options must be an mt.MPDOptions, got {type(options).__name__}")
        elif keywords != MPDOptions():
            raise ValueError("give MPD-SGR's options either as options=MPDOptions(...) or as keywords, not both")
        self.options = options
        named = [(name, m) for name, m in model.named_modules() if isinstance(m, LIF)]
        self.layers = [m for _, m in named]
        self.layer_names = [name or type(model).__name__ for name, _ in named]  # for error messages
        if not self.layers:
            raise ValueError("model has no mt.LIF layers: MPD-SGR regularizes the membrane potential of LIF layers")
        self.eta = eta
        for layer in self.layers:
            layer.record_mpd = True
            layer.keep_all_records = True
        self._hook = model.register_forward_pre_hook(self._clear)

    # The options, read where they were read before MPDOptions held them.
    granularity = property(lambda self: self.options.granularity)
    gamma = property(lambda self: self.options.gamma)
    eps = property(lambda self: self.options.eps)
    window = property(lambda self: self.options.window)
    k = property(lambda self: self.options.k)

    def _clear(self, module, args):
        for layer in self.layers:
            layer.clear_mpd_records()

    def remove(self) -> None:
        """Detach from the model (stop clearing records on forward)."""
        self._hook.remove()
        for layer in self.layers:
            layer.keep_all_records = False

    def detach_records(self) -> None:
        """Keep the last forward's statistics (for ``mean_overlap``) but drop their autograd graph.

        Needed in a training step compiled as one graph with its backward
        inside (``torch._dynamo.config.trace_autograd_ops``): call it after the
        backward, else the records hand tensors whose graph the backward
        consumed out of the compiled function, which ``torch.compile`` refuses.
        """
        for layer in self.layers:
            layer.mpd_records = [(mean.detach(), var.detach()) for mean, var in layer.mpd_records]

    def layer_overlaps(self) -> list[torch.Tensor]:
        """Omega of each layer at the chosen granularity (all calls of the last forward, flattened)."""
        out = []
        for layer in self.layers:
            if not layer.mpd_records:
                raise RuntimeError(
                    f"no membrane statistics recorded for {layer!r}: run a forward pass of the model first "
                    "(every LIF layer must be used in the forward)"
                )
            gamma = self.options.layer_gamma(layer)
            out.append(torch.cat([self.options.overlap(mean, var, gamma).reshape(-1)
                                  for mean, var in layer.mpd_records]))
        return out

    def loss(self) -> torch.Tensor:
        """L_MPD: mean over layers of the mean Omega (unweighted by eta).

        Raises FloatingPointError naming the layer when a layer's statistics are NaN or infinite
        (one device sync per call; skipped while torch.compile traces)."""
        per_layer = torch.stack([omega.mean() for omega in self.layer_overlaps()])
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(per_layer).all()):
            raise FloatingPointError(self._not_finite(per_layer))
        return per_layer.mean()

    def _not_finite(self, per_layer: torch.Tensor) -> str:
        """Which layers' statistics are not finite, and how many cells, for the error message."""
        parts = []
        for i in torch.nonzero(~torch.isfinite(per_layer)).flatten().tolist():
            records = self.layers[i].mpd_records
            bad_mean = sum(int((~torch.isfinite(mean)).sum()) for mean, _ in records)
            bad_var = sum(int((~torch.isfinite(var)).sum()) for _, var in records)
            cells = sum(mean.numel() for mean, _ in records)
            parts.append(f"LIF layer {i} ('{self.layer_names[i]}'): mean not finite in {bad_mean} and variance "
                         f"in {bad_var} of {cells} (time step, channel) cells")
        return ("MPD-SGR: the membrane statistics of the last forward are NaN or infinite in "
                + "; ".join(parts) + ". The layer's input held NaN or inf: a diverging training (a learning rate "
                "too large, bf16 overflow) or bad input data; Omega and the loss would be NaN")

    def __call__(self) -> torch.Tensor:
        if self.eta == 0.0:
            device = self.layers[0].mpd_records[0][0].device if self.layers[0].mpd_records else None
            return torch.zeros((), device=device)
        records = [r for layer in self.layers for r in layer.mpd_records]  # none: loss() says run a forward
        if records and torch.is_grad_enabled() and not torch.compiler.is_compiling() and not any(
                mean.requires_grad or var.requires_grad for mean, var in records):
            raise RuntimeError(
                "MPD-SGR: the last forward recorded its membrane statistics without an autograd graph (it ran under "
                "torch.no_grad() or torch.inference_mode(), or nothing before the LIF layers requires a gradient), "
                "so reg() would be a constant and regularize nothing. Run the training forward with gradients "
                "enabled; to read Omega of an evaluation forward use reg.mean_overlap(), or call reg() inside "
                "torch.no_grad()"
            )
        return self.eta * self.loss()

    @torch.no_grad()
    def mean_overlap(self) -> float:
        """Mean Omega of the last forward (a float for logging)."""
        return float(self.loss())

    def __repr__(self) -> str:
        window = f"window='relative', k={self.k:g}" if self.window == "relative" else f"gamma={self.gamma}"
        return (f"MPDSGR(eta={self.eta:g}, granularity={self.granularity!r}, {window}, "
                f"eps={self.eps:g}, layers={len(self.layers)})")

