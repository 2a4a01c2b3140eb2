"""A small spiking CNN sized for a 2-core CPU (the default model).

conv(16)-BN-LIF, avgpool, conv(32)-BN-LIF, avgpool, Linear(128)-LIF, Linear(classes).
``classifier_bn``: Linear(128)-BN-LIF, so that BatchNorm precedes every LIF (models/vgg.py).
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

__all__ = ["SmallSNN"]


class SmallSNN(SpikingModel):
    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, T: int = 4,
                 encoding: str = "direct", neuron: NeuronOptions | dict | None = None, mean=None, std=None,
                 width: int = 16, hidden: int = 128, classifier_bn: bool = False):
        super().__init__("small", in_channels, num_classes, image_size, T, encoding, neuron, mean, std)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.stem_lif = self.neuron.make()
        self.features = nn.Sequential(
            TimeDistributed(nn.AvgPool2d(2)),
            ConvBNLIF(width, 2 * width, self.neuron),
            TimeDistributed(nn.AvgPool2d(2)),
        )
        side = pooled_size(image_size, 2)
        self.classifier = nn.Sequential(
            *classifier_layer(2 * width * side * side, hidden, self.neuron, classifier_bn),
            TimeDistributed(nn.Linear(hidden, num_classes)),
        )

    def body(self, y):
        return self.classifier(self.features(self.stem_lif(y)).flatten(2))
