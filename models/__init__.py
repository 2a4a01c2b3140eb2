"""Spiking VGG11 / VGG16 / WRN16-4 and a small CPU-sized network, built on mpd_triton layers.

    from models import build_model
    model = build_model("vgg11", in_channels=3, num_classes=10, image_size=32, T=8,
                        neuron=dict(tau=2.0, surrogate="triangle"), encoding="direct")
"""

from __future__ import annotations

from .common import ENCODINGS, NeuronOptions, SpikingModel, poisson_encode
from .small import SmallSNN
from .vgg import SpikingVGG
from .wrn import SpikingWRN

__all__ = ["build_model", "MODEL_NAMES", "MODEL_WIDTHS", "NeuronOptions", "SpikingModel", "SmallSNN", "SpikingVGG", "SpikingWRN",
           "ENCODINGS", "poisson_encode"]

_BUILDERS = {
    "small": lambda **kw: SmallSNN(**kw),
    "vgg11": lambda **kw: SpikingVGG("vgg11", **kw),
    "vgg16": lambda **kw: SpikingVGG("vgg16", **kw),
    "wrn16": lambda **kw: SpikingWRN(16, 4, **kw),
}
MODEL_NAMES = tuple(_BUILDERS)
# The models that take ``width`` (their first conv's channels, here the default) and ``classifier_bn``.
MODEL_WIDTHS = {"small": 16, "vgg11": 64, "vgg16": 64}


def build_model(name: str, **kwargs) -> SpikingModel:
    """Build a model by name (one of MODEL_NAMES); kwargs go to its constructor."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](**kwargs)
