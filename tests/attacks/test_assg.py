"""ASSG + SA-PGD (Wang et al., arXiv 2512.22522): SA-PGD on a linear score and its step schedule,
ASSG's statistics against the paper's update computed from the reference, the fused kernels inside
the attack, strength against fixed-surrogate attacks on a trained model, the evaluation's worst
case and checks, and bad options."""

from __future__ import annotations

import math

import pytest
import torch
from test_attacks import _linear_case, _snn
from torch import nn

import mpd_triton as mt
from mpd_triton.attacks import methods as A
from mpd_triton.attacks.evaluation import (
    EvalSettings,
    evaluate_robustness,
    sanity_checks,
)


def test_sapgd_on_a_linear_score_finds_the_optimum():
    """Constant gradient: every SA-PGD step moves each pixel by the full step towards sign(w), so it
    reaches the corner x + eps * sign (the closed-form worst case), or fools the image first."""
    model, x, y = _linear_case(3)
    eps = 0.04
    x_adv = A.sapgd(model, x, y, eps, steps=12)
    best = x + eps * torch.where(y.view(-1, 1, 1, 1) == 1, -1.0, 1.0) * model.w.detach().sign()
    loss = nn.functional.cross_entropy(model(x_adv), y, reduction="none")
    best_loss = nn.functional.cross_entropy(model(best), y, reduction="none")
    fooled = model(x_adv).argmax(1) != y
    assert bool(((loss >= best_loss - 1e-4) | fooled).all())


def test_sapgd_step_schedule():
    """The step halves after 22% of the iterations, then at intervals 3% shorter, down to 6%: for 100
    iterations, intervals 22, 19, 16, 13, 10, 7, 6, 6."""
    assert A.sapgd_halvings(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert A.sapgd_halvings(10) == list(range(2, 11))
    assert A.sapgd_halvings(1) == [1]


def test_assg_level_and_omega():
    """omega = (2/pi) tan(pi * level): at |u| = E|u| the arctangent's smoothed step is 1/2 + level."""
    for level in (0.35, A.ASSG_LEVEL, 0.49):
        omega = A.ASSGOptions(level=level).omega
        assert 0.5 + math.atan(math.pi / 2 * omega) / math.pi == pytest.approx(0.5 + level, abs=1e-12)
    assert A.ASSGOptions().omega == pytest.approx(2.652, abs=1e-3)  # the authors' default a = 0.425


def _capture_inputs(model):
    """Forward hooks keeping each LIF layer's inputs, call by call."""
    layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
    seen = {i: [] for i in range(len(layers))}
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(args[0].detach()))
             for i, layer in enumerate(layers)]
    return layers, seen, hooks


@pytest.mark.parametrize("granularity", A.ASSG_GRANULARITIES)
def test_assg_statistics_follow_the_paper_update(granularity):
    """After each pass, every LIF's surrogate_param is omega / (M + relax D + 1e-4), with M, D the moving
    averages of |u| and ||u| - M| (from M = 1, D = 0) over the passes, u from the reference; a pass
    begun with update=False uses the statistics without moving them."""
    model = _snn()
    opts = A.ASSGOptions(level=0.4, relax=1.5, beta1=0.8, beta2=0.7, granularity=granularity)
    layers, seen, hooks = _capture_inputs(model)
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(3, 1, 12, 12, generator=g)
    expected = {}
    with A.AdaptiveSharpness(model, opts) as sharp:
        for k, update in enumerate((True, True, False, True)):
            sharp.begin_pass(update=update)
            with torch.no_grad():
                model((x0 + 0.05 * k).clamp(0, 1))
            for i, layer in enumerate(layers):
                u = mt.lif_reference(seen[i][-1].float(), layer.config).u
                a = u.abs()
                spatial = tuple(range(3, a.dim()))
                if granularity == "channel" and spatial:
                    a_stat = a.mean(dim=spatial, keepdim=True)
                else:
                    a_stat = a
                M, D = expected.get(i, (torch.ones_like(a_stat), torch.zeros_like(a_stat)))
                if update:
                    M = opts.beta1 * M + (1 - opts.beta1) * a_stat
                    dev = (a - M).abs()
                    if granularity == "channel" and spatial:
                        dev = dev.mean(dim=spatial, keepdim=True)
                    D = opts.beta2 * D + (1 - opts.beta2) * dev
                expected[i] = (M, D)
                alpha = opts.omega / (M + opts.relax * D + 1e-4)
                torch.testing.assert_close(layer.surrogate_param, alpha, rtol=1e-6, atol=0)
                assert isinstance(layer.surrogate, mt.ATan)
        assert len(sharp.sharpness()) == len(layers)
    for h in hooks:
        h.remove()
    assert all(layer.surrogate_param is None and isinstance(layer.surrogate, mt.Triangle) for layer in layers)


