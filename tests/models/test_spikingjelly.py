"""mt.from_spikingjelly: SpikingJelly 2.0 models converted to mt.LIF.

On the CPU in float32 the converted model's spikes are SpikingJelly's bit for
bit (every neuron layer, compared through forward hooks), its logits are
SpikingJelly's, and its gradients (input and parameters) agree to float32
rounding; what cannot be converted is refused with the layer's name and the
reason, and nothing is changed. SpikingJelly's model builders (spiking VGG,
ResNet, SEW-ResNet) are converted as shipped in its wheel.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import assert_close
from torch import nn

import mpd_triton as mt
from mpd_triton.convert import (
    SPIKINGJELLY_SURROGATES,
    surrogate_from_spikingjelly,
    surrogate_to_spikingjelly,
)

try:
    import spikingjelly.activation_based as sj
    from spikingjelly.activation_based import functional, layer, neuron, surrogate
except ImportError as error:  # the Makefile installs it; a bare environment skips with the reason
    pytest.skip(f"spikingjelly is not importable ({error})", allow_module_level=True)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ comparison helpers

def record_spikes(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every neuron layer's outputs (SpikingJelly's or ours), by module name, filled on each forward."""
    records: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (mt.LIF, neuron.BaseNode)):
            records[name] = []
            module.register_forward_hook(lambda m, args, out, name=name: records[name].append(out.detach()))
    return records


def compare_with_spikingjelly(sj_model: nn.Module, x: torch.Tensor, *, grad_rtol: float = 1e-4,
                              check_params: bool = True, backend: str = "auto") -> nn.Module:
    """Convert a copy of ``sj_model``, run both on ``x`` (same RNG for dropout), and check that
    every neuron layer's spikes are equal, the outputs equal and the gradients close."""
    converted = mt.from_spikingjelly(sj_model, backend=backend)
    assert all(m.backend == backend for m in converted.modules() if isinstance(m, mt.LIF))
    assert not any(isinstance(m, neuron.BaseNode) for m in converted.modules())
    sj_spikes, mt_spikes = record_spikes(sj_model), record_spikes(converted)
    assert sj_spikes.keys() == mt_spikes.keys() and sj_spikes
    outputs, grads = [], []
    cotangent = None
    for model in (sj_model, converted):
        functional.reset_net(model)  # SpikingJelly starts from rest; ours always does
        model.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        torch.manual_seed(1234)
        out = model(xi)
        if cotangent is None:
            cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        out.backward(cotangent)
        outputs.append(out.detach())
        grads.append([("input", xi.grad)] + [(n, p.grad) for n, p in model.named_parameters()
                                             if check_params and p.grad is not None])
    fired = 0
    for name in sj_spikes:
        (a,), (b,) = sj_spikes[name], mt_spikes[name]
        differ = int((a != b).sum())
        assert differ == 0, f"{name}: {differ} of {a.numel()} spikes differ from SpikingJelly's"
        fired += int(a.sum())
    assert fired > 0, "no neuron fired: the comparison would be vacuous"
    assert_close("logits", outputs[1], outputs[0], atol=1e-6, rtol=1e-6)
    assert [n for n, _ in grads[0]] == [n for n, _ in grads[1]]
    assert float(grads[0][0][1].abs().max()) > 0, "the input gradient is zero: nothing to compare"
    # A gradient that is zero in exact arithmetic (a conv bias before BatchNorm, which removes
    # the mean) is rounding noise, 1e-8 to 1e-7 where others are ~1: it is compared on the scale
    # of the model's largest gradient, not its own, since the two implementations round in a
    # different order (the fused kernels' backward is hand-derived).
    largest = max(float(g.abs().max()) for _, g in grads[0])
    for (name, g_sj), (_, g_mt) in zip(grads[0], grads[1]):
        scale = max(float(g_sj.abs().max()), 1e-3 * largest)
        assert_close(f"gradient of {name}", g_mt, g_sj, atol=grad_rtol * scale + 1e-12, rtol=grad_rtol)
    return converted


