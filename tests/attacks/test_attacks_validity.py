"""The attacks for checking a defence that moves the membrane potentials (docs/evaluation.md):
APGD-T on the targeted DLR loss, the straight-through ("ste") and fitted-window ("fitted") gradient
sources, and restarts of SA-PGD and ASSG + SA-PGD. Closed forms and hand-computed gradients on tiny
models, finite differences, invariants (restart 1 is the attack as it was, more restarts are never
weaker per image, robust <= clean, repeatable with a seed), the evaluation's masks and checks, and
the train.eval CLI."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from test_attacks import _snn
from test_eval_cli import _checkpoint
from torch import nn

import mpd_triton as mt
from mpd_triton.attacks import methods as A
from mpd_triton.attacks.evaluation import (
    FIRST_RUN,
    EvalSettings,
    evaluate_robustness,
    sanity_checks,
    unpack_outcomes,
)
from train.eval import build_parser, main

CPU_KERNELS = mt.cpu_kernels_unavailable() is None
BACKENDS = ["torch"] + (["cpu"] if CPU_KERNELS else [])


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_the_module():
    """torch on one thread for the whole module, the trained model's training included (module-scoped
    fixtures are set up before the function-scoped one_thread of tests/conftest.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(n=24, seed=11, model=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)
    if model is not None:
        with torch.no_grad():
            y[: n * 3 // 4] = model(x[: n * 3 // 4]).argmax(1)  # most images correct, some not
    return x, y


def _correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


@contextmanager
def _on_backend(model, backend):
    """The model with its LIF layers on ``backend`` for the block."""
    saved = [layer.backend for layer in model.lif_layers()]
    for layer in model.lif_layers():
        layer.backend = backend
    try:
        yield model
    finally:
        for layer, was in zip(model.lif_layers(), saved):
            layer.backend = was


# ---------------------------------------------------------------- the code as it was (commit 51e9de6)
# APGD and SA-PGD exactly as they were before APGD took a loss function and SA-PGD restarts: the new
# code must give these images bit for bit (apgd always, sapgd and assg with restarts=1).


def _apgd_before(model, x, y, eps, steps=100, eot=1, rho=0.75, momentum=0.75):
    with A._eval_mode(model):
        x = x.detach()
        B = x.shape[0]
        view = (B,) + (1,) * (x.dim() - 1)
        step = torch.full(view, 2.0 * eps, device=x.device)
        x_cur = A._project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
        grad, loss = A.input_gradient(model, x_cur, y, eot)
        best_loss, x_best, grad_best = loss.clone(), x_cur.clone(), grad.clone()
        fooled = torch.zeros(B, dtype=torch.bool, device=x.device)
        x_fooled = x_cur.clone()

        def note_fooled(x_new):
            with torch.no_grad():
                wrong = A._logits(model, x_new).argmax(1) != y
            newly = wrong & ~fooled
            x_fooled[newly] = x_new[newly]
            fooled.logical_or_(wrong)

        note_fooled(x_cur)
        x_prev = x_cur.clone()
        checkpoints = A._apgd_checkpoints(steps)
        last_check, successes = 0, torch.zeros(B, device=x.device)
        loss_at_check, reduced_at_check = best_loss.clone(), torch.zeros(B, dtype=torch.bool, device=x.device)
        for k in range(steps):
            z = A._project(x_cur + step * grad.sign(), x, eps)
            a = 1.0 if k == 0 else momentum
            x_next = A._project(x_cur + a * (z - x_cur) + (1.0 - a) * (x_cur - x_prev), x, eps)
            grad_next, loss_next = A.input_gradient(model, x_next, y, eot)
            note_fooled(x_next)
            successes += (loss_next > loss).float()
            better = loss_next > best_loss
            best_loss = torch.where(better, loss_next, best_loss)
            x_best[better], grad_best[better] = x_next[better], grad_next[better]
            x_prev, x_cur, grad, loss = x_cur, x_next, grad_next, loss_next
            if k + 1 in checkpoints:
                window = k + 1 - last_check
                stalled = successes < rho * window
                no_progress = (~reduced_at_check) & (best_loss <= loss_at_check)
                halve = stalled | no_progress
                step[halve] /= 2.0
                x_cur[halve], grad[halve], loss[halve] = x_best[halve], grad_best[halve], best_loss[halve]
                x_prev[halve] = x_best[halve]
                last_check, successes = k + 1, torch.zeros_like(successes)
                loss_at_check, reduced_at_check = best_loss.clone(), halve
        return torch.where(fooled.view(view), x_fooled, x_best).detach()


def _sapgd_before(model, x, y, eps, steps=A.SAPGD_STEPS, eot=1, before_draw=None):
    tiny = 1e-12
    with A._eval_mode(model):
        x = x.detach()
        B = x.shape[0]
        view = (B,) + (1,) * (x.dim() - 1)
        noise = torch.empty_like(x).uniform_(-1.0, 1.0)
        noise = noise / noise.flatten(1).abs().amax(1).clamp_min(tiny).view(view)
        x_adv = A._project(x + eps * noise, x, eps)
        grad, loss, logits = A._gradient(model, x_adv, y, eot, before_draw=before_draw)
        fooled = logits.argmax(1) != y
        x_fooled = x_adv.clone()
        best_loss, x_best = loss.clone(), x_adv.clone()
        step = torch.full(view, float(eps), device=x.device)
        halvings = set(A.sapgd_halvings(steps))
        m = v = None
        for k in range(steps):
            g = grad / A._per_image_mean(grad.abs()).clamp_min(tiny)
            g2 = g * g
            g2 = g2 / A._per_image_mean(g2).clamp_min(tiny)
            m = g if m is None else 0.5 * m + g
            v = g2 if v is None else 0.8 * v + g2
            delta = torch.max(torch.min(step * m / (v.sqrt() + tiny), step), -step)
            x_adv = A._project(x_adv + delta, x, eps)
            grad, loss, logits = A._gradient(model, x_adv, y, eot, before_draw=before_draw)
            wrong = logits.argmax(1) != y
            newly = wrong & ~fooled
            x_fooled[newly] = x_adv[newly]
            fooled |= wrong
            better = loss > best_loss
            best_loss = torch.where(better, loss, best_loss)
            x_best[better] = x_adv[better]
            if k + 1 in halvings:
                step = step / 2.0
        return torch.where(fooled.view(view), x_fooled, x_best).detach()


def _assg_before(model, x, y, eps, steps, eot=1, options=None):
    with A._eval_mode(model), A.AdaptiveSharpness(model, options) as sharp:
        return _sapgd_before(model, x, y, eps, steps, eot, before_draw=sharp.draw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gradient", ["own", "bptr"])
def test_apgd_sapgd_and_assg_are_as_before_bit_for_bit(trained, backend, gradient):
    """APGD (now APGD's iterations with a loss function) and SA-PGD / ASSG with restarts=1 give the
    images of the code before the change, and leave the RNG where it left it."""
    model, images, labels = trained
    x, y = images[:24], labels[:24]
    eps = 8 / 255  # some images fooled, some not: both ends of "first fooled, else best loss"
    with _on_backend(model, backend), A.gradient_source(model, gradient):
        clean = _correct(model, x, y)
        cases = {"apgd": (lambda: A.apgd(model, x, y, eps, steps=4), lambda: _apgd_before(model, x, y, eps, steps=4)),
                 "sapgd": (lambda: A.sapgd(model, x, y, eps, steps=4, restarts=1, seed=5),
                           lambda: _sapgd_before(model, x, y, eps, steps=4))}
        for name, (new, old) in cases.items():
            torch.manual_seed(3)
            got, after_new = new(), torch.rand(4)
            torch.manual_seed(3)
            want, after_old = old(), torch.rand(4)
            assert torch.equal(got, want), name
            assert torch.equal(after_new, after_old), name
            fooled = clean & ~_correct(model, got, y)
            assert fooled.any() and (clean & ~fooled).any(), name
    if gradient == "own":
        options = A.ASSGOptions(level=0.4)
        with _on_backend(model, backend):
            torch.manual_seed(4)
            got = A.run_attack("assg", model, x, y, eps, steps=4, assg_options=options, seed=9)  # restarts=1
            torch.manual_seed(4)
            want = _assg_before(model, x, y, eps, 4, options=options)
        assert torch.equal(got, want)


# ---------------------------------------------------------------- APGD-T and the targeted DLR loss


def test_dlr_targeted_on_hand_made_logits():
    """-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12), pi the sorted logits."""
    z = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0],    # sorted 3, 2, 1, 0: -(3 - 2) / (3 - 0.5) = -0.4
                      [0.0, 4.0, 1.0, 2.0, 3.0]])    # sorted 4, 3, 2, 1: -(0 - 4) / (4 - 1.5) = 1.6
    y, t = torch.tensor([0, 0]), torch.tensor([2, 1])
    torch.testing.assert_close(A.dlr_targeted(z, y, t), torch.tensor([-0.4, 1.6]))
    # three classes: z_pi4 is the lowest logit, z_pi3: -(2 - 0) / (2 - 0) = -1
    torch.testing.assert_close(A.dlr_targeted(torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([0]),
                                              torch.tensor([1])), torch.tensor([-1.0]))
    # invariant to shifting and positive scaling of the logits
    g = torch.Generator().manual_seed(0)
    z = torch.randn(16, 10, generator=g, dtype=torch.float64)
    y, t = torch.randint(0, 10, (16,), generator=g), torch.randint(0, 10, (16,), generator=g)
    torch.testing.assert_close(A.dlr_targeted(3.5 * z - 7.0, y, t), A.dlr_targeted(z, y, t))
    with pytest.raises(ValueError, match="needs at least 3 classes"):
        A.dlr_targeted(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([1]))