def test_assg_restores_the_model_and_refuses_another_batch_shape():
    model = _snn()
    layers = model.lif_layers()
    layers[0].backward_mode = "rate"
    layers[1].surrogate_param = torch.full((8,), 2.0)
    x = torch.rand(4, 1, 12, 12)
    with A.AdaptiveSharpness(model) as sharp:
        assert layers[0].backward_mode == "bptt"
        sharp.begin_pass()
        model(x)
        sharp.begin_pass()
        with pytest.raises(RuntimeError, match="use one AdaptiveSharpness per attacked batch"):
            model(x[:2])
    assert layers[0].backward_mode == "rate" and torch.equal(layers[1].surrogate_param, torch.full((8,), 2.0))
    assert isinstance(layers[1].surrogate, mt.Triangle)
    layers[0].backward_mode, layers[1].surrogate_param = "bptt", None
    model(x[:2])  # the hooks are gone
    assert all(layer.surrogate_param is None for layer in layers)


def test_assg_with_eot_updates_its_statistics_on_the_first_draw_only():
    """A Poisson model: the statistics move once per gradient (from the first of the EOT draws), as in
    the paper; the other draws use them."""
    model = _snn("poisson")
    layers, seen, hooks = _capture_inputs(model)
    x, y = torch.rand(2, 1, 12, 12), torch.tensor([3, 7])
    torch.manual_seed(0)
    with A.AdaptiveSharpness(model) as sharp:
        A._gradient(model, x, y, eot=3, before_draw=sharp.draw)
        assert len(seen[0]) == 3
        first = mt.lif_reference(seen[0][0].float(), layers[0].config).u.abs()
        M, _ = sharp.stats[(0, 0)]
        torch.testing.assert_close(M, A.ASSG_BETA1 + (1 - A.ASSG_BETA1) * first)
    for h in hooks:
        h.remove()


def test_assg_gradient_through_the_kernels_matches_the_reference():
    """ASSG's per-element sharpness through the fused backward kernel (SG_PARAM strided) gives the
    reference's input gradient, and a different one from the model's own surrogate."""
    x, y = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 4, 7])
    grads = {}
    for backend in ("torch", "triton"):
        model = _snn(backend=backend)
        with A.AdaptiveSharpness(model) as sharp:
            for _ in range(2):
                grads[backend], _, _ = A._gradient(model, x, y, before_draw=sharp.draw)
    own, _ = A.input_gradient(_snn(backend="torch"), x, y)
    assert grads["torch"].abs().sum() > 0
    torch.testing.assert_close(grads["triton"], grads["torch"], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grads["torch"], own)


@pytest.mark.slow
def test_assg_with_sapgd_is_at_least_as_strong_as_fixed_surrogate_attacks(trained):
    """Same budget (20 gradients at 16/255): ASSG + SA-PGD leaves no more images correct than PGD through
    the model's own surrogate, the sigmoid or the arctangent surrogate, nor than SA-PGD through the
    arctangent surrogate with its fixed sharpness (so the adaptive sharpness itself adds strength)."""
    model, x, y = trained
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    assert clean.float().mean() > 0.7

    def robust(name, **kw):
        torch.manual_seed(0)
        x_adv = A.run_attack(name, model, x, y, 16 / 255, steps=20, **kw)
        with torch.no_grad():
            return int((clean & (model(x_adv).argmax(1) == y)).sum())

    fixed = {f"pgd {g}": robust("pgd", alpha=4 / 255, gradient=g) for g in ("own", "sigmoid", "atan")}
    fixed["sapgd atan"] = robust("sapgd", gradient="atan")
    adaptive = robust("assg")
    assert all(adaptive <= v for v in fixed.values()), (adaptive, fixed)
    assert adaptive < fixed["pgd own"], (adaptive, fixed)