def time_major_images(T: int, B: int, C: int, H: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, B, C, H, H, generator=g).expand(T, -1, -1, -1, -1).contiguous()


# ------------------------------------------------------------------ the surrogates

@pytest.mark.parametrize("make_sj, ours", [
    (lambda: surrogate.PiecewiseQuadratic(alpha=1.0), mt.Triangle(1.0)),
    (lambda: surrogate.PiecewiseQuadratic(alpha=2.5), mt.Triangle(0.4)),
    (lambda: surrogate.Sigmoid(), mt.Sigmoid(4.0)),
    (lambda: surrogate.Sigmoid(alpha=1.7), mt.Sigmoid(1.7)),
    (lambda: surrogate.ATan(), mt.ATan(2.0)),
    (lambda: surrogate.ATan(alpha=3.0), mt.ATan(3.0)),
    (lambda: surrogate.Rect(alpha=1.0), mt.Rectangular(0.5)),
    (lambda: surrogate.Rect(alpha=0.8), mt.Rectangular(0.625)),
    (lambda: surrogate.SuperSpike(alpha=1.0), mt.SuperSpike(1.0)),
])
def test_each_surrogate_maps_to_ours_with_the_same_gradient(make_sj, ours):
    """The mapped surrogate is the expected class and parameter, and its g(u) equals SpikingJelly's
    backward on a grid through both windows' edges (float64, so only the formulas are compared)."""
    sj_sg = make_sj()
    mapped = surrogate_from_spikingjelly(sj_sg)
    assert type(mapped) is type(ours) and mapped.param == pytest.approx(ours.param, rel=1e-15)
    u = torch.cat([torch.linspace(-3.0, 3.0, 6001, dtype=torch.float64),
                   torch.tensor([ours.window, -ours.window, 1.0 / 2.5, 0.5 / 0.8], dtype=torch.float64)])
    u.requires_grad_(True)
    (g_sj,) = torch.autograd.grad(sj_sg(u).sum(), u)
    assert_close(f"g(u) of {type(sj_sg).__name__}", mapped.grad(u.detach()), g_sj, atol=1e-12, rtol=1e-12)
    # and back: the benchmark's SpikingJelly peer builds SpikingJelly's surrogate from ours
    back = surrogate_to_spikingjelly(mapped, surrogate)
    assert type(back) is type(sj_sg) and back.alpha == pytest.approx(sj_sg.alpha, rel=1e-15)


def test_every_mapped_surrogate_is_tested_above():
    assert set(SPIKINGJELLY_SURROGATES) == {"PiecewiseQuadratic", "Sigmoid", "ATan", "Rect", "SuperSpike"}
    assert all(hasattr(surrogate, name) for name in SPIKINGJELLY_SURROGATES)


def test_superspike_families_meet_only_at_alpha_one():
    """SpikingJelly's SuperSpike is alpha / (1 + |u|)^2, ours 1 / (1 + alpha |u|)^2."""
    with pytest.raises(ValueError, match=r"SuperSpike\(alpha=2\).*agree only at alpha = 1"):
        surrogate_from_spikingjelly(surrogate.SuperSpike(alpha=2.0))
    with pytest.raises(ValueError, match="no spikingjelly surrogate"):
        surrogate_to_spikingjelly(mt.SuperSpike(10.0), surrogate)


# ------------------------------------------------------------------ one layer, every option

