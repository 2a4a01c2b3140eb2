"""Attacks and the robustness evaluation: closed forms on linear models, invariants, EOT,
the gradient ensemble, the masking checks, and the train.eval CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import mpd_triton as mt
from models import build_model
from mpd_triton.attacks import methods as A
from mpd_triton.attacks.evaluation import (
    EvalSettings,
    evaluate_robustness,
    pack_outcomes,
    parse_attacks,
    sanity_checks,
    unpack_outcomes,
)


class Linear2(nn.Module):
    """Two-class linear score on flattened images: logits = [0, w.x + b]."""

    def __init__(self, w, b=0.0):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        s = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def _linear_case(seed=0, B=6):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, 4, 4, generator=g)
    x = torch.rand(B, 1, 4, 4, generator=g) * 0.6 + 0.2  # away from the box edges
    y = torch.randint(0, 2, (B,), generator=g)
    return Linear2(w), x, y


def test_fgsm_is_the_closed_form_worst_case_of_a_linear_score():
    """For CE on logits [0, s], the worst L-inf step is x + eps * sign(w) (label 1: - sign(w))."""
    model, x, y = _linear_case()
    eps = 0.05
    x_adv = A.fgsm(model, x, y, eps)
    direction = torch.where(y.view(-1, 1, 1, 1) == 1, -1.0, 1.0) * model.w.detach().sign()
    assert torch.allclose(x_adv, x + eps * direction, atol=1e-7)


def test_pgd_reaches_the_closed_form_optimum_on_a_linear_score():
    model, x, y = _linear_case(1)
    eps = 0.05
    x_adv = A.pgd(model, x, y, eps, alpha=eps / 2, steps=10)
    direction = torch.where(y.view(-1, 1, 1, 1) == 1, -1.0, 1.0) * model.w.detach().sign()
    assert torch.allclose(x_adv, x + eps * direction, atol=1e-6)
    # and the margin moved by exactly eps * ||w||_1
    s0 = model(x)[:, 1] - model(x)[:, 0]
    s1 = model(x_adv)[:, 1] - model(x_adv)[:, 0]
    shift = torch.where(y == 1, s0 - s1, s1 - s0)
    assert torch.allclose(shift, torch.full_like(shift, eps * float(model.w.detach().abs().sum())), atol=1e-4)


def test_apgd_on_a_linear_score_finds_the_optimum():
    model, x, y = _linear_case(2)
    eps = 0.04
    x_adv = A.apgd(model, x, y, eps, steps=30)
    best = x + eps * torch.where(y.view(-1, 1, 1, 1) == 1, -1.0, 1.0) * model.w.detach().sign()
    loss = nn.functional.cross_entropy(model(x_adv), y, reduction="none")
    best_loss = nn.functional.cross_entropy(model(best), y, reduction="none")
    fooled = model(x_adv).argmax(1) != y
    assert bool(((loss >= best_loss - 1e-4) | fooled).all())


def _snn(encoding="direct", backend="torch", seed=0):
    """An untrained small SNN whose neurons fire in eval mode: BatchNorm's running statistics are
    calibrated on random images (with their initial values every layer is silent, with zero gradient)."""
    torch.manual_seed(seed)
    model = build_model("small", in_channels=1, image_size=12, num_classes=10, width=4, hidden=16, T=2,
                        encoding=encoding, neuron=dict(backend=backend))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        model.train()
        for _ in range(3):
            model(torch.rand(64, 1, 12, 12))
    return model.eval()


@pytest.mark.parametrize("attack", A.ATTACKS)
def test_attacks_stay_in_the_eps_ball_and_the_box(attack):
    model = _snn()
    source = _snn(seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 1, 12, 12, generator=g)
    x[0] = 0.0
    x[1] = 1.0
    y = torch.randint(0, 10, (5,), generator=g)
    eps = 8 / 255
    x_adv = A.run_attack(attack, model, x, y, eps, steps=3, alpha=0.01, source=source, n_queries=20)
    assert x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert model.training is False


def test_attacks_restore_train_mode_and_leave_parameter_grads():
    model = _snn().train()
    x, y = torch.rand(3, 1, 12, 12), torch.tensor([1, 2, 3])
    A.pgd(model, x, y, 0.03, 0.01, 2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_gradient_sources_change_only_the_backward():
    model = _snn()
    x, y = torch.rand(4, 1, 12, 12), torch.tensor([0, 1, 2, 3])
    grads = {}
    with torch.no_grad():
        ref = model(x)
    own, _ = A.input_gradient(model, x, y)
    assert own.abs().sum() > 0
    for source in ("own", "sigmoid", "atan", "bptr"):
        with A.gradient_source(model, source):
            with torch.no_grad():
                assert torch.equal(model(x), ref)  # same forward
            grads[source], _ = A.input_gradient(model, x, y)
    assert isinstance(model.lif_layers()[0].surrogate, mt.Triangle)  # restored
    assert model.lif_layers()[0].backward_mode == "bptt"
    assert not torch.allclose(grads["own"], grads["sigmoid"]) and not torch.allclose(grads["own"], grads["bptr"])
    with pytest.raises(ValueError, match="unknown gradient source 'relu'"):
        with A.gradient_source(model, "relu"):
            pass


def test_eot_averages_over_draws():
    """A Poisson model's gradient is random; averaging more draws brings it closer to the mean."""
    model = _snn("poisson")
    x, y = torch.rand(2, 1, 12, 12), torch.tensor([3, 7])
    torch.manual_seed(0)
    g1a, _ = A.input_gradient(model, x, y, eot=1)
    g1b, _ = A.input_gradient(model, x, y, eot=1)
    assert not torch.equal(g1a, g1b)  # one draw and another differ
    torch.manual_seed(1)
    reference, _ = A.input_gradient(model, x, y, eot=256)
    err = {}
    for n in (1, 32):
        torch.manual_seed(2)
        g, _ = A.input_gradient(model, x, y, eot=n)
        err[n] = float((g - reference).norm() / reference.norm())
    assert err[32] < 0.5 * err[1], err