class Linear3(nn.Module):
    """Three classes on 16-pixel images x = 0.5 + small noise: z0 = 0, z1 = 2 sum(x[:8]) - 8.5,
    z2 = 6 sum(x[8:]) - 25.5. Clean: class 0, then 1 (-0.5), then 2 (-1.5). Within eps 0.05, raising
    every pixel (what the cross-entropy's gradient says) makes class 2 the winner (z1 0.3, z2 0.9);
    raising x[:8] and lowering x[8:] makes class 1 the winner (z1 0.3, z2 -3.9)."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(3, 16)
        w[1, :8], w[2, 8:] = 2.0, 6.0
        self.fc = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.copy_(torch.tensor([0.0, -8.5, -25.5]))

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_apgd_t_on_a_linear_three_class_model_goes_to_the_target():
    model = Linear3().eval()
    g = torch.Generator().manual_seed(1)
    x = 0.5 + 0.005 * (2 * torch.rand(6, 1, 4, 4, generator=g) - 1)
    y = torch.zeros(6, dtype=torch.long)
    z_clean = model(x).detach()
    assert (z_clean.argsort(1, descending=True) == torch.tensor([0, 1, 2])).all()
    eps = 0.05
    for n_targets in (1, A.APGDT_TARGETS):  # the first target is class 1 (the highest other logit)
        torch.manual_seed(0)
        x_adv = A.apgd_targeted(model, x, y, eps, steps=20, n_targets=n_targets)
        assert float((x_adv - x).abs().max()) <= eps + 1e-6
        z = model(x_adv).detach()
        assert (z.argmax(1) == 1).all(), z  # fooled into the target, not into class 2
        assert ((z[:, 1] - z[:, 0]) > (z_clean[:, 1] - z_clean[:, 0])).all()
    torch.manual_seed(0)
    untargeted = model(A.apgd(model, x, y, eps, steps=20)).argmax(1)
    assert (untargeted == 2).all()  # the cross-entropy goes elsewhere: the targeting is what moved it


class TableModel(nn.Module):
    """Logits looked up by image: pixel 0 of image i holds i."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.table[x.flatten(1)[:, 0].round().long()] + 0 * self.p


