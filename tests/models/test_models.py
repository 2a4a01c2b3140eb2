"""Spiking models: shapes, encodings, backends (Triton under the interpreter vs the reference), errors."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close

import mpd_triton as mt
from models import MODEL_NAMES, NeuronOptions, build_model, poisson_encode

# Small enough for the interpreter: (model, kwargs)
TINY = {
    "small": dict(in_channels=1, image_size=12, num_classes=10, width=4, hidden=16),
    "vgg11": dict(in_channels=3, image_size=8, num_classes=10, hidden=32),
    "vgg16": dict(in_channels=3, image_size=32, num_classes=7, hidden=16),
    "wrn16": dict(in_channels=3, image_size=8, num_classes=10),
}


def _twins(name, encoding, T=2):
    """The same model (same weights) with the torch and the triton LIF backends."""
    kw = TINY[name]
    torch.manual_seed(0)
    ref = build_model(name, T=T, encoding=encoding, neuron=dict(backend="torch"), **kw).to(DEVICE)
    torch.manual_seed(0)
    tri = build_model(name, T=T, encoding=encoding, neuron=dict(backend="triton"), **kw).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


@pytest.mark.parametrize("name", [n if n == "small" else pytest.param(n, marks=pytest.mark.slow) for n in MODEL_NAMES])
def test_triton_and_reference_models_agree(name):
    """Forward and backward (input gradient and weight gradients) through the fused kernels."""
    if name in ("vgg16",) and DEVICE.type == "cpu":
        ref, tri = _twins(name, "direct", T=1)
    else:
        ref, tri = _twins(name, "direct")
    kw = TINY[name]
    x = torch.rand(2, kw["in_channels"], kw["image_size"], kw["image_size"], device=DEVICE)
    outs = []
    for model in (ref, tri):
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        assert y.shape == (2, kw["num_classes"])
        (y * torch.arange(1.0, kw["num_classes"] + 1, device=DEVICE)).sum().backward()
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    (y_r, gx_r, gw_r), (y_t, gx_t, gw_t) = outs
    assert_close("logits", y_t, y_r, atol=1e-4, rtol=1e-4)
    scale = float(gx_r.abs().max()) + 1e-6
    assert_close("input gradient", gx_t, gx_r, atol=1e-4 * scale, rtol=1e-3)
    for n in gw_r:
        s = float(gw_r[n].abs().max()) + 1e-6
        assert_close(f"grad {n}", gw_t[n], gw_r[n], atol=1e-4 * s, rtol=1e-3)


@pytest.mark.parametrize("encoding", ["direct", "poisson"])
def test_shapes_T_and_encodings(encoding):
    for T in (1, 3):
        model = build_model("small", T=T, encoding=encoding, **TINY["small"]).to(DEVICE)
        x = torch.rand(5, 1, 12, 12, device=DEVICE, requires_grad=True)
        y = model(x)
        assert y.shape == (5, 10)
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert len(model.lif_layers()) == 3


def test_direct_encoding_computes_the_stem_once_but_equals_the_repeated_input():
    """The stem conv-BN on [B] repeated over T == the stem on the image repeated T times."""
    model = build_model("small", T=3, encoding="direct", neuron=dict(backend="torch"), **TINY["small"]).to(DEVICE)
    model.eval()
    x = torch.rand(4, 1, 12, 12, device=DEVICE)
    fast = model.run_stem(x)
    normalized = (x - model.norm_mean) / model.norm_std
    slow = model.stem(normalized.unsqueeze(0).expand(3, *x.shape).flatten(0, 1)).unflatten(0, (3, -1))
    assert torch.allclose(fast, slow, atol=1e-6)


def test_poisson_encoding_rates_and_straight_through_gradient():
    torch.manual_seed(0)
    x = torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat(2000, 1).requires_grad_(True)
    s = poisson_encode(x, 5)
    assert s.shape == (5, 2000, 4) and set(s.unique().tolist()) <= {0.0, 1.0}
    rate = s.mean((0, 1))
    assert torch.allclose(rate, torch.tensor([0.0, 0.25, 0.5, 1.0]), atol=0.02)
    (s * 3.0).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 15.0))  # T * 3 per pixel


def test_poisson_draws_differ_between_calls():
    model = build_model("small", T=2, encoding="poisson", **TINY["small"]).to(DEVICE).eval()
    x = torch.rand(3, 1, 12, 12, device=DEVICE)
    assert not torch.equal(model(x), model(x)) or True  # logits may tie; the inputs must differ:
    a = poisson_encode(x, 2)
    b = poisson_encode(x, 2)
    assert not torch.equal(a, b)


def test_normalization_is_inside_the_model():
    model = build_model("small", T=1, mean=[0.3], std=[0.2], neuron=dict(backend="torch"), **{
        k: v for k, v in TINY["small"].items()}).to(DEVICE)
    assert model.config.mean == (0.3,) and model.config.std == (0.2,)
    x = torch.full((1, 1, 12, 12), 0.3, device=DEVICE)
    y, static = model.encode(x)
    assert static and torch.allclose(y, torch.zeros_like(y))


def test_mpdsgr_finds_every_layer():
    model = build_model("wrn16", T=1, **TINY["wrn16"])
    reg = mt.MPDSGR(model, eta=1.0)
    assert len(reg.layers) == 13  # stem + 6 blocks x 2


@pytest.mark.parametrize("kwargs,msg", [
    (dict(T=0), "T must be an integer >= 1"),
    (dict(T=2.5), "T must be an integer >= 1"),
    (dict(encoding="rate"), "encoding must be one of"),
    (dict(num_classes=1), "num_classes must be >= 2"),
    (dict(in_channels=0), "in_channels must be an integer >= 1"),
    (dict(mean=[0.1, 0.2]), "mean and std need 1 values"),
    (dict(neuron=dict(tau=-1.0)), "tau must be > 0"),
    (dict(neuron=dict(surrogate="nope")), "surrogate: unknown name"),
])
def test_bad_model_arguments(kwargs, msg):
    base = dict(TINY["small"])
    base.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=msg):
        build_model("small", **base)


def test_neuron_options_are_lif_config_fields_and_give_a_config():
    """NeuronOptions' neuron fields and defaults are LIFConfig's (the surrogate by name); to_config() is the
    validated LIFConfig, make() a layer of it, from_config() the way back; a checkpoint's dict rebuilds it."""
    import dataclasses

    lif_fields = [(f.name, f.default) for f in dataclasses.fields(mt.LIFConfig)]
    assert [(f.name, f.default) for f in dataclasses.fields(NeuronOptions)][:len(lif_fields)] == lif_fields
    assert [f.name for f in dataclasses.fields(NeuronOptions)][len(lif_fields):] == [
        "surrogate_param", "window", "backend"]
    assert NeuronOptions().to_config() == mt.LIFConfig()
    opts = NeuronOptions(tau=3.0, v_th=0.8, v_reset=None, detach_reset=True, surrogate="atan", surrogate_param=2.5,
                         window=0.4, backend="torch")
    cfg = opts.to_config()
    assert cfg == mt.LIFConfig(tau=3.0, v_th=0.8, v_reset=None, detach_reset=True, surrogate=mt.ATan(2.5, gamma=0.4))
    layer = opts.make()
    assert isinstance(layer, mt.LIF) and layer.config == cfg and layer.backend == "torch"
    assert NeuronOptions.from_config(cfg, backend="torch") == opts
    assert NeuronOptions.from_config(mt.LIFConfig(surrogate=mt.Sigmoid(3.0))) == NeuronOptions(
        surrogate="sigmoid", surrogate_param=3.0)
    saved = {"tau": 2.0, "v_th": 1.0, "v_reset": 0.0, "decay_input": True, "detach_reset": False,
             "surrogate": "triangle", "surrogate_param": None, "window": None, "backend": "auto"}  # an old checkpoint
    assert NeuronOptions(**saved).to_dict() == saved == NeuronOptions().to_dict()
    with pytest.raises(ValueError, match="window: the triangle surrogate's MPD-SGR window is its support"):
        NeuronOptions(window=0.5).to_config()
    with pytest.raises(ValueError, match="backend must be one of"):
        NeuronOptions(backend="gpu").make()


