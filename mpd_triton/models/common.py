"""Building blocks shared by the spiking models.

Conventions (docs/training.md): a model takes images [B, C, H, W] in [0, 1]
(normalization is inside, so attacks work in pixel space), encodes them to
T time steps, runs convolutions and BatchNorm on the merged [T*B, ...] batch
and the LIF neurons on [T, B, ...], and returns the mean of the logits over T.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

import mpd_triton as mt

__all__ = ["NeuronOptions", "SpikingModel", "TimeDistributed", "ConvBNLIF", "ENCODINGS", "poisson_encode",
           "classifier_layer"]

ENCODINGS = ("direct", "poisson")


@dataclass
class NeuronOptions:
    """Options of every LIF layer of a model: the fields of ``mt.LIFConfig`` (tau ... surrogate: the same
    names, order and defaults, tests/library/test_api.py keeps them in step), with the surrogate by name, then
    those below. ``to_config()`` is the validated LIFConfig, ``make()`` a layer of it.

    Plain values only (a checkpoint's model_spec["neuron"] is ``to_dict()``, and ``NeuronOptions(**it)``
    rebuilds it), one command-line flag each (train/config.py).
    """

    tau: float = 2.0
    v_th: float = 1.0
    v_reset: float | None = 0.0
    decay_input: bool = True
    detach_reset: bool = False
    surrogate: str = "triangle"
    surrogate_param: float | None = None  # gamma (triangle, rectangular) or alpha (others); None: default
    window: float | None = None  # MPD-SGR window override for smooth surrogates
    backend: str = "auto"

    def make_surrogate(self) -> mt.Surrogate:
        cls = type(mt.as_surrogate(self.surrogate))
        args = () if self.surrogate_param is None else (self.surrogate_param,)
        if self.window is None:
            return cls(*args)
        if not self.window > 0:
            raise ValueError(f"window (the smooth surrogate's MPD-SGR window) must be > 0, got {self.window}")
        if cls in (mt.Triangle, mt.Rectangular):
            raise ValueError(f"window: the {cls.name} surrogate's MPD-SGR window is its support, set by its gamma "
                             "(--surrogate-param); window (--window) is for the smooth surrogates (sigmoid, atan, "
                             "superspike), and --gamma sets one window for every layer whatever the surrogate")
        return cls(*args, gamma=self.window)

    def to_config(self) -> mt.LIFConfig:
        """The neuron, validated: LIFConfig's fields as they are, the surrogate made by ``make_surrogate``."""
        neuron = {f.name: getattr(self, f.name) for f in fields(mt.LIFConfig)}
        return mt.LIFConfig(**{**neuron, "surrogate": self.make_surrogate()})

    @classmethod
    def from_config(cls, config: mt.LIFConfig, **options) -> "NeuronOptions":
        """The options of a validated LIFConfig (``to_config()`` gives it back), and ``options`` (backend=)."""
        sg = config.surrogate
        neuron = {f.name: getattr(config, f.name) for f in fields(mt.LIFConfig)}
        window = None if sg == type(sg)(sg.param) else sg.window  # None: the surrogate's own for its param
        return cls(**{**neuron, "surrogate": sg.name, "surrogate_param": sg.param, "window": window, **options})

    def make(self) -> mt.LIF:
        return mt.LIF.from_config(self.to_config(), backend=self.backend)

    def to_dict(self) -> dict:
        return asdict(self)


class _PoissonSpikes(torch.autograd.Function):
    """Bernoulli(x) spikes forward, identity backward (straight-through)."""

    @staticmethod
    def forward(ctx, x, T):
        return torch.bernoulli(x.unsqueeze(0).expand(T, *x.shape).clamp(0.0, 1.0))

    @staticmethod
    def backward(ctx, grad):
        return grad.sum(0), None


def poisson_encode(x: torch.Tensor, T: int) -> torch.Tensor:
    """Rate code: [B, ...] intensities in [0, 1] -> [T, B, ...] Bernoulli spikes (straight-through gradient).

    The gradient is the sum over T of the spike gradients, i.e. that of the
    expected input T * x.
    """
    return _PoissonSpikes.apply(x, T)