NEURON_CASES = [
    dict(tau=2.0, decay_input=True, v_reset=0.0, detach_reset=False, surrogate_function=surrogate.Sigmoid()),
    dict(tau=2.0, decay_input=False, v_reset=None, detach_reset=True, surrogate_function=surrogate.ATan()),
    dict(tau=4.0, decay_input=True, v_reset=None, detach_reset=False,
         surrogate_function=surrogate.PiecewiseQuadratic(alpha=2.0)),
    dict(tau=4.0, decay_input=False, v_reset=-0.3, detach_reset=True, surrogate_function=surrogate.Rect(alpha=1.0)),
    dict(tau=8.0, decay_input=True, v_reset=0.2, detach_reset=False, v_threshold=0.6,
         surrogate_function=surrogate.SuperSpike(alpha=1.0)),
]


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("case", range(len(NEURON_CASES)))
def test_lif_node_converts_bit_for_bit(case, backend):
    """tau a power of two: 1/tau is exact, so our x * (1/tau) is SpikingJelly's x / tau to the bit.
    backend="triton" runs the fused kernel (under the interpreter on the CPU)."""
    node = neuron.LIFNode(step_mode="m", **NEURON_CASES[case])
    x = torch.randn(6, 3, 4, 5, 5, generator=torch.Generator().manual_seed(case)) * 1.5 + 0.7
    converted = compare_with_spikingjelly(nn.Sequential(node), x, backend=backend)
    assert isinstance(converted[0], mt.LIF)