def test_evaluation_puts_assg_in_the_worst_case_and_the_checks():
    model = _snn()
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(12, 1, 12, 12, generator=g), torch.randint(0, 10, (12,), generator=g)
    with torch.no_grad():
        y[:9] = model(x[:9]).argmax(1)
    settings = EvalSettings(attacks=["fgsm", "assg"], eps=[8 / 255], sapgd_steps=3, assg_levels=[0.4, 0.45],
                            batch_size=8)
    r = evaluate_robustness(model, x, y, settings, progress=False)
    key = f"{8 / 255:.6g}"
    by_level = r["assg_by_level"][key]
    assert set(by_level) == {"0.4", "0.45"}
    assert r["accuracy"]["assg"][key] <= min(by_level.values())
    assert r["worst_case"][key] <= min(r["accuracy"]["assg"][key], r["accuracy"]["fgsm"][key])
    assert set(r["large_eps"]["by_attack"]) == {"pgd", "assg"} and r["large_eps"]["acc"] == r["large_eps"][
        "by_attack"]["pgd"]
    assert {"iterative_beats_one_step", "large_eps"} <= {c["name"] for c in r["checks"]}


def test_sanity_checks_cover_assg():
    base = {"n": 1000, "accuracy": {"fgsm": {"0.03": 0.5}, "assg": {"0.03": 0.3}, "square": {"0.03": 0.6}},
            "large_eps": {"eps": 1.0, "acc": 0.0, "by_attack": {"pgd": 0.0, "assg": 0.0}}}
    assert all(c["passed"] for c in sanity_checks(base))
    weak = {**base, "accuracy": {**base["accuracy"], "assg": {"0.03": 0.55}}}
    assert {c["name"]: c["passed"] for c in sanity_checks(weak)}["iterative_beats_one_step"] is False
    square_stronger = {**base, "accuracy": {**base["accuracy"], "square": {"0.03": 0.2}}}
    assert {c["name"]: c["passed"] for c in sanity_checks(square_stronger)}["white_box_strongest"] is False
    masked = {**base, "large_eps": {"eps": 1.0, "acc": 0.0, "by_attack": {"pgd": 0.0, "assg": 0.4}}}
    check = {c["name"]: c for c in sanity_checks(masked)}["large_eps"]
    assert not check["passed"] and "ASSG + SA-PGD at eps 1.0 leaves 40.0%" in check["detail"]


BAD_OPTIONS = [
    (dict(level=0.5), ValueError, r"ASSG level must be in \(0, 0.5\)"),
    (dict(level=0.0), ValueError, r"ASSG level must be in \(0, 0.5\)"),
    (dict(level="0.4"), TypeError, "ASSG level must be a real number"),
    (dict(level=math.nan), TypeError, "ASSG level must be a real number"),
    (dict(relax=-1.0), ValueError, "ASSG relax must be finite and >= 0"),
    (dict(beta1=1.0), ValueError, r"ASSG beta1 must be in \[0, 1\)"),
    (dict(beta2=-0.1), ValueError, r"ASSG beta2 must be in \[0, 1\)"),
    (dict(granularity="pixel"), ValueError, "ASSG granularity must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,msg", BAD_OPTIONS, ids=lambda p: str(p)[:30] if isinstance(p, dict) else None)
def test_bad_assg_options(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        A.ASSGOptions(**kwargs)


def test_bad_evaluation_settings():
    with pytest.raises(ValueError, match=r"ASSG level must be in \(0, 0.5\)"):
        EvalSettings(assg_levels=[0.7])
    with pytest.raises(ValueError, match="assg_levels must list at least one"):
        EvalSettings(assg_levels=[])
    with pytest.raises(ValueError, match="sapgd_steps must be >= 1"):
        EvalSettings(sapgd_steps=0)
