"""Spiking WideResNet-16 (widen factor 4): 3 groups of 2 residual blocks, widths 64/128/256.

Block: LIF(BN(conv(LIF(BN(conv(x))))) + shortcut(x)), shortcut = BN(conv1x1) when
the shape changes. The stem is conv-BN-LIF; the head is global average pooling
and a linear layer (the output layer has no neurons).
"""

from __future__ import annotations

from torch import nn

from .common import NeuronOptions, SpikingModel, TimeDistributed

__all__ = ["SpikingWRN"]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, neuron: NeuronOptions):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.lif1 = neuron.make()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.lif2 = neuron.make()

    def forward(self, x):  # x: [T, B, C, H, W]
        T = x.shape[0]
        flat = x.flatten(0, 1)
        y = self.lif1(self.bn1(self.conv1(flat)).unflatten(0, (T, -1)))
        y = self.bn2(self.conv2(y.flatten(0, 1))) + self.shortcut(flat)
        return self.lif2(y.unflatten(0, (T, -1)))


class SpikingWRN(SpikingModel):
    def __init__(self, depth: int = 16, widen: int = 4, *, in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32, T: int = 8, encoding: str = "direct",
                 neuron: NeuronOptions | dict | None = None, mean=None, std=None):
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 (10, 16, 22, ...), got {depth}")
        super().__init__(f"wrn{depth}", in_channels, num_classes, image_size, T, encoding, neuron, mean, std)
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]))
        self.stem_lif = self.neuron.make()
        blocks, cin = [], widths[0]
        for group, stride in zip(range(3), (1, 2, 2)):
            for i in range(n):
                blocks.append(_Block(cin, widths[group + 1], stride if i == 0 else 1, self.neuron))
                cin = widths[group + 1]
        self.blocks = nn.Sequential(*blocks)
        self.head = TimeDistributed(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)))

    def body(self, y):
        return self.head(self.blocks(self.stem_lif(y)))

