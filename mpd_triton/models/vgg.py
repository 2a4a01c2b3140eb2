"""Spiking VGG11 / VGG16: conv-BN-LIF stacks with 2x2 average pooling and a spiking MLP classifier.

VGG11 follows the layout used by the SNN robustness papers (Rathi et al.'s
VGG11, used by SNN-RAT, FEEL, SR and MPD-SGR): 64-A-128-256-A-512-512-512-A-512-512
and a classifier Linear-LIF-Linear-LIF-Linear (4096 hidden units). VGG16 (for
Tiny-ImageNet) is the standard 13-conv layout with five pools.

``width`` is the first conv's channel count (64 in the papers); every conv layer and the
classifier's hidden layers scale with it (``width=16``: 16-A-32-64-A-128-..., 1024 hidden
units), which sizes the network for a CPU. ``classifier_bn`` puts a BatchNorm before each
of the classifier's LIF layers, so that BatchNorm precedes every LIF (as MPD-SGR's theory
assumes: the papers' tdBN); the papers' classifier has none.
"""

from __future__ import annotations

from torch import nn

from .common import (
    ConvBNLIF,
    NeuronOptions,
    SpikingModel,
    TimeDistributed,
    classifier_layer,
    pooled_size,
)

__all__ = ["SpikingVGG", "VGG_CFGS"]

VGG_CFGS = {
    "vgg11": [64, "A", 128, 256, "A", 512, 512, 512, "A", 512, 512],
    "vgg16": [64, 64, "A", 128, 128, "A", 256, 256, 256, "A", 512, 512, 512, "A", 512, 512, 512, "A"],
}


class SpikingVGG(SpikingModel):
    def __init__(self, depth: str = "vgg11", *, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 T: int = 8, encoding: str = "direct", neuron: NeuronOptions | dict | None = None,
                 mean=None, std=None, hidden: int | None = None, width: int = 64, classifier_bn: bool = False):
        if depth not in VGG_CFGS:
            raise ValueError(f"depth must be one of {tuple(VGG_CFGS)}, got {depth!r}")
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"width must be an integer >= 1 (the first conv's channels), got {width!r}")
        super().__init__(depth, in_channels, num_classes, image_size, T, encoding, neuron, mean, std)
        cfg = [item if item == "A" else max(1, item * width // 64) for item in VGG_CFGS[depth]]
        hidden = hidden if hidden is not None else max(1, 4096 * width // 64)
        first = cfg[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, first, 3, padding=1, bias=False), nn.BatchNorm2d(first))
        self.stem_lif = self.neuron.make()
        layers, cin = [], first
        for item in cfg[1:]:
            if item == "A":
                layers.append(TimeDistributed(nn.AvgPool2d(2)))
            else:
                layers.append(ConvBNLIF(cin, item, self.neuron))
                cin = item
        self.features = nn.Sequential(*layers)
        side = pooled_size(image_size, cfg.count("A"))
        self.classifier = nn.Sequential(
            *classifier_layer(cin * side * side, hidden, self.neuron, classifier_bn),
            *classifier_layer(hidden, hidden, self.neuron, classifier_bn),
            TimeDistributed(nn.Linear(hidden, num_classes)),
        )

    def body(self, y):
        y = self.features(self.stem_lif(y))
        return self.classifier(y.flatten(2))