@pytest.mark.parametrize("v_reset", [0.0, None])
def test_if_node_is_our_lif_without_leak(v_reset):
    node = neuron.IFNode(v_reset=v_reset, surrogate_function=surrogate.ATan(), step_mode="m")
    converted = mt.from_spikingjelly(node)
    assert isinstance(converted, mt.LIF) and converted.tau == math.inf and not converted.config.decay_input
    x = torch.randn(8, 2, 3, 6, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.2
    compare_with_spikingjelly(nn.Sequential(node), x)


def test_parameters_carry_over():
    node = neuron.LIFNode(tau=3.0, decay_input=False, v_threshold=0.7, v_reset=None, detach_reset=True,
                          surrogate_function=surrogate.PiecewiseQuadratic(alpha=4.0), step_mode="m")
    lif = mt.from_spikingjelly(node, record_mpd=True)
    c = lif.config
    assert (c.tau, c.decay_input, c.v_th, c.v_reset, c.detach_reset) == (3.0, False, 0.7, None, True)
    assert c.surrogate == mt.Triangle(0.25) and lif.record_mpd and lif.backend == "auto"
    assert not mt.from_spikingjelly(node.eval()).training


def test_tau_not_a_power_of_two_differs_only_in_the_last_bit_of_h():
    """SpikingJelly divides by tau, we multiply by 1/tau: for tau = 3 the charge can differ in its
    last bit, so a neuron whose h lands exactly between the two values fires in one and not the other.
    Elsewhere the spikes agree (checked on random input), and h is within a few ulps."""
    tau = 3.0
    x = torch.linspace(0.5, 4.0, 4001)
    sj_h, our_h = x / tau, x * (1.0 / tau)  # the first step's charge from rest, v_reset = 0
    differ = (sj_h != our_h).nonzero().flatten()
    assert differ.numel() > 0
    i = int(differ[0])
    threshold = float(torch.maximum(sj_h[i], our_h[i]))  # exactly the larger of the two charges
    node = neuron.LIFNode(tau=tau, v_threshold=threshold, surrogate_function=surrogate.ATan(), step_mode="m")
    xi = x[i].reshape(1, 1, 1)
    assert float(node(xi)) != float(mt.from_spikingjelly(node)(xi))
    # random input: equal spikes, and the pre-spike potentials agree to a few ulps
    xr = torch.randn(8, 4, 3, 7, generator=torch.Generator().manual_seed(1)) * 1.5 + 0.7
    compare_with_spikingjelly(nn.Sequential(neuron.LIFNode(tau=tau, step_mode="m")), xr)
    ours = mt.lif_reference(xr, mt.LIFConfig(tau=tau, surrogate="sigmoid"))
    sj_spikes, _, sj_v = functional.lif_multi_step(xr, torch.zeros(xr.shape[1:]), tau, True, 1.0, 0.0, None,
                                                   False, True)
    v_prev = torch.cat([torch.zeros(1, *xr.shape[1:]), sj_v[:-1]])
    sj_u = v_prev + (xr - v_prev) / tau - 1.0
    assert torch.equal(sj_spikes, ours.spikes)
    assert_close("u = h - v_th", ours.u, sj_u, atol=4 * torch.finfo(torch.float32).eps, rtol=0)


# ------------------------------------------------------------------ hand-built models

def hand_built_cnn(neuron_kwargs: dict) -> nn.Module:
    """A small multi-step SpikingJelly CNN: conv-BN-LIF, pool, conv-BN-IF, flatten, linear-LIF, linear,
    plus a SeqToANNContainer and a SEW-style residual add."""

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = layer.SeqToANNContainer(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
            self.sn = neuron.LIFNode(**neuron_kwargs)

        def forward(self, x):
            return x + self.sn(self.conv(x))

    torch.manual_seed(0)
    model = nn.Sequential(
        layer.Conv2d(3, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8), neuron.LIFNode(**neuron_kwargs),
        Residual(), layer.MaxPool2d(2),
        layer.Conv2d(8, 8, 3, padding=1), layer.BatchNorm2d(8),
        neuron.IFNode(surrogate_function=surrogate.ATan(), detach_reset=True, v_reset=None),
        layer.Flatten(start_dim=1), layer.Linear(8 * 4 * 4, 32), neuron.LIFNode(**neuron_kwargs),
        layer.Dropout(0.2), layer.Linear(32, 10),
    )
    functional.set_step_mode(model, "m")
    return model


@pytest.mark.parametrize("neuron_kwargs", [
    dict(tau=2.0, surrogate_function=surrogate.PiecewiseQuadratic()),
    dict(tau=2.0, v_reset=None, detach_reset=True, surrogate_function=surrogate.Sigmoid(alpha=2.0)),
    dict(tau=4.0, decay_input=False, v_threshold=0.5, surrogate_function=surrogate.ATan()),
])
def test_hand_built_model_converts(neuron_kwargs):
    model = hand_built_cnn(neuron_kwargs)
    compare_with_spikingjelly(model, time_major_images(T=4, B=3, C=3, H=8) * 2)


def test_mpdsgr_on_a_converted_model_reads_spikingjelly_potentials():
    """mt.MPDSGR works on the converted model as on ours, and the statistics it regularizes are those
    of SpikingJelly's own pre-spike potential h - v_th (rebuilt from its stored v_seq)."""
    from bench.peers import pre_spike_potential

    torch.manual_seed(0)
    sj_model = nn.Sequential(layer.Linear(12, 16), neuron.LIFNode(surrogate_function=surrogate.ATan()))
    functional.set_step_mode(sj_model, "m")
    converted = mt.from_spikingjelly(sj_model)
    reg = mt.MPDSGR(converted, eta=0.5)
    x = torch.randn(4, 5, 12, generator=torch.Generator().manual_seed(2))
    loss = converted(x).sum() + reg()
    loss.backward()
    assert converted[0].weight.grad is not None and torch.isfinite(loss)

    lif = converted[1]
    node = sj_model[1]
    node.store_v_seq = True
    with torch.no_grad():
        current = sj_model[0](x)
        node(current)
    h = pre_spike_potential(current, torch.zeros(current.shape[1:]), node.v_seq, lif.config)
    mean, var = mt.membrane_stats(h - lif.config.v_th)
    omega = mt.mpd_overlap(mean, var, lif.surrogate.window).mean()
    assert reg.mean_overlap() == pytest.approx(float(omega), rel=1e-5)


def test_shared_neuron_stays_shared_and_inplace_conversion():
    node = neuron.LIFNode(step_mode="m")
    model = nn.Sequential(node, layer.Linear(6, 6, step_mode="m"), node)
    copy_ = mt.from_spikingjelly(model)
    assert isinstance(copy_[0], mt.LIF) and copy_[0] is copy_[2]
    assert model[0] is node  # the original is untouched
    same = mt.from_spikingjelly(model, inplace=True)
    assert same is model and isinstance(model[0], mt.LIF) and model[0] is model[2]


def test_converts_a_model_whose_neurons_hold_state_with_a_graph():
    """A SpikingJelly model used without reset_net holds v in an autograd graph, which deepcopy
    refuses; the conversion never copies the neurons, so it works."""
    model = nn.Sequential(layer.Linear(4, 4), neuron.LIFNode())
    functional.set_step_mode(model, "m")
    model(torch.randn(3, 2, 4))
    assert isinstance(model[1].v, torch.Tensor) and model[1].v.grad_fn is not None
    assert isinstance(mt.from_spikingjelly(model)[1], mt.LIF)


# ------------------------------------------------------------------ SpikingJelly's own model builders

def spikingjelly_model_module(name: str):
    """Import spikingjelly.activation_based.model.<name> as shipped in the wheel.

    Importing the package ``spikingjelly.activation_based.model`` runs its
    __init__, which imports its transformer models and through them
    ``distributed.vision``, which needs h5py (not a dependency here). The CNN
    builders themselves need neither, so when the package import fails the
    two package __init__ files are skipped: each package is given a module
    object with its real path, and the builder file is imported unchanged.
    """
    full = f"spikingjelly.activation_based.model.{name}"
    try:
        return importlib.import_module(full)
    except ImportError:
        pass
    root = Path(sj.__file__).parent
    for package in ("spikingjelly.activation_based.model", "spikingjelly.activation_based.distributed.vision"):
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = [str(root.joinpath(*package.split(".")[2:]))]
            sys.modules[package] = stub
    try:
        return importlib.import_module(full)
    except ImportError as error:
        pytest.skip(f"SpikingJelly's {name} is not importable here ({type(error).__name__}: {error})")


BUILDERS = {
    # (module, builder, neuron and its kwargs, input [T, B, 3, H, H])
    # VGG's classifier (weights N(0, 0.01)) fires only with a low threshold; every layer fires then
    "spiking_vgg11_bn": ("spiking_vgg", "spiking_vgg11_bn",
                         dict(spiking_neuron=neuron.LIFNode, v_threshold=0.1, surrogate_function=surrogate.ATan(),
                              detach_reset=True),
                         (2, 2, 32)),
    "spiking_resnet18": ("spiking_resnet", "spiking_resnet18",
                         dict(spiking_neuron=neuron.LIFNode, tau=2.0, v_threshold=0.5, v_reset=None,
                              surrogate_function=surrogate.Sigmoid()),
                         (2, 2, 64)),
    "sew_resnet18": ("sew_resnet", "sew_resnet18",
                     dict(spiking_neuron=neuron.IFNode, cnf="ADD", surrogate_function=surrogate.ATan(),
                          detach_reset=True),
                     (2, 2, 64)),
}


@pytest.mark.parametrize("name", BUILDERS)
def test_spikingjelly_builders_convert(name):
    module_name, builder, kwargs, (T, B, H) = BUILDERS[name]
    build = getattr(spikingjelly_model_module(module_name), builder)
    torch.manual_seed(0)
    model = build(num_classes=10, **kwargs)
    functional.set_step_mode(model, "m")
    x = time_major_images(T, B, 3, H)
    # VGG's 100M-parameter classifier: compare its gradients through the input, not parameter by parameter
    converted = compare_with_spikingjelly(model, x, check_params=name != "spiking_vgg11_bn")
    n_neurons = sum(isinstance(m, neuron.BaseNode) for m in model.modules())
    assert sum(isinstance(m, mt.LIF) for m in converted.modules()) == n_neurons > 0


# ------------------------------------------------------------------ refusals

class MyLIF(neuron.LIFNode):
    pass


def _learnable_tau():
    node = neuron.LIFNode(step_mode="m")
    node.tau = nn.Parameter(torch.tensor(2.0))
    return node


def _low_precision_state():
    """What SpikingJelly's precision conversion sets on a neuron for a bfloat16 state (its own call
    needs a CUDA device for the Triton plan it prepares): the (storage, forward, backward) dtypes."""
    node = neuron.LIFNode(step_mode="m")
    node._neuron_precision = (torch.bfloat16, torch.float32, torch.float32)
    return node


@pytest.mark.parametrize("make, reason", [
    (lambda: neuron.LIFNode(), r"step_mode='s'.*set_step_mode\(model, 'm'\)"),
    (_low_precision_state, "a low-precision neuron state .*mt.LIF keeps its state in float32"),
    (lambda: neuron.ParametricLIFNode(step_mode="m"), "learnable tau"),
    (_learnable_tau, r"tau is a tensor \(learnable\)"),
    (lambda: neuron.QIFNode(step_mode="m"), "neuron type QIFNode is not implemented"),
    (lambda: neuron.NonSpikingLIFNode(), "neuron type NonSpikingLIFNode is not implemented"),
    (lambda: MyLIF(step_mode="m"), "MyLIF is a subclass of LIFNode"),
    (lambda: neuron.LIFNode(step_mode="m", surrogate_function=surrogate.Erf()),
     "surrogate SpikingJelly's Erf has no mpd_triton equivalent; convertible: PiecewiseQuadratic, Sigmoid"),
    (lambda: neuron.LIFNode(step_mode="m", surrogate_function=surrogate.SuperSpike(alpha=3.0)),
     "agree only at alpha = 1"),
    (lambda: neuron.LIFNode(step_mode="m", surrogate_function=surrogate.Sigmoid(spiking=False)), "spiking=False"),
    (lambda: neuron.LIFNode(step_mode="m", surrogate_function=lambda u: (u >= 0).float()),
     "has no mpd_triton equivalent"),
    (lambda: neuron.LIFNode(step_mode="m", store_v_seq=True), "store_v_seq=True"),
])
def test_refusals_name_the_layer_and_the_reason(make, reason):
    model = nn.Sequential(layer.Linear(4, 4, step_mode="m"), make())
    with pytest.raises(ValueError, match=r"cannot convert this SpikingJelly model \(nothing was changed\):\n  1 \("):
        mt.from_spikingjelly(model)
    with pytest.raises(ValueError, match=reason):
        mt.from_spikingjelly(model, inplace=True)
    assert not isinstance(model[1], mt.LIF)


def test_nothing_is_half_converted_and_every_refusal_is_listed():
    good = neuron.LIFNode(step_mode="m")
    model = nn.Sequential(good, layer.Linear(4, 4, step_mode="m"),
                          nn.Sequential(neuron.LIFNode()), neuron.LIFNode(step_mode="m", store_v_seq=True))
    with pytest.raises(ValueError) as info:
        mt.from_spikingjelly(model, inplace=True)
    lines = str(info.value).splitlines()
    assert lines[1].startswith("  2.0 (LIFNode): step_mode='s'") and lines[2].startswith("  3 (LIFNode): store_v_seq")
    assert model[0] is good and not any(isinstance(m, mt.LIF) for m in model.modules())


def test_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        mt.from_spikingjelly(neuron.LIFNode)
    with pytest.raises(ValueError, match="no SpikingJelly neurons"):
        mt.from_spikingjelly(nn.Sequential(nn.Linear(2, 2), mt.LIF()))
    with pytest.raises(ValueError, match="backend"):
        mt.from_spikingjelly(neuron.LIFNode(step_mode="m"), backend="cuda")
    with pytest.raises(TypeError, match="inplace"):
        mt.from_spikingjelly(neuron.LIFNode(step_mode="m"), inplace=1)
