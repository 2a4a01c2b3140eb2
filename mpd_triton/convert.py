"""SpikingJelly models on mpd_triton: replace their LIF and IF neurons by ``mt.LIF``.

    model = mt.from_spikingjelly(sj_model)   # a copy; every LIFNode / IFNode is now an mt.LIF
    reg = mt.MPDSGR(model, eta=0.1)

What converts: SpikingJelly 2.0's ``neuron.LIFNode`` and ``neuron.IFNode``
themselves (not subclasses), in multi-step mode (``step_mode='m'``), with a
surrogate of ``SPIKINGJELLY_SURROGATES``. Their dynamics are ours, term for
term (read from spikingjelly/_ops/lif and _ops/if_)::

    LIFNode, decay_input=True :  h = v + (x - (v - v_reset)) / tau
    LIFNode, decay_input=False:  h = v - (v - v_reset) / tau + x
    IFNode                    :  h = v + x          (ours: tau = inf, decay_input=False)
    spike = 1[h >= v_threshold];  hard reset v = s v_reset + (1 - s) h;  v_reset=None: v = h - s v_threshold,
    and the leak then decays toward 0;  detach_reset detaches s in the reset;
    initial v = v_reset (0 for a soft reset), as after ``functional.reset_net``.

So ``tau``, ``decay_input``, ``v_threshold`` (our ``v_th``), ``v_reset`` and
``detach_reset`` carry over unchanged. One difference in the arithmetic:
SpikingJelly divides by tau, we multiply by 1/tau. When 1/tau is exact in
binary (tau a power of two, such as the default 2.0, and IF neurons) the two
give the same float32 bits, so the spikes are SpikingJelly's bit for bit; for
other tau, h can differ in its last bit and a neuron whose h lands within
that bit of the threshold can fire in one and not in the other.

What does not convert is refused, with the layer's name and the reason, and
nothing is changed: single-step mode, a neuron type we do not implement (and
subclasses of LIFNode, whose dynamics may differ), a learnable or tensor tau
or threshold, a surrogate without an equivalent here, ``store_v_seq=True`` (the
converted layer keeps no potential sequence) and SpikingJelly's low-precision
neuron state.

``mt.LIF`` keeps no state between calls: every forward starts from rest, as a
SpikingJelly model does after ``functional.reset_net``, so no reset is needed
(calling ``reset_net`` on the converted model is harmless).
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .functional import BACKENDS
from .layers import LIF
from .neuron import LIFConfig, check_bool
from .surrogates import ATan, Rectangular, Sigmoid, SuperSpike, Surrogate, Triangle

__all__ = ["from_spikingjelly", "SPIKINGJELLY_SURROGATES", "SurrogateMapping", "surrogate_from_spikingjelly",
           "surrogate_to_spikingjelly", "CONVERTIBLE_NEURONS"]

_SJ_SURROGATE_MODULE = "spikingjelly.activation_based.surrogate"
_SJ_NEURON_PACKAGE = "spikingjelly.activation_based.neuron"
# The SpikingJelly neuron classes that convert (exactly these classes, not their subclasses).
CONVERTIBLE_NEURONS = ("LIFNode", "IFNode")


@dataclass(frozen=True)
class SurrogateMapping:
    """One SpikingJelly surrogate and ours with the same g(u).

    ``to_ours`` maps SpikingJelly's ``alpha`` to our class's parameter and
    ``to_spikingjelly`` back; ``only_alpha`` is set when the two families
    meet at a single alpha (both maps then refuse any other value).
    """

    ours: type[Surrogate]
    formula: str  # SpikingJelly's g(u) and the parameter we use
    to_ours: Callable[[float], float]
    to_spikingjelly: Callable[[float], float]
    only_alpha: float | None = None


def _same(value: float) -> float:
    return value


def _reciprocal(value: float) -> float:
    return 1.0 / value


def _half_reciprocal(value: float) -> float:
    return 0.5 / value


SPIKINGJELLY_SURROGATES: dict[str, SurrogateMapping] = {
    # max(0, alpha - alpha^2 |u|) = max(0, gamma - |u|) / gamma^2 with gamma = 1 / alpha
    "PiecewiseQuadratic": SurrogateMapping(Triangle, "max(0, alpha - alpha^2 |u|): Triangle(gamma = 1/alpha)",
                                           _reciprocal, _reciprocal),
    "Sigmoid": SurrogateMapping(Sigmoid, "alpha sig(alpha u)(1 - sig(alpha u)): Sigmoid(alpha)", _same, _same),
    "ATan": SurrogateMapping(ATan, "(alpha/2) / (1 + (pi/2 alpha u)^2): ATan(alpha)", _same, _same),
    # alpha 1[|u| < 0.5/alpha] = 1[|u| < gamma] / (2 gamma) with gamma = 0.5 / alpha
    "Rect": SurrogateMapping(Rectangular, "alpha 1[|u| < 0.5/alpha]: Rectangular(gamma = 0.5/alpha)",
                             _half_reciprocal, _half_reciprocal),
    # SpikingJelly's SuperSpike is alpha / (1 + |u|)^2 (alpha scales it), ours 1 / (1 + alpha |u|)^2
    # (alpha sharpens it): the same function only at alpha = 1.
    "SuperSpike": SurrogateMapping(SuperSpike, "alpha / (1 + |u|)^2: SuperSpike(1) when alpha = 1", _same, _same,
                                   only_alpha=1.0),
}


def _convertible_surrogates() -> str:
    return ", ".join(name + ("(alpha=1)" if m.only_alpha is not None else "")
                     for name, m in SPIKINGJELLY_SURROGATES.items())


def _real_parameter(name: str, value) -> float:
    """A plain real number; a tensor (learnable or not) is refused with its own reason."""
    if isinstance(value, torch.Tensor):
        learnable = " (learnable)" if value.requires_grad else ""
        raise ValueError(f"{name} is a tensor{learnable}; mt.LIF takes a fixed number")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def surrogate_from_spikingjelly(surrogate) -> Surrogate:
    """Our surrogate computing the same g(u) as a SpikingJelly surrogate object.

    Raises ValueError saying why when there is none (another class or a
    subclass, ``spiking=False``, a tensor alpha, SuperSpike with alpha != 1).
    """
    cls = type(surrogate)
    mapping = SPIKINGJELLY_SURROGATES.get(cls.__name__) if cls.__module__ == _SJ_SURROGATE_MODULE else None
    if mapping is None:
        what = (f"SpikingJelly's {cls.__name__}" if cls.__module__ == _SJ_SURROGATE_MODULE
                else f"{cls.__module__}.{cls.__qualname__}")
        raise ValueError(f"surrogate {what} has no mpd_triton equivalent; convertible: {_convertible_surrogates()}")
    if not getattr(surrogate, "spiking", True):
        raise ValueError(f"surrogate {cls.__name__} has spiking=False (its forward is the smooth primitive, "
                         "not a spike); mt.LIF always spikes")
    alpha = _real_parameter(f"surrogate {cls.__name__}'s alpha", surrogate.alpha)
    if mapping.only_alpha is not None and alpha != mapping.only_alpha:
        raise ValueError(f"surrogate {cls.__name__}(alpha={alpha:g}) is {mapping.formula.split(':')[0]}; "
                         f"ours is {mapping.ours.__name__}: they agree only at alpha = {mapping.only_alpha:g}")
    if not (0.0 < alpha < math.inf):
        raise ValueError(f"surrogate {cls.__name__} has alpha = {alpha}; need a finite alpha > 0")
    return mapping.ours(mapping.to_ours(alpha))


def surrogate_to_spikingjelly(surrogate: Surrogate, sj_surrogate_module):
    """The SpikingJelly surrogate (from the module ``spikingjelly.activation_based.surrogate``)
    with the same g(u) as ours; ValueError when SpikingJelly has none."""
    for name, mapping in SPIKINGJELLY_SURROGATES.items():
        if type(surrogate) is mapping.ours:
            alpha = mapping.to_spikingjelly(surrogate.param)
            if mapping.only_alpha is not None and alpha != mapping.only_alpha:
                continue
            return getattr(sj_surrogate_module, name)(alpha=alpha)
    raise ValueError(f"no spikingjelly surrogate computes the same g(u) as {surrogate!r}; SpikingJelly's "
                     f"equivalents are {_convertible_surrogates()}")


def _is_spikingjelly_neuron(module: nn.Module) -> bool:
    """A neuron of spikingjelly.activation_based.neuron, or any other SpikingJelly *Node class."""
    return any(c.__module__.startswith(_SJ_NEURON_PACKAGE)
               or (c.__module__.startswith("spikingjelly.") and c.__name__.endswith("Node"))
               for c in type(module).__mro__)


def _neuron_config(node: nn.Module, sj_neuron) -> LIFConfig:
    """The LIFConfig of a convertible SpikingJelly neuron; ValueError with the reason otherwise."""
    kind = type(node)
    if kind not in tuple(getattr(sj_neuron, name) for name in CONVERTIBLE_NEURONS):
        if isinstance(node, sj_neuron.ParametricLIFNode):
            raise ValueError("a learnable tau (ParametricLIFNode); mt.LIF has a fixed tau: use LIFNode")
        if isinstance(node, sj_neuron.LIFNode):
            raise ValueError(f"{kind.__name__} is a subclass of LIFNode whose dynamics may differ; only "
                             f"{' and '.join(CONVERTIBLE_NEURONS)} themselves convert")
        raise ValueError(f"neuron type {kind.__name__} is not implemented in mpd_triton; convertible: "
                         f"{', '.join(CONVERTIBLE_NEURONS)}")
    if node.step_mode != "m":
        raise ValueError(f"step_mode={node.step_mode!r}: mt.LIF is multi-step ([T, B, ...] in one call); call "
                         "spikingjelly.activation_based.functional.set_step_mode(model, 'm') first")
    if getattr(node, "store_v_seq", False):
        raise ValueError("store_v_seq=True: the converted layer keeps no potential sequence (v_seq); "
                         "set store_v_seq=False (mt.LIF(record_mpd=True) keeps the statistics MPD-SGR needs)")
    if getattr(node, "_neuron_precision", None) is not None:
        raise ValueError("a low-precision neuron state (SpikingJelly's neuron precision setting); "
                         "mt.LIF keeps its state in float32")
    v_reset = None if node.v_reset is None else _real_parameter("v_reset", node.v_reset)
    if kind is sj_neuron.LIFNode:
        tau = _real_parameter("tau", node.tau)
        decay_input = node.decay_input
    else:  # IFNode: h = v + x is our LIF with no leak and the input not decayed
        tau, decay_input = math.inf, False
    try:
        return LIFConfig(tau=tau, v_th=_real_parameter("v_threshold", node.v_threshold), v_reset=v_reset,
                         decay_input=decay_input, detach_reset=node.detach_reset,
                         surrogate=surrogate_from_spikingjelly(node.surrogate_function))
    except TypeError as error:  # LIFConfig's type checks (decay_input, detach_reset not bools)
        raise ValueError(str(error)) from None


def _load_spikingjelly_neuron():
    try:
        from spikingjelly.activation_based import neuron
    except ImportError as error:
        raise ImportError(f"from_spikingjelly needs SpikingJelly 2.0 (pip install spikingjelly): {error}") from None
    return neuron


def from_spikingjelly(model: nn.Module, *, backend: str = "auto", record_mpd: bool = False,
                      inplace: bool = False) -> nn.Module:
    """Replace every SpikingJelly ``LIFNode`` / ``IFNode`` of ``model`` by an ``mt.LIF`` with the same dynamics.

    Args:
        model: a SpikingJelly model in multi-step mode (``functional.set_step_mode(model, 'm')``),
            or the neuron itself.
        backend: the converted layers' backend ("auto": fused kernels on CUDA, reference on the CPU).
        record_mpd: turn on the layers' statistics now (``mt.MPDSGR`` also does it).
        inplace: change ``model`` itself; by default a converted copy is returned and ``model`` is
            left as it was (its neurons' SpikingJelly state is not copied).

    Returns the converted model (an ``mt.LIF`` when ``model`` was a neuron). Every neuron
    is checked first; if any cannot be converted, ValueError lists each such layer with
    the reason and nothing is changed. See the module docstring for the mapping.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_bool("record_mpd", record_mpd)
    check_bool("inplace", inplace)
    sj_neuron = _load_spikingjelly_neuron()

    # 1. Check every neuron (each shared instance once), collecting every refusal.
    neurons: dict[int, tuple[nn.Module, str]] = {}  # id -> (node, first name)
    for name, module in model.named_modules(remove_duplicate=False):
        if _is_spikingjelly_neuron(module) and id(module) not in neurons:
            neurons[id(module)] = (module, name)
    if not neurons:
        raise ValueError(f"{type(model).__name__} has no SpikingJelly neurons to convert "
                         f"(looked for {', '.join(CONVERTIBLE_NEURONS)})")
    replacements: dict[int, LIF] = {}
    refusals = []
    for key, (node, name) in neurons.items():
        label = f"{name or '(the model itself)'} ({type(node).__name__})"
        try:
            config = _neuron_config(node, sj_neuron)
        except ValueError as error:
            refusals.append(f"  {label}: {error}")
            continue
        layer = LIF.from_config(config, backend=backend, record_mpd=record_mpd)
        layer.train(node.training)
        replacements[key] = layer
    if refusals:
        raise ValueError("cannot convert this SpikingJelly model (nothing was changed):\n" + "\n".join(refusals))

    # 2. Replace. A copy is made with each neuron standing for its replacement (deepcopy's memo),
    # so the neurons' state tensors, possibly still in an autograd graph, are never copied.
    if id(model) in replacements:
        return replacements[id(model)]
    if not inplace:
        return copy.deepcopy(model, memo=dict(replacements))
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # every slot, a shared child's too
            if id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]
    return model