def test_bad_model_name_and_input():
    with pytest.raises(ValueError, match="unknown model 'resnet50'; choose one of small, vgg11, vgg16, wrn16"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="image too small"):
        build_model("vgg16", image_size=16)
    model = build_model("small", **TINY["small"])
    with pytest.raises(ValueError, match=r"takes images \[B, 1, H, W\]"):
        model(torch.rand(2, 12, 12))
    with pytest.raises(ValueError, match="was built for 1 input channels, got 3"):
        model(torch.rand(2, 3, 12, 12))


def test_models_are_the_installed_library_and_load_what_train_run_saves(tmp_path):
    """mt.models is the one copy of the models (models/ re-exports it); mt.models.load rebuilds a
    model.pt of train.run's format with a weights-only load, and refuses other files in one line."""
    import models as repo_models
    from train.checkpoint import rng_state, save_checkpoint

    assert mt.models.build is repo_models.build_model is mt.models.build_model
    assert repo_models.SmallSNN is mt.models.SmallSNN
    spec = {"model": "small", "in_channels": 1, "num_classes": 10, "image_size": 12, "T": 2, "encoding": "direct",
            "neuron": {"backend": "torch"}, "width": 4, "hidden": 16, "data": "fmnist-subset"}
    torch.manual_seed(3)
    model = mt.models.build("small", **{k: v for k, v in spec.items() if k not in ("model", "data")})
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"run": "mpd", "config": {"eta": 1.0}, "model": model.state_dict(), "model_spec": spec})
    loaded = mt.models.load(path)
    x = torch.rand(3, 1, 12, 12)
    model.eval()
    assert not loaded.training and torch.equal(loaded(x), model(x))
    record = mt.models.read(path)
    assert record["model_spec"] == spec and record["format"] == mt.models.FORMAT

    def refused(p, match):
        with pytest.raises(mt.models.ModelFileError, match=match) as e:
            mt.models.load(p)
        assert "\n" not in str(e.value)

    refused(tmp_path / "missing.pt", "no model file at")
    (tmp_path / "text.pt").write_text("weights")
    refused(tmp_path / "text.pt", "not a file that mpd-triton saved")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    refused(tmp_path / "foreign.pt", "not an mpd-triton file")
    torch.save({"format": "mpd-triton-checkpoint/0", "model": {}}, tmp_path / "old.pt")
    refused(tmp_path / "old.pt", "of format 'mpd-triton-checkpoint/0'; this mpd-triton reads 'mpd-triton-checkpoint/1'")
    save_checkpoint(tmp_path / "nospec.pt", {"model": model.state_dict()})
    refused(tmp_path / "nospec.pt", "holds no model")
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_spec": spec, "rng": rng_state()})
    refused(tmp_path / "ckpt.pt", "holds more than a model")
    other = dict(spec, hidden=32)
    save_checkpoint(tmp_path / "mismatch.pt", {"model": model.state_dict(), "model_spec": other})
    refused(tmp_path / "mismatch.pt", "weights do not fit a small model")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    refused(tmp_path / "flipped.pt", "corrupt|cut short")