class TimeDistributed(nn.Module):
    """Apply a stateless module to [T, B, ...] by merging T into the batch."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        T = x.shape[0]
        y = self.module(x.flatten(0, 1))  # [T, B, ...] -> [T * B, ...]: one batch for the layer
        return y.unflatten(0, (T, -1))


class ConvBNLIF(nn.Module):
    """conv3x3 - BN on [T*B], then LIF on [T, B]."""

    def __init__(self, cin: int, cout: int, neuron: NeuronOptions, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.lif = neuron.make()

    def forward(self, x):
        T = x.shape[0]
        y = self.bn(self.conv(x.flatten(0, 1)))
        return self.lif(y.unflatten(0, (T, -1)))


def classifier_layer(fan_in: int, fan_out: int, neuron: NeuronOptions, bn: bool) -> list[nn.Module]:
    """A hidden layer of a spiking classifier on [T, B, F]: Linear (and BatchNorm1d, with ``bn``,
    so that BatchNorm precedes this LIF too), then LIF."""
    if bn:
        return [TimeDistributed(nn.Sequential(nn.Linear(fan_in, fan_out, bias=False), nn.BatchNorm1d(fan_out))),
                neuron.make()]
    return [TimeDistributed(nn.Linear(fan_in, fan_out)), neuron.make()]


@dataclass
class ModelConfig:
    name: str
    in_channels: int
    num_classes: int
    image_size: int
    T: int
    encoding: str
    neuron: dict = field(default_factory=dict)
    mean: tuple = ()
    std: tuple = ()


class SpikingModel(nn.Module):
    """Base class: input checks, normalization, spike encoding, mean of the logits over T.

    Subclasses build ``self.stem`` (applied to the first conv's input: [B, C, H, W]
    for direct encoding, computed once and repeated over T, or [T*B, ...] for
    Poisson) and implement ``body(y)`` on [T, B, ...] returning [T, B, classes].
    """

    def __init__(self, name: str, in_channels: int, num_classes: int, image_size: int, T: int,
                 encoding: str, neuron: NeuronOptions | dict | None, mean, std):
        super().__init__()
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"T must be an integer >= 1, got {T!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if isinstance(neuron, dict):
            neuron = NeuronOptions(**neuron)
        neuron = neuron or NeuronOptions()
        mean = tuple(float(m) for m in (mean if mean is not None else [0.5] * in_channels))
        std = tuple(float(s) for s in (std if std is not None else [0.5] * in_channels))
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean and std need {in_channels} values (one per input channel)")
        self.config = ModelConfig(name, in_channels, num_classes, image_size, T, encoding, neuron.to_dict(),
                                  mean, std)
        self.neuron = neuron
        self.T = T
        self.encoding = encoding
        self.register_buffer("norm_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def lif_layers(self) -> list[mt.LIF]:
        return [m for m in self.modules() if isinstance(m, mt.LIF)]

    def _check_input(self, x):
        c = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{c.name} takes images [B, {c.in_channels}, H, W] in [0, 1], got {shape}")
        if x.shape[1] != c.in_channels:
            raise ValueError(f"{c.name} was built for {c.in_channels} input channels, got {x.shape[1]}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """-> (first-layer input, static): static means [B, ...] to be repeated over T."""
        if self.encoding == "direct":
            return (x - self.norm_mean) / self.norm_std, True
        return poisson_encode(x, self.T).flatten(0, 1), False

    def run_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Encode and apply the stem's conv-BN: -> [T, B, ...] membrane input of the first LIF."""
        y, static = self.encode(x)
        y = self.stem(y)
        if static:  # the same current at every step: compute once, repeat over T
            return y.unsqueeze(0).expand(self.T, *y.shape)
        return y.unflatten(0, (self.T, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        logits = self.body(self.run_stem(x))
        return logits.mean(0)

    def body(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def pooled_size(size: int, pools: int) -> int:
    for _ in range(pools):
        size = size // 2
    if size < 1:
        raise ValueError("image too small for this model's pooling layers")
    return size