def test_apgd_t_runs_each_target_on_the_images_still_correct(monkeypatch):
    """Targets in order of the clean logits (the true class left out); run j attacks only the images
    no earlier run fooled; an image fooled by any run counts (its image is that run's)."""
    table = torch.tensor([[5.0, 4, 3, 2, 1], [1, 5, 2, 4, 3], [3, 2, 5, 4, 1], [2, 3, 4, 5, 1]])
    y = torch.tensor([0, 1, 2, 4])  # image 3 misclassified (its true class has the lowest logit)
    x = torch.arange(4.0).view(4, 1, 1, 1)
    model = TableModel(table)
    seen, calls = [], []
    fools = [{0}, {2}, set(), set()]  # run 0 fools image 0, run 1 image 2

    def record_targets(z, y_, t):
        seen.append(t.tolist())
        return z.sum(1)

    def fake_apgd(model, xs, ys, eps, steps, eot, rho, momentum, loss):
        loss(torch.zeros(len(ys), 5), ys)
        run = len(calls)
        ids = xs.flatten(1)[:, 0].round().long().tolist()
        calls.append(ids)
        fooled = torch.tensor([i in fools[run] for i in ids])
        return xs + 100.0 * (run + 1), fooled  # marks which run made each image

    monkeypatch.setattr(A, "dlr_targeted", record_targets)
    monkeypatch.setattr(A, "_apgd", fake_apgd)
    out = A.apgd_targeted(model, x, y, 0.1, steps=3, n_targets=3)
    assert calls == [[0, 1, 2, 3], [1, 2, 3], [1, 3]]
    assert seen == [[1, 3, 3, 3], [4, 0, 2], [2, 1]]
    assert out.flatten().tolist() == [100.0, 101.0, 202.0, 103.0]  # fooled: its run; else the first run's
    monkeypatch.undo()
    with pytest.raises(ValueError, match="needs at least 3 classes"):
        A.apgd_targeted(TableModel(table[:, :2]), x, torch.zeros(4, dtype=torch.long), 0.1, steps=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apgd_t_is_repeatable_and_finds_images(trained, backend):
    model, images, labels = trained
    x, y = images[:16], labels[:16]
    runs = []
    with _on_backend(model, backend):
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(A.run_attack("apgd-t", model, x, y, 8 / 255, steps=3, gradient="fitted"))
        clean = _correct(model, x, y)
        still = clean & _correct(model, runs[0], y)
    assert torch.equal(runs[0], runs[1])
    x_adv = runs[0]
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6 and 0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1
    assert still.sum() < clean.sum()  # it fools some of them


# ---------------------------------------------------------------- the straight-through and fitted sources


class OneLIF(nn.Module):
    """x [B, 1, 2, 2] -> Linear(4, 3) -> the same current for T steps -> LIF (tau 2, v_th 1, hard
    reset to 0, reset not detached) -> Linear(3, 3) -> mean over T."""

    def __init__(self, T=2, backend="torch", dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.T = T
        self.fc1 = nn.Linear(4, 3, bias=False)
        self.lif = mt.LIF(backend=backend)
        self.fc2 = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(3.0 * torch.randn(3, 4, generator=g))
            self.fc2.weight.copy_(torch.randn(3, 3, generator=g))
        self.to(dtype)

    def forward(self, x):
        a = self.fc1(x.flatten(1))
        s = self.lif(a.unsqueeze(0).expand(self.T, *a.shape))
        return self.fc2(s).mean(0)


def _hand_gradient(model, x, y, derivative):
    """d CE / dx of OneLIF (T = 2) with d s_t / d u_t := derivative(t, u_t), by hand:
    h1 = a/2, v1 = h1 (1 - s1), h2 = v1/2 + a/2, u_t = h_t - 1; dCE/ds_t = W2^T (p - e_y) / 2."""
    W1, W2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    a = x.flatten(1) @ W1.T
    h1 = a / 2
    s1 = (h1 >= 1).to(a.dtype)
    v1 = h1 * (1 - s1)
    h2 = v1 / 2 + a / 2
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    dl_ds = (p - nn.functional.one_hot(y, 3).to(a.dtype)) @ W2 / 2
    ds1_da = derivative(0, h1 - 1) / 2
    dv1_da = (1 - s1) / 2 - h1 * ds1_da
    ds2_da = derivative(1, h2 - 1) * (dv1_da / 2 + 0.5)
    return ((dl_ds * (ds1_da + ds2_da)) @ W1).view_as(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_straight_through_gradient_is_the_hand_computed_one(backend):
    """d spike / d u = 1 everywhere, through the reset too; the forward is unchanged."""
    model = OneLIF(backend=backend).eval()
    x = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    y = torch.arange(8) % 3
    with torch.no_grad():
        before = model(x)
    with A.gradient_source(model, "ste"):
        with torch.no_grad():
            assert torch.equal(model(x), before)
        got, _ = A.input_gradient(model, x, y)
    want = _hand_gradient(model, x, y, lambda t, u: torch.ones_like(u))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    own, _ = A.input_gradient(model, x, y)
    assert not torch.allclose(own, got)
    assert not model._forward_pre_hooks and not model.lif._forward_hooks  # removed on exit


def _u(model, x):
    """u = h - V_th of OneLIF's LIF on x, [T, B, 3] (the reference)."""
    a = model.fc1(x.flatten(1)).detach()
    return mt.lif_reference(a.unsqueeze(0).expand(model.T, *a.shape).float(), model.lif.config).u


@pytest.mark.parametrize("width", [1.0, 2.5])
def test_fitted_window_is_the_batch_mean_and_std_and_its_gradient_the_hand_computed_one(width):
    model = OneLIF().eval()
    x = torch.rand(16, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    y = torch.arange(16) % 3
    u = _u(model, x)
    mean, std = u.mean(dim=(0, 1)), u.std(dim=(0, 1), correction=0)
    with A.gradient_source(model, "fitted", x, fitted_width=width) as m:
        pass
    with A.FittedWindow(model, x, width) as fitted:
        (centre, half_width), = fitted.windows().values()
        torch.testing.assert_close(centre, mean)
        torch.testing.assert_close(half_width, width * std)
        got, _ = A.input_gradient(model, x, y)
        # the window stays where the clean batch put it, whatever the attack feeds the model
        A.input_gradient(model, (x + 0.3).clamp(0, 1), y)
        torch.testing.assert_close(fitted.windows()[(0, 0)][0], mean)
    assert m is model

    def fitted_derivative(t, u_t):  # atan of window `width` std around the mean, as in the docstring
        alpha = 6.0 / (math.pi * width * std)
        z = math.pi / 2 * alpha * (u_t - mean)
        return alpha / 2 / (1 + z * z)

    torch.testing.assert_close(got, _hand_gradient(model, x, y, fitted_derivative), rtol=1e-5, atol=1e-6)


def test_fitted_gradient_is_the_finite_difference_of_the_smoothed_model():
    """T = 1 (no reset in the path) and a linear loss: the fitted pseudo-gradient is the exact gradient
    of the model whose spike is the smoothed step S(u) = 1/2 + arctan(pi/2 a_c (u - m_c)) / pi (S' is
    the fitted derivative), which central differences in float64 measure independently."""
    model = OneLIF(T=1, dtype=torch.float64).eval()
    x = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    with A.FittedWindow(model, x) as fitted:
        (centre, half_width), = fitted.windows().values()
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((model(xi) @ c).sum(), xi)
    centre, alpha = centre.double(), 6.0 / (math.pi * half_width.double())

    def smooth(x):  # per image
        u = x.flatten(1) @ model.fc1.weight.detach().T / 2 - 1  # h = a / 2 (tau 2, v = 0), u = h - 1
        s = 0.5 + torch.atan(math.pi / 2 * alpha * (u - centre)) / math.pi
        return (s @ model.fc2.weight.detach().T) @ c

    fd = torch.zeros_like(x).flatten(1)
    h = 1e-6
    for i in range(fd.shape[1]):
        e = torch.zeros_like(fd)
        e[:, i] = h
        fd[:, i] = (smooth(x + e.view_as(x)) - smooth(x - e.view_as(x))) / (2 * h)
    torch.testing.assert_close(g, fd.view_as(x), rtol=1e-6, atol=1e-9)
    assert g.abs().sum() > 0


def test_fitted_windows_per_layer_call_and_channel_on_the_small_snn():
    """On the small SNN (convolutions: channel = dim 2 of [T, B, C, H, W]; the hidden Linear's LIF:
    the feature), one window per (layer, call), each channel's the mean and std of u over time steps,
    images and positions of the clean batch."""
    model = _snn()
    x, _ = _batch(12)
    layers = model.lif_layers()
    seen = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: seen.setdefault(i, args[0].detach()))
             for i, layer in enumerate(layers)]
    with A.FittedWindow(model, x) as fitted:
        windows = fitted.windows()
    for h in hooks:
        h.remove()
    assert set(windows) == {(i, 0) for i in range(len(layers))}
    for i, layer in enumerate(layers):
        u = mt.lif_reference(seen[i].float(), layer.config).u
        dims = tuple(d for d in range(u.dim()) if d != 2)
        centre, half_width = windows[(i, 0)]
        assert centre.shape == (u.shape[2],)
        torch.testing.assert_close(centre, u.mean(dim=dims))
        torch.testing.assert_close(half_width, u.std(dim=dims, correction=0).clamp_min(A.FITTED_MIN_STD))
    with pytest.raises(ValueError, match="measures the membrane potentials on the clean batch"):
        with A.gradient_source(model, "fitted"):
            pass
    with pytest.raises(ValueError, match="width must be a finite number > 0"):
        A.FittedWindow(model, x, 0.0)


@pytest.mark.parametrize("source", A.REFERENCE_GRADIENT_SOURCES)
def test_reference_sources_same_forward_same_gradient_on_every_backend_and_restored(source):
    """The forward stays the model's own (bit for bit); the gradient goes through the reference, so the
    torch and the C backend give the same one; the model is left as it was."""
    x, y = _batch(6)
    grads = {}
    for backend in BACKENDS:
        model = _snn(backend=backend)
        with torch.no_grad():
            before = model(x)
        own, _ = A.input_gradient(model, x, y)
        with A.gradient_source(model, source, x):
            with torch.no_grad():
                assert torch.equal(model(x), before)
            grads[backend], _ = A.input_gradient(model, x, y)
        assert grads[backend].abs().sum() > 0 and not torch.allclose(grads[backend], own)
        assert not model._forward_pre_hooks and not any(m._forward_hooks for m in model.lif_layers())
        again, _ = A.input_gradient(model, x, y)
        assert torch.equal(again, own)
    for backend in BACKENDS[1:]:
        torch.testing.assert_close(grads[backend], grads["torch"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- restarts


def test_with_restarts_reruns_the_unfooled_images_from_seeded_starts():
    """Run 1 takes the global RNG as it comes; run r >= 2 only the images not yet fooled, with the
    global RNG seeded from (seed, r); the global RNG is left as run 1 left it; per image the first
    fooling run's images."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0], [1.0]]))  # class 1 iff x > 0
    y = torch.zeros(5, dtype=torch.long)
    fools = [{1}, {0, 3}, set(), {4}]
    calls = []

    def attack(xs, ys):
        run = len(calls)
        ids = [int(round(-v)) - 100 for v in xs[:, 0].tolist()]  # image i is -(100 + i): class 0
        calls.append((ids, torch.rand(1).item()))
        out = xs.clone()
        for k, i in enumerate(ids):  # fooled: 10 x run (class 1); else marked by its run, still class 0
            out[k] = 10.0 * (run + 1) if i in fools[run] else xs[k] - 1000.0 * (run + 1)
        return out

    x = -torch.arange(100.0, 105.0).view(5, 1)
    torch.manual_seed(9)
    out = A._with_restarts(attack, model, x, y, restarts=4, seed=7)
    after = torch.rand(1)
    torch.manual_seed(9)
    first_draw = torch.rand(1).item()
    assert torch.equal(after, torch.rand(1))  # the RNG is where run 1 left it
    assert calls[0] == ([0, 1, 2, 3, 4], first_draw)
    assert [c[0] for c in calls[1:]] == [[0, 2, 3, 4], [2, 4], [2, 4]]
    for run in (1, 2, 3):
        torch.manual_seed(A._restart_seed(7, run))
        assert calls[run][1] == torch.rand(1).item()
    assert out[:, 0].tolist() == [20.0, 10.0, -1102.0, 20.0, 40.0]  # fooled by runs 2, 1, none, 2, 4
    with pytest.raises(ValueError, match="restarts must be an integer >= 1"):
        A._with_restarts(attack, model, x, y, restarts=0, seed=0)


@pytest.mark.parametrize("attack", A.RESTART_ATTACKS)
def test_more_restarts_are_never_weaker_per_image_and_repeatable(trained, attack, monkeypatch):
    """Per image, 3 runs fool every image 1 run fooled (with run 1's images) and keep run 1's images
    where no run fooled it; runs 2 and 3 attack only the images still correct; repeatable."""
    model, images, labels = trained
    x, y = images[:48], labels[:48]
    eps = 4 / 255
    sizes = []
    one_run = A._sapgd

    def counted(model, x, *args, **kwargs):
        sizes.append(x.shape[0])
        return one_run(model, x, *args, **kwargs)

    monkeypatch.setattr(A, "_sapgd", counted)
    results, runs = {}, {}
    for restarts in (1, 3, 3):
        sizes.clear()
        torch.manual_seed(0)
        x_adv = A.run_attack(attack, model, x, y, eps, steps=3, restarts=restarts, seed=5)
        assert float((x_adv - x).abs().max()) <= eps + 1e-6
        if restarts in results:
            assert torch.equal(x_adv, results[restarts])  # repeatable
        results[restarts], runs[restarts] = x_adv, list(sizes)
    wrong = {r: ~_correct(model, results[r], y) for r in (1, 3)}
    assert not (wrong[1] & ~wrong[3]).any()  # every image run 1 fooled stays fooled
    assert torch.equal(results[3][wrong[1]], results[1][wrong[1]])  # ... by run 1's own images
    assert torch.equal(results[3][~wrong[3]], results[1][~wrong[3]])  # never fooled: run 1's images
    assert runs[1] == [48] and len(runs[3]) == 3
    assert runs[3][:2] == [48, int((~wrong[1]).sum())] and runs[3][2] <= runs[3][1]
    assert 0 < int((~wrong[3]).sum())  # images left for the restarts: the runs above attacked them
    with pytest.raises(ValueError, match="before_draw"):
        A.sapgd(model, x, y, eps, steps=1, before_draw=lambda i: None, restarts=2)


def test_evaluation_gives_sapgd_and_assg_their_restarts_and_seeds(monkeypatch):
    """Every SA-PGD and ASSG + SA-PGD run of the evaluation gets --restarts and the batch's seed (seed +
    its first image); the eps = 1 checks run once."""
    import mpd_triton.attacks.evaluation as R

    calls = []

    def fake_attack(name, model, x, y, eps, restarts=1, seed=0, first_run=None, **kw):
        calls.append((name, eps, restarts, seed))
        if first_run is not None:
            first_run.append(x)
        return x

    monkeypatch.setattr(R, "run_attack", fake_attack)
    x, y = _batch(10)
    settings = EvalSettings(attacks=["sapgd", "assg"], eps=[0.1], restarts=4, seed=3, batch_size=6,
                            assg_levels=[0.4, 0.45])
    evaluate_robustness(_snn(), x, y, settings, progress=False)
    assert [c for c in calls if c[1] == 0.1] == [("sapgd", 0.1, 4, 3), ("assg", 0.1, 4, 3), ("assg", 0.1, 4, 3),
                                                 ("sapgd", 0.1, 4, 9), ("assg", 0.1, 4, 9), ("assg", 0.1, 4, 9)]
    assert {c[0] for c in calls if c[1] == 1.0} == {"pgd", "assg"} and all(c[2] == 1 for c in calls if c[1] == 1.0)


# ---------------------------------------------------------------- the evaluation and train.eval


def test_evaluation_masks_checks_and_restarts():
    """apgd-t and the ste / fitted sources have their own per-image masks, robust <= clean; with
    restarts the SA-PGD and ASSG masks only lose images, and every other attack's mask stays as it
    was (pgd after assg: the restarts do not move the RNG the later attacks draw from)."""
    model = _snn()
    x, y = _batch(20, seed=6, model=model)
    base = dict(attacks=["fgsm", "apgd-t", "sapgd", "assg", "pgd"], eps=[32 / 255, 64 / 255], steps=3,
                apgd_steps=2, sapgd_steps=3, gradients=["own", "ste", "fitted"], batch_size=12)
    r1 = evaluate_robustness(model, x, y, EvalSettings(**base), progress=False)
    r3 = evaluate_robustness(model, x, y, EvalSettings(**base, restarts=3), progress=False)
    assert r1["settings"]["restarts"] == 1 and r3["settings"]["restarts"] == 3
    n = r1["n"]
    for r in (r1, r3):
        survived = r["per_image"]["survived"]
        for eps in (f"{32 / 255:.6g}", f"{64 / 255:.6g}"):
            assert set(survived["apgd-t"][eps]) == {"own", "ste", "fitted", "worst"}
            for attack, by_eps in r["accuracy"].items():
                assert by_eps[eps] <= r["clean"]
            for source, share in r["by_gradient"]["apgd-t"][eps].items():
                assert unpack_outcomes(survived["apgd-t"][eps][source], n).mean() == pytest.approx(share)
        assert "apgd-t" in r["by_gradient"] and set(r["by_gradient"]["sapgd"][eps]) == {"own", "ste", "fitted"}
    for attack in base["attacks"]:
        for eps, by_variant in r1["per_image"]["survived"][attack].items():
            for variant, text in by_variant.items():
                one = unpack_outcomes(text, n)
                three = unpack_outcomes(r3["per_image"]["survived"][attack][eps][variant], n)
                if attack in A.RESTART_ATTACKS:
                    assert not (three & ~one).any(), (attack, eps, variant)
                else:
                    assert (one == three).all(), (attack, eps, variant)
    # the restarted attacks' first run, recorded apart, is the attack without restarts, image for image
    assert r1["first_run"] is None and FIRST_RUN not in r1["per_image"]["survived"]["assg"][f"{32 / 255:.6g}"]
    assert set(r3["first_run"]) == set(A.RESTART_ATTACKS)
    for attack in A.RESTART_ATTACKS:
        for eps in r1["accuracy"][attack]:
            first = unpack_outcomes(r3["per_image"]["survived"][attack][eps][FIRST_RUN], n)
            assert (first == unpack_outcomes(r1["per_image"]["survived"][attack][eps]["worst"], n)).all()
            assert r3["first_run"][attack][eps] == r1["accuracy"][attack][eps]
    assert any(r3["accuracy"][a][e] < r3["first_run"][a][e] for a in A.RESTART_ATTACKS for e in r3["accuracy"][a]), \
        "no restart found an image the first run missed: the test no longer tells the two records apart"
    json.dumps(r3)


def test_sanity_checks_hold_apgd_t_to_fgsm_and_the_black_box_attacks_to_it():
    base = {"n": 1000, "accuracy": {"fgsm": {"0.03": 0.5}, "apgd-t": {"0.03": 0.3}, "square": {"0.03": 0.6}},
            "large_eps": {"eps": 1.0, "acc": 0.0}}
    assert all(c["passed"] for c in sanity_checks(base))
    weak = {**base, "accuracy": {**base["accuracy"], "apgd-t": {"0.03": 0.55}}}
    check = {c["name"]: c for c in sanity_checks(weak)}["iterative_beats_one_step"]
    assert not check["passed"] and "apgd-t 55.0% > fgsm 50.0%" in check["detail"]
    square_stronger = {**base, "accuracy": {**base["accuracy"], "square": {"0.03": 0.2}}}
    assert {c["name"]: c["passed"] for c in sanity_checks(square_stronger)}["white_box_strongest"] is False


def test_square_and_transfer_are_held_to_the_iterative_attacks_and_noise_to_fgsm_too():
    """On a robust model Square's thousands of queries (or an iterative attack on a source model) may beat
    one FGSM step without any masking: with FGSM as the only white-box attack they are not compared; noise
    that beats FGSM is still a failure."""
    only_fgsm = {"n": 1000, "accuracy": {"fgsm": {"0.03": 0.8}, "square": {"0.03": 0.64},
                                         "transfer": {"0.03": 0.7}}}
    assert "white_box_strongest" not in {c["name"] for c in sanity_checks(only_fgsm)}
    noisy = {**only_fgsm, "accuracy": {**only_fgsm["accuracy"], "gaussian": {"0.03": 0.6}}}
    check = {c["name"]: c for c in sanity_checks(noisy)}["white_box_strongest"]
    assert not check["passed"] and "gaussian 60.0% < white-box 80.0%" in check["detail"]
    assert "not compared: square, transfer" in check["detail"]
    # with an iterative white-box attack, Square below it fails and above it passes
    with_pgd = {"n": 1000, "accuracy": {"fgsm": {"0.03": 0.8}, "pgd": {"0.03": 0.55}, "square": {"0.03": 0.64}}}
    check = {c["name"]: c for c in sanity_checks(with_pgd)}["white_box_strongest"]
    assert check["passed"] and "not compared" not in check["detail"]
    below = {**with_pgd, "accuracy": {**with_pgd["accuracy"], "square": {"0.03": 0.5}}}
    check = {c["name"]: c for c in sanity_checks(below)}["white_box_strongest"]
    assert not check["passed"] and "square 50.0% < white-box 55.0%" in check["detail"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "a" / "model.pt")


def test_train_eval_runs_the_new_attacks_end_to_end(checkpoint, tmp_path, capsys):
    code = main(["--checkpoint", str(checkpoint), "--attacks", "fgsm,apgd-t,sapgd,assg", "--gradients",
                 "own,ste,fitted", "--restarts", "2", "--apgd-steps", "2", "--sapgd-steps", "2", "--eps", "8/255",
                 "--limit", "6", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "apgd-t @ 8/255" in out
    r = json.loads((tmp_path / "eval.json").read_text())["models"]["a"]
    key = f"{8 / 255:.6g}"
    assert r["settings"]["restarts"] == 2 and r["settings"]["gradients"] == ["own", "ste", "fitted"]
    assert set(r["per_image"]["survived"]["apgd-t"][key]) == {"own", "ste", "fitted", "worst"}
    assert set(r["per_image"]["survived"]["sapgd"][key]) == {"own", "ste", "fitted", "worst", FIRST_RUN}  # restarts=2
    assert set(r["first_run"]) == {"sapgd", "assg"}
    assert "iterative_beats_one_step" in {c["name"] for c in r["checks"]}
    md = (tmp_path / "eval.md").read_text()
    assert "restarts=2" in md and "the first of the 2 runs alone" in md and "| assg @ 8/255 |" in md


def test_resume_continues_an_evaluation_made_before_restarts_existed(checkpoint, tmp_path, capsys):
    """An eval.json whose settings have no 'restarts' (written before it existed) was made with one run:
    --resume continues it, and refuses it for --restarts 2."""
    argv = ["--checkpoint", str(checkpoint), "--attacks", "fgsm", "--eps", "8/255", "--limit", "4",
            "--no-large-eps-check", "--out", str(tmp_path)]
    assert main(argv) == 0
    path = tmp_path / "eval.json"
    saved = json.loads(path.read_text())
    del saved["key"]["settings"]["restarts"]
    path.write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    assert "evaluated before: kept" in capsys.readouterr().out
    path.write_text(json.dumps(saved))
    assert main(argv + ["--resume", "--restarts", "2"]) == 2
    assert "other settings (settings.restarts)" in capsys.readouterr().err


def test_help_names_the_new_attacks_sources_and_options():
    text = " ".join(build_parser().format_help().split())
    for shown in ("apgd-t (targeted APGD on the DLR loss, --apgd-steps iterations per target among the 9 most likely other classes)",
                  "ste: straight-through", "fitted: an arctangent window", "--restarts RESTARTS runs of SA-PGD and "
                  "ASSG + SA-PGD per image", "any run counts as fooled (default: 1)"):
        assert shown in text, shown
    for name in A.GRADIENT_SOURCES:
        assert name in text
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        EvalSettings(restarts=0)


def test_reference_sources_and_apgd_t_in_the_ball_on_the_poisson_model():
    """Poisson encoding (EOT 2): the fitted window is measured on one draw of the clean batch; every
    attack stays in the ball and the box."""
    model = _snn("poisson")
    x, y = _batch(4)
    for name, gradient in (("apgd-t", "fitted"), ("pgd", "ste"), ("sapgd", "fitted")):
        torch.manual_seed(0)
        x_adv = A.run_attack(name, model, x, y, 8 / 255, steps=2, eot=2, gradient=gradient, restarts=2)
        assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
        assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
    assert np.isfinite(x_adv.numpy()).all()


def test_reference_sources_run_a_compiled_model_eagerly():
    """Under "ste" / "fitted" a model run through torch.compile (train.eval's BatchCompiled) runs
    eagerly: nothing is compiled, and the gradient is the uncompiled model's."""
    from torch._dynamo.utils import counters

    from train.compiling import compile_for_batches

    model = _snn()
    x, y = _batch(8)
    wrapped = compile_for_batches(model, 8, True).eval()
    for source in A.REFERENCE_GRADIENT_SOURCES:
        with A.gradient_source(model, source, x):
            want, _ = A.input_gradient(model, x, y)
        graphs = counters["stats"]["unique_graphs"]
        with A.gradient_source(wrapped, source, x):
            got, _ = A.input_gradient(wrapped, x, y)
        assert counters["stats"]["unique_graphs"] == graphs
        assert torch.equal(got, want)
