"""mpd-triton: fused Triton LIF kernels with MPD-SGR for adversarially robust SNNs.

    import mpd_triton as mt
    spikes = mt.lif(x, tau=2.0, v_th=1.0, surrogate=mt.Triangle(1.0))
    spikes, mean, var = mt.lif(x, return_stats=True)
    omega = mt.mpd_overlap(mean, var, gamma=1.0)
    layer = mt.LIF(tau=2.0, record_mpd=True)
    reg = mt.MPDSGR(model, eta=0.1)   # reg() -> eta * L_MPD of the last forward
    model = mt.from_spikingjelly(sj_model)   # SpikingJelly LIFNode / IFNode -> mt.LIF
    net = mt.models.build("vgg11", ...)      # the papers' spiking models; mt.models.load(model.pt)
    result = mt.attacks.evaluate(net, images, labels, eps=[8 / 255], suite="reliable")
"""

from .convert import SPIKINGJELLY_SURROGATES, from_spikingjelly
from .functional import (
    BACKENDS,
    KERNEL_DTYPES,
    cpu_kernels_unavailable,
    lif,
    triton_interpreted,
)
from .layers import BACKWARD_MODES, LIF, rate_backward
from .mpd import (
    DEFAULT_EPS,
    GRANULARITIES,
    MPD_WINDOWS,
    MPDSGR,
    MPDOptions,
    combine_stats,
    mpd_overlap,
    window_overlap,
)
from .neuron import LIFConfig
from .reference import lif_reference, membrane_stats
from .surrogates import (
    SURROGATE_KINDS,
    SURROGATE_NAMES,
    WINDOW_PEAK_FRACTION,
    ATan,
    Rectangular,
    Sigmoid,
    SuperSpike,
    Surrogate,
    Triangle,
    as_surrogate,
    spike_function,
)

__version__ = "0.1.0"

__all__ = [
    "lif", "LIF", "MPDSGR", "MPDOptions", "mpd_overlap", "window_overlap", "combine_stats", "LIFConfig", "lif_reference", "membrane_stats",
    "spike_function", "Surrogate", "Triangle", "Rectangular", "Sigmoid", "ATan", "SuperSpike", "as_surrogate",
    "SURROGATE_NAMES", "SURROGATE_KINDS", "WINDOW_PEAK_FRACTION", "BACKENDS", "KERNEL_DTYPES", "DEFAULT_EPS", "GRANULARITIES",
    "MPD_WINDOWS", "triton_interpreted", "cpu_kernels_unavailable", "BACKWARD_MODES", "rate_backward", "from_spikingjelly",
    "SPIKINGJELLY_SURROGATES",
]


def __getattr__(name: str):
    """``mt.models`` and ``mt.attacks``: imported on first use (``import mpd_triton`` stays light)."""
    if name in ("models", "attacks"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