def test_more_steps_and_larger_eps_never_help_the_defender():
    model = _snn()
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(40, 1, 12, 12, generator=g), torch.randint(0, 10, (40,), generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # start from correctly classified images
    acc = {}
    for eps in (2 / 255, 8 / 255, 32 / 255):
        for steps in (1, 10):
            torch.manual_seed(0)
            x_adv = A.bim(model, x, y, eps, alpha=eps / 4, steps=steps)
            with torch.no_grad():
                acc[eps, steps] = float((model(x_adv).argmax(1) == y).float().mean())
    for eps in (2 / 255, 8 / 255, 32 / 255):
        assert acc[eps, 10] <= acc[eps, 1]
    assert acc[32 / 255, 10] <= acc[8 / 255, 10] <= acc[2 / 255, 10]


def test_robust_accuracy_below_clean_and_ensemble_is_per_image_worst_case():
    model = _snn()
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(30, 1, 12, 12, generator=g), torch.randint(0, 10, (30,), generator=g)
    with torch.no_grad():
        y[:20] = model(x[:20]).argmax(1)
    settings = EvalSettings(attacks=["fgsm", "pgd", "gaussian"], eps=[4 / 255, 16 / 255], steps=3,
                            gradients=["own", "sigmoid", "bptr"], batch_size=16, large_eps_check=False)
    r = evaluate_robustness(model, x, y, settings, progress=False)
    for attack, by_eps in r["accuracy"].items():
        for eps, value in by_eps.items():
            assert value <= r["clean"]
            assert r["worst_case"][eps] <= value  # surviving every attack is rarer than surviving one
            if attack in r["by_gradient"]:
                per_source = r["by_gradient"][attack][eps]
                assert value <= min(per_source.values())  # the per-image AND is below every single source


@pytest.mark.slow
def test_per_image_outcomes_recount_every_figure():
    """Every accuracy of the result is the share of ones in its per-image mask; the masks nest as the
    counts do (an attack's worst case within each gradient source and level, the worst case over every
    attack within each attack's and within the smaller eps's, everything within clean)."""
    model = _snn()
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(21, 1, 12, 12, generator=g), torch.randint(0, 10, (21,), generator=g)
    with torch.no_grad():
        y[:15] = model(x[:15]).argmax(1)
    settings = EvalSettings(attacks=["fgsm", "pgd", "assg", "gaussian"], eps=[4 / 255, 16 / 255], steps=3,
                            sapgd_steps=3, assg_levels=[0.3, 0.45], gradients=["own", "bptr"], batch_size=8)
    r = evaluate_robustness(model, x, y, settings, progress=False)
    n, per = r["n"], r["per_image"]
    mask = lambda text: unpack_outcomes(text, n)  # noqa: E731
    clean = mask(per["clean"])
    assert clean.mean() == pytest.approx(r["clean"])
    survived = per["survived"]
    assert set(survived) == {"fgsm", "pgd", "assg", "gaussian", "all", "large_eps"}
    for attack, by_eps in r["accuracy"].items():
        for eps, value in by_eps.items():
            worst = mask(survived[attack][eps]["worst"])
            assert worst.mean() == pytest.approx(value) and not (worst & ~clean).any()
            parts = {k: mask(v) for k, v in survived[attack][eps].items() if k != "worst"}
            if attack in r["by_gradient"]:
                assert set(parts) == {"own", "bptr"}
                for source, share in r["by_gradient"][attack][eps].items():
                    assert parts[source].mean() == pytest.approx(share)
            if attack == "assg":
                assert set(parts) == {"0.3", "0.45"}
                for level, share in r["assg_by_level"][eps].items():
                    assert parts[level].mean() == pytest.approx(share)
            if parts:
                assert (worst == np.logical_and.reduce(list(parts.values()))).all()
    small, large = (f"{e:.6g}" for e in settings.eps)
    for eps in (small, large):
        every = mask(survived["all"][eps]["worst"])
        assert every.mean() == pytest.approx(r["worst_case"][eps])
        for attack in settings.attacks:
            assert not (every & ~mask(survived[attack][eps]["worst"])).any()
    assert not (mask(survived["all"][large]["worst"]) & ~mask(survived["all"][small]["worst"])).any()
    assert mask(survived["large_eps"]["1"]["worst"]).mean() == pytest.approx(r["large_eps"]["by_attack"]["pgd"])
    assert mask(survived["large_eps"]["1"]["assg"]).mean() == pytest.approx(r["large_eps"]["by_attack"]["assg"])
    json.dumps(r)  # JSON-ready


@pytest.mark.parametrize("n", [1, 7, 8, 9, 250, 1000])
def test_outcome_masks_round_trip_and_refuse_another_length(n):
    g = torch.Generator().manual_seed(n)
    bits = torch.rand(n, generator=g) < 0.5
    text = pack_outcomes(bits)
    assert len(text) <= 4 * ((n + 7) // 8 + 2) // 3 + 4  # a byte per 8 images, base64
    assert (unpack_outcomes(text, n) == bits.numpy()).all()
    assert unpack_outcomes(pack_outcomes(np.ones(n, dtype=bool)), n).sum() == n
    with pytest.raises(ValueError, match="holds"):
        unpack_outcomes(text, n + 8)


def test_ensemble_counts_an_image_only_if_it_survives_every_source(monkeypatch):
    """Source 'own' fools images {0, 1}, 'sigmoid' fools {2}: the ensemble must count 3 fooled."""
    model = Linear2(torch.ones(1, 4, 4))
    x = torch.full((4, 1, 4, 4), 0.5)
    y = torch.ones(4, dtype=torch.long)
    fooled_by = {"own": [0, 1], "sigmoid": [2]}

    def fake_attack(name, model, x, y, eps, gradient="own", **kw):
        x_adv = x.clone()
        x_adv[fooled_by[gradient]] = 0.0  # score 0: predicted class 0, wrong
        return x_adv

    import mpd_triton.attacks.evaluation as R

    monkeypatch.setattr(R, "run_attack", fake_attack)
    settings = EvalSettings(attacks=["pgd"], eps=[0.1], gradients=["own", "sigmoid"], large_eps_check=False)
    r = evaluate_robustness(model, x, y, settings, num_classes=2, progress=False)
    assert r["clean"] == 1.0
    assert r["by_gradient"]["pgd"]["0.1"] == {"own": 0.5, "sigmoid": 0.75}
    assert r["accuracy"]["pgd"]["0.1"] == 0.25


@pytest.mark.parametrize("attack", A.TRANSFER_ATTACKS)
def test_transfer_runs_the_named_attack_on_the_source(attack):
    """The transfer attack's examples are the source model's examples of that attack, whatever the target."""
    model, source = _snn(), _snn(seed=1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(4, 1, 12, 12, generator=g), torch.randint(0, 10, (4,), generator=g)
    options = A.ASSGOptions(level=0.35)
    torch.manual_seed(0)
    got = A.run_attack("transfer", model, x, y, 8 / 255, steps=3, alpha=0.01, source=source, transfer_attack=attack,
                       assg_options=options)
    torch.manual_seed(0)
    want = {"pgd": lambda: A.pgd(source, x, y, 8 / 255, 0.01, 3), "apgd": lambda: A.apgd(source, x, y, 8 / 255, 3),
            "assg": lambda: A.assg(source, x, y, 8 / 255, 3, options=options)}[attack]()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the transfer attack runs one of pgd, apgd, assg on its source, not 'cw'"):
        A.transfer(source, x, y, 8 / 255, 0.01, 3, attack="cw")


def test_transfer_with_assg_runs_every_level_and_counts_the_worst_case(monkeypatch):
    """transfer_attack='assg': one source attack per ASSG level, its budget --sapgd-steps; an image counts
    only if it survives all of them (level 0.35 fools {0}, 0.49 fools {3})."""
    model = Linear2(torch.ones(1, 4, 4))
    x = torch.full((4, 1, 4, 4), 0.5)
    y = torch.ones(4, dtype=torch.long)
    fooled_by = {0.35: [0], 0.49: [3]}
    calls = []

    def fake_attack(name, model, x, y, eps, steps=7, transfer_attack="pgd", assg_options=None, **kw):
        calls.append((name, transfer_attack, steps, assg_options.level))
        x_adv = x.clone()
        x_adv[fooled_by[assg_options.level]] = 0.0
        return x_adv

    import mpd_triton.attacks.evaluation as R

    monkeypatch.setattr(R, "run_attack", fake_attack)
    settings = EvalSettings(attacks=["transfer"], eps=[0.1], assg_levels=[0.35, 0.49], sapgd_steps=11,
                            transfer_attack="assg", large_eps_check=False)
    r = evaluate_robustness(model, x, y, settings, source=model, num_classes=2, progress=False)
    assert calls == [("transfer", "assg", 11, 0.35), ("transfer", "assg", 11, 0.49)]
    assert r["accuracy"]["transfer"]["0.1"] == 0.5
    assert r["settings"]["transfer_attack"] == "assg"
    with pytest.raises(ValueError, match="the transfer attack runs one of pgd, apgd, assg on the source model"):
        EvalSettings(transfer_attack="square")


def test_worst_case_carries_smaller_eps_examples_to_larger_eps(monkeypatch):
    """An attack that finds less at a larger eps does not make an image robust there: the worst case at
    eps counts only images that survive at every smaller eps too (here fgsm fools image 0 at 0.05 and
    image 1 at 0.1), while the attack's own figure per eps stays as measured."""
    model = Linear2(torch.ones(1, 4, 4))
    x = torch.full((4, 1, 4, 4), 0.5)
    y = torch.ones(4, dtype=torch.long)
    fooled_at = {0.05: [0], 0.1: [1]}

    def fake_attack(name, model, x, y, eps, **kw):
        x_adv = x.clone()
        x_adv[fooled_at[eps]] = 0.0
        return x_adv

    import mpd_triton.attacks.evaluation as R

    monkeypatch.setattr(R, "run_attack", fake_attack)
    settings = EvalSettings(attacks=["fgsm"], eps=[0.1, 0.05], gradients=["own"], large_eps_check=False)
    r = evaluate_robustness(model, x, y, settings, num_classes=2, progress=False)
    assert r["clean"] == 1.0
    assert r["accuracy"]["fgsm"] == {"0.1": 0.75, "0.05": 0.75}
    assert r["worst_case"] == {"0.05": 0.75, "0.1": 0.5}


class RoundingModel(nn.Module):
    """Masks gradients: its forward rounds the input to 4 levels (zero gradient almost everywhere)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(2, 16))

    def forward(self, x):
        q = torch.round(x * 3) / 3
        return self.fc(q.flatten(1) - 0.5)


def test_sanity_checks_flag_a_gradient_masking_model_and_pass_an_honest_one():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(200, 1, 4, 4, generator=g)
    # 10 steps of 0.05 cross the 0.3-wide ball (fewer would make PGD weaker than FGSM, a real flag)
    settings = EvalSettings(attacks=["fgsm", "pgd", "gaussian", "square"], eps=[0.05, 0.15], steps=10, alpha=0.05,
                            n_queries=200, batch_size=100)
    masked = RoundingModel().eval()
    with torch.no_grad():
        y = masked(x).argmax(1)
    r_masked = evaluate_robustness(masked, x, y, settings, num_classes=2, progress=False)
    failed = {c["name"] for c in r_masked["checks"] if not c["passed"]}
    assert "large_eps" in failed and "white_box_strongest" in failed, r_masked["checks"]
    assert not r_masked["all_checks_passed"]

    honest = Linear2(torch.randn(1, 4, 4, generator=g)).eval()
    with torch.no_grad():
        y = honest(x).argmax(1)
    r_honest = evaluate_robustness(honest, x, y, settings, num_classes=2, progress=False)
    assert r_honest["all_checks_passed"], r_honest["checks"]


def test_sanity_check_logic_on_synthetic_results():
    base = {"n": 1000, "accuracy": {"fgsm": {"0.01": 0.5, "0.03": 0.3}, "pgd": {"0.01": 0.4, "0.03": 0.25}},
            "large_eps": {"eps": 1.0, "acc": 0.0}}
    assert all(c["passed"] for c in sanity_checks(base))
    rising = json.loads(json.dumps(base))
    rising["accuracy"]["pgd"]["0.03"] = 0.6
    names = {c["name"]: c["passed"] for c in sanity_checks(rising)}
    assert names["eps_monotone"] is False and names["iterative_beats_one_step"] is False


def test_a_fixed_step_attack_is_not_held_to_an_eps_its_budget_cannot_reach():
    # 7 steps of 0.01 travel 0.07: at eps 0.1 PGD and BIM are weaker than FGSM by their budget (an
    # adversarially trained model: PGD 39.5% against FGSM 28.9%); APGD, which sizes its steps, is held to it
    result = {"n": 1000, "settings": {"steps": 7, "alpha": 0.01},
              "accuracy": {"fgsm": {"0.0313725": 0.77, "0.1": 0.29}, "pgd": {"0.0313725": 0.75, "0.1": 0.395},
                           "bim": {"0.0313725": 0.74, "0.1": 0.40}, "apgd": {"0.0313725": 0.63, "0.1": 0.02}}}
    check = {c["name"]: c for c in sanity_checks(result)}["iterative_beats_one_step"]
    assert check["passed"] and "not compared: pgd at eps 0.1, bim at eps 0.1 (7 steps of 0.01" in check["detail"]
    result["accuracy"]["pgd"]["0.0313725"] = 0.80  # within its reach it is still held to FGSM
    check = {c["name"]: c for c in sanity_checks(result)}["iterative_beats_one_step"]
    assert not check["passed"] and "pgd 80.0% > fgsm 77.0% at eps 0.0313725" in check["detail"]
    assert "not compared: pgd at eps 0.1" in check["detail"]
    result["settings"] = {"steps": 10, "alpha": 0.01}  # 0.1: it reaches eps 0.1 and is compared there
    result["accuracy"]["pgd"]["0.0313725"] = 0.75
    check = {c["name"]: c for c in sanity_checks(result)}["iterative_beats_one_step"]
    assert not check["passed"] and "pgd 39.5% > fgsm 29.0% at eps 0.1" in check["detail"]


def test_parse_attacks_and_settings_errors():
    assert parse_attacks("fgsm, gaussian,PGD,fgsm") == ["fgsm", "gaussian", "pgd"]
    with pytest.raises(ValueError, match="unknown attack 'noise' \\(it is called 'gaussian'\\)"):
        parse_attacks("fgsm,noise")  # one name per attack
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        parse_attacks("fgsm,cw")
    with pytest.raises(ValueError, match=r"eps must be in \[0, 1\]"):
        EvalSettings(eps=[1.5])
    with pytest.raises(ValueError, match="unknown gradient source"):
        EvalSettings(gradients=["nope"])
