"""Spiking VGG11 / VGG16 / WRN16-4 and a small CPU-sized network, built on mpd_triton layers, and the
models that train.run saved, read back.

    import mpd_triton as mt
    model = mt.models.build("vgg11", in_channels=3, num_classes=10, image_size=32, T=8,
                            neuron=dict(tau=2.0, surrogate="triangle"), encoding="direct")
    trained = mt.models.load("runs/quick-.../mpd/model.pt")

In a checkout the same code is importable as ``models`` (``from models import build_model``).
"""

from __future__ import annotations

from .common import ENCODINGS, NeuronOptions, SpikingModel, poisson_encode
from .saved import FORMAT, ModelFileError, load, read
from .small import SmallSNN
from .vgg import SpikingVGG
from .wrn import SpikingWRN

__all__ = ["build", "build_model", "load", "read", "ModelFileError", "FORMAT", "MODEL_NAMES", "MODEL_WIDTHS", "NeuronOptions", "SpikingModel", "SmallSNN", "SpikingVGG", "SpikingWRN",
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


def build(name: str, **kwargs) -> SpikingModel:
    """Build a model by name (one of MODEL_NAMES); kwargs go to its constructor."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](**kwargs)


build_model = build  # the name the repository's tools and the README's examples use
