"""L-inf attacks on spiking models, on images in [0, 1] (conventions of torchattacks).

Every attack puts the model in eval mode and restores its mode afterwards,
leaves the parameters' .grad untouched, and returns images inside the eps ball
around x and inside [0, 1].

Gradient-based attacks (fgsm, pgd, bim, apgd, apgd-t, sapgd) take the attacker's gradient
through ``gradient_source``:

- ``"own"``: backpropagation through time with the model's own surrogate;
- ``"triangle"``, ``"sigmoid"``, ``"atan"``, ...: BPTT with another surrogate
  (the forward is unchanged, only the backward differs);
- ``"bptr"``: backward through the firing rate (``mt.rate_backward``);
- ``"ste"``: BPTT with the straight-through derivative d spike / d u = 1 everywhere
  (``StraightThrough``);
- ``"fitted"``: BPTT with an arctangent window centred on each channel's mean membrane
  potential on the clean batch and as wide as its spread there (``FittedWindow``), so that
  the window covers the potentials wherever a defence moved them.

and ``eot`` > 1 averages the gradient over that many forward/backward passes
(expectation over transformation, for Poisson-encoded models whose forward is
random). ``apgd-t`` (``apgd_targeted``) is APGD on the targeted DLR loss, once per
target class among the most likely other classes (AutoAttack's APGD-T).
``assg`` is SA-PGD through the adaptive-sharpness surrogate gradient
(ASSG) of Wang et al., "Towards Reliable Evaluation of Adversarial Robustness for
Spiking Neural Networks" (arXiv 2512.22522): its own gradient, whose surrogate
sharpness follows the membrane potentials the attack meets (``AdaptiveSharpness``;
docs/evaluation.md says what was implemented and where it departs from the paper).
SA-PGD and ASSG + SA-PGD take ``restarts``: more runs from new random starts, an image
counting as fooled if any run fools it.
Score-based and random attacks (square, gaussian, uniform) need no gradient;
``transfer`` crafts examples on a source model with one of ``TRANSFER_ATTACKS``
(PGD by default; APGD or ASSG + SA-PGD, so that the strongest white-box attack's
own examples can be tried on another model).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import mpd_triton as mt

__all__ = [
    "fgsm", "pgd", "bim", "apgd", "apgd_targeted", "sapgd", "assg", "square", "gaussian_noise", "uniform_noise",
    "transfer", "input_gradient", "gradient_source", "GRADIENT_SOURCES", "REFERENCE_GRADIENT_SOURCES",
    "GRADIENT_ATTACKS", "WHITE_BOX_ATTACKS", "ITERATIVE_ATTACKS", "FIXED_STEP_ATTACKS", "RESTART_ATTACKS", "ATTACKS",
    "TRANSFER_ATTACKS", "run_attack", "margin", "dlr_targeted", "ASSGOptions", "AdaptiveSharpness", "StraightThrough",
    "FittedWindow", "SAPGD_STEPS", "APGDT_TARGETS", "FITTED_WIDTH", "FITTED_MIN_STD", "sapgd_halvings",
]

# Attacks that take a gradient source (and so run once per source of an ensemble).
GRADIENT_ATTACKS = ("fgsm", "pgd", "bim", "apgd", "apgd-t", "sapgd")
# Every attack that follows the model's (surrogate) gradient: ASSG brings its own.
WHITE_BOX_ATTACKS = GRADIENT_ATTACKS + ("assg",)
ITERATIVE_ATTACKS = ("pgd", "bim", "apgd", "apgd-t", "sapgd", "assg")
# The attacks that take ``restarts`` (more runs from new random starts, a per-image worst case).
RESTART_ATTACKS = ("sapgd", "assg")
# The iterative attacks of a fixed step (--steps x --step-size): their budget may not reach eps.
FIXED_STEP_ATTACKS = ("pgd", "bim")
NOISE_ATTACKS = ("gaussian", "uniform")  # random perturbations: weaker than any gradient attack, FGSM included
ATTACKS = WHITE_BOX_ATTACKS + NOISE_ATTACKS + ("square", "transfer")
# What the transfer attack may run on its source model (with the source's own surrogate).
TRANSFER_ATTACKS = ("pgd", "apgd", "assg")
# The attacker's derivatives that no kernel evaluates: their backward goes through the reference LIF
# (``StraightThrough``, ``FittedWindow``).
REFERENCE_GRADIENT_SOURCES = ("ste", "fitted")
GRADIENT_SOURCES = ("own", "bptr") + mt.SURROGATE_NAMES + REFERENCE_GRADIENT_SOURCES
# APGD-T: target classes per image (the most likely other classes; fewer when the model has fewer).
APGDT_TARGETS = 9
# The fitted window: half-width FITTED_WIDTH x the channel's standard deviation of u, the standard
# deviation taken as at least FITTED_MIN_STD (a channel whose potentials do not vary).
FITTED_WIDTH, FITTED_MIN_STD = 1.0, 1e-3


@contextmanager
def gradient_source(model: nn.Module, source: str, x: torch.Tensor | None = None, *,
                    fitted_width: float = FITTED_WIDTH):
    """Temporarily give every LIF layer the attacker's backward (see module docstring).

    ``x``: the clean batch about to be attacked; ``"fitted"`` measures its windows on it (the
    other sources ignore it). ``fitted_width``: the fitted window's half-width in standard
    deviations (``FittedWindow``)."""
    if source not in GRADIENT_SOURCES:
        raise ValueError(f"unknown gradient source {source!r}; choose one of {', '.join(GRADIENT_SOURCES)}")
    if source in REFERENCE_GRADIENT_SOURCES:
        with (StraightThrough(model) if source == "ste" else FittedWindow(model, x, fitted_width)):
            yield model
        return
    layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
    saved = [(layer.config, layer.backward_mode, layer.surrogate_param) for layer in layers]
    try:
        for layer in layers:
            if source == "bptr":
                layer.backward_mode = "rate"
            elif source != "own":
                layer.surrogate = source
                layer.surrogate_param = None  # the named surrogate with its default parameter
        yield model
    finally:
        for layer, (config, mode, param) in zip(layers, saved):
            layer.config, layer.backward_mode, layer.surrogate_param = config, mode, param


class _PseudoDerivative(mt.Surrogate):
    """An attacker's d spike / d u for ``mt.lif_reference``: ``grad(u)`` is ``fn(u)``, u one time
    step's [B, C, *spatial] (or [B, F]). No kernel evaluates it (it has no kernel id), and it has
    no window (MPD-SGR never sees it)."""

    kind, name = -1, "attacker"

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(1.0, math.inf)
        self.fn = fn

    def grad(self, u, param=None):
        return self.fn(u)


class _ReferenceBackward:
    """Base of the attacker's gradients that the fused kernels cannot take ("ste", "fitted").

    For the duration of a ``with`` block every ``mt.LIF`` of the model keeps its forward (its
    output is the model's own spikes, from the layer's own backend, bit for bit), but the
    gradient of that output is taken through ``mt.lif_reference`` run on the layer's input with
    the layer's neuron (leak, threshold, reset and detach_reset as the model's) and the spike's
    derivative replaced by ``derivative(key, u)``: BPTT through the reference with the attacker's
    pseudo-derivative. key = (layer index, call of that layer within the model's forward pass),
    calls counted from 0 at every forward of the model (a forward pre-hook on it). Forward passes
    without gradient skip the reference. The reference computes the same u and spikes as the
    kernels (docs/design.md); were a spike to differ in the last bit, the forward would still be
    the model's and only that neuron's reset path in the backward would follow the reference's.

    Inside the block torch.compile is off (``torch.compiler.set_stance("force_eager")``: a compiled
    model runs eagerly). Compiled, the hooks give the same gradients (checked on the small SNN, torch
    2.14), but every new block (one per attacked batch and gradient source) has new hooks, which
    Dynamo guards on: the model would be compiled again for each, at a cost far above the reference's
    own (its loop over time steps runs in Python anyway).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
        self._calls = [0] * len(self.layers)
        self._hooks = []
        self._measuring = False
        self._stance = None

    def __enter__(self):
        self._stance = torch.compiler.set_stance("force_eager")
        self._stance.__enter__()
        self._hooks.append(self.model.register_forward_pre_hook(self._begin_pass))
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._stance is not None:
            self._stance.__exit__(None, None, None)
            self._stance = None
        return False

    def _begin_pass(self, module, args):
        self._calls = [0] * len(self.layers)

    def derivative(self, key: tuple[int, int], u: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _measure(self, key: tuple[int, int], layer: mt.LIF, x: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def _hook(self, i: int):
        def hook(layer, args, out):
            x = args[0]
            key = (i, self._calls[i])
            self._calls[i] += 1
            if self._measuring:
                with torch.no_grad():
                    self._measure(key, layer, x)
                return None
            if not (torch.is_grad_enabled() and x.requires_grad):
                return None  # no gradient asked for: the layer's own output
            config = dataclasses.replace(layer.config,
                                         surrogate=_PseudoDerivative(lambda u: self.derivative(key, u)))
            proxy = mt.lif_reference(x, config).spikes
            return out.detach() + (proxy - proxy.detach())

        return hook


class StraightThrough(_ReferenceBackward):
    """Gradient source ``"ste"``: BPTT with the straight-through estimator, d spike / d u := 1 for
    every neuron, time step and value of u (the Heaviside's derivative replaced by the identity's).

    No neuron is outside its window, so moving the potentials away from the threshold (what
    MPD-SGR does) cannot starve this gradient; it is also the crudest of the derivatives (it
    ignores how far a neuron is from firing). Everything else is the model's own BPTT (through
    the reset too, unless the model's neuron detaches it). See ``_ReferenceBackward`` for how it
    is installed.
    """

    def derivative(self, key, u):
        return torch.ones_like(u)


class FittedWindow(_ReferenceBackward):
    """Gradient source ``"fitted"``: a surrogate window fitted to where each channel's membrane
    potentials are on the batch under attack.

    On entering, one forward pass of the clean batch ``x`` (eval mode, no gradient) measures, per
    LIF layer, per call of that layer within the pass and per channel c (dim 2 of the layer's
    [T, B, C, *spatial] input; the feature of [T, B, F]), the mean m_c and the standard deviation
    s_c (biased, over time steps, images and positions) of u = h - V_th, recomputed from the
    layer's input by ``mt.lif_reference`` as ``AdaptiveSharpness`` does. During the attack the
    spike's derivative of a neuron of channel c is then the attacker's pseudo-derivative

        d s / d u := g_c(u) = (a_c / 2) / (1 + (pi/2 a_c (u - m_c))^2),   a_c = 6 / (pi w_c),
        w_c = width * max(s_c, FITTED_MIN_STD)

    the arctangent surrogate (``mt.ATan``) moved from the threshold (u = 0) to the channel's mean
    and scaled so that its window (where it falls to a tenth of its peak, mt's convention) is
    m_c +- w_c: one standard deviation by default (``width`` = ``FITTED_WIDTH`` = 1). It is the
    derivative of a smoothed step that rises across the channel's own distribution of
    potentials: the attacker treats each channel as if its threshold sat where its potentials
    are, so that every neuron that moves with the input passes gradient back, even where a
    defence (MPD-SGR) moved all potentials out of the model's own window. Like every mt
    surrogate it integrates to 1 over u, so layers and time steps weigh as in the model's own
    BPTT; unlike a triangle, its tails give some gradient to the neurons beyond the window.

    The statistics are measured once, on the clean batch, and stay fixed for the whole attack
    (they do not follow the iterates): that is what distinguishes this source from ASSG, whose
    sharpness follows the potentials the attack meets (and is centred on the threshold). They
    are per channel, so they apply to any subset of the batch (APGD-T attacks the images still
    correct). ``windows()`` returns them. See ``_ReferenceBackward`` for how it is installed.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor | None, width: float = FITTED_WIDTH):
        super().__init__(model)
        if not isinstance(x, torch.Tensor):
            raise ValueError("the fitted gradient source measures the membrane potentials on the clean batch "
                             "under attack: pass it (gradient_source(model, 'fitted', x))")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.0 < width < math.inf:
            raise ValueError(f"the fitted window's width must be a finite number > 0, got {width!r}")
        self.x, self.width = x.detach(), float(width)
        self.stats: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self):
        super().__enter__()
        self._measuring = True
        try:
            with torch.no_grad(), _eval_mode(self.model):
                self.model(self.x)
        except BaseException:
            self.__exit__()
            raise
        finally:
            self._measuring = False
        return self

    def _measure(self, key, layer, x):
        u = mt.lif_reference(x.detach().float(), layer.config).u
        dims = tuple(d for d in range(u.dim()) if d != 2)
        self.stats[key] = (u.mean(dim=dims), u.std(dim=dims, correction=0))

    def windows(self) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """{(layer, call): (centre m_c, half-width w_c)}, each of shape [C]."""
        return {key: (m, self.width * s.clamp_min(FITTED_MIN_STD)) for key, (m, s) in self.stats.items()}

    def derivative(self, key, u):
        if key not in self.stats:
            raise RuntimeError(f"fitted gradient: LIF layer {key[0]} was called {key[1] + 1} times in a forward "
                               "pass, more than on the clean batch it was fitted on")
        m, s = self.stats[key]
        shape = (1, -1) + (1,) * (u.dim() - 2)
        centre = m.view(shape).to(u.dtype)
        half_width = (self.width * s.clamp_min(FITTED_MIN_STD)).view(shape).to(u.dtype)
        alpha = _ATAN_ALPHA_TIMES_WINDOW / half_width
        return mt.ATan().grad(u - centre, alpha)


# mt.ATan's alpha x its window (g falls to WINDOW_PEAK_FRACTION of its peak at u = window): 6 / pi.
_ATAN_ALPHA_TIMES_WINDOW = 2.0 * math.sqrt(1.0 / mt.WINDOW_PEAK_FRACTION - 1.0) / math.pi


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _logits(model, x):
    return model(x).float()


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int = 1, loss="ce",
              before_draw=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d loss / dx averaged over ``eot`` passes, per-image loss and logits of the last pass).
    ``loss``: "ce", "margin" (``input_gradient``) or a function (logits, y) -> per-image loss.
    ``before_draw(i)`` is called before the i-th pass (ASSG updates its statistics on the first)."""
    grad = torch.zeros_like(x)
    for i in range(eot):
        if before_draw is not None:
            before_draw(i)
        xi = x.detach().requires_grad_(True)
        z = _logits(model, xi)
        if callable(loss):
            per_image = loss(z, y)
        else:
            per_image = nn.functional.cross_entropy(z, y, reduction="none") if loss == "ce" else -margin(z, y)
        (g,) = torch.autograd.grad(per_image.sum(), xi)
        grad += g
    return grad / eot, per_image.detach(), z.detach()


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int = 1,
                   loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d loss / dx averaged over ``eot`` passes, per-image loss of the last pass).

    loss "ce": cross-entropy per image; "margin": max_{j != y} z_j - z_y (larger = closer to fooled).
    """
    grad, per_image, _ = _gradient(model, x, y, eot, loss)
    return grad, per_image


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j: negative once the image is misclassified."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.clone()
    other.scatter_(1, y[:, None], -math.inf)
    return true - other.max(1).values


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def fgsm(model, x, y, eps: float, eot: int = 1) -> torch.Tensor:
    """One signed-gradient step of size eps (Goodfellow et al. 2015)."""
    with _eval_mode(model):
        grad, _ = input_gradient(model, x, y, eot)
        return _project(x + eps * grad.sign(), x, eps).detach()


def pgd(model, x, y, eps: float, alpha: float, steps: int, random_start: bool = True, eot: int = 1) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy (Madry et al. 2018): a uniform random
    start in the eps ball, ``steps`` signed steps of size ``alpha``."""
    with _eval_mode(model):
        x_adv = x.detach().clone()
        if random_start:
            x_adv = _project(x_adv + torch.empty_like(x_adv).uniform_(-eps, eps), x, eps)
        for _ in range(steps):
            grad, _ = input_gradient(model, x_adv, y, eot)
            x_adv = _project(x_adv + alpha * grad.sign(), x, eps)
        return x_adv.detach()


def bim(model, x, y, eps: float, alpha: float, steps: int, eot: int = 1) -> torch.Tensor:
    """Basic iterative method (Kurakin et al. 2017): PGD without the random start."""
    return pgd(model, x, y, eps, alpha, steps, random_start=False, eot=eot)


def _apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein 2020)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(q * steps) for q in p[1:] if q <= 1.0 and math.ceil(q * steps) > 0})


def apgd(model, x, y, eps: float, steps: int = 100, eot: int = 1, rho: float = 0.75,
         momentum: float = 0.75) -> torch.Tensor:
    """APGD-CE (Croce & Hein 2020): PGD with momentum and a step size that starts at 2 eps and is
    halved at checkpoints where the loss stopped improving; restarts from the best point.

    Returns, per image, the first misclassified point found, else the point of highest loss.
    """
    with _eval_mode(model):
        return _apgd(model, x, y, eps, steps, eot, rho, momentum, "ce")[0]


def _apgd(model, x, y, eps: float, steps: int, eot: int, rho: float, momentum: float,
          loss) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD's iterations (the model already in eval mode), ascending ``loss`` (as ``_gradient`` takes
    it: "ce" or a function (logits, y) -> per-image loss) -> (per image the first misclassified point
    found, else the point of highest loss; which images some iterate misclassified)."""
    x = x.detach()
    B = x.shape[0]
    view = (B,) + (1,) * (x.dim() - 1)
    step = torch.full(view, 2.0 * eps, device=x.device)
    x_cur = _project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    grad, loss_cur, _ = _gradient(model, x_cur, y, eot, loss)
    best_loss, x_best, grad_best = loss_cur.clone(), x_cur.clone(), grad.clone()
    fooled = torch.zeros(B, dtype=torch.bool, device=x.device)
    x_fooled = x_cur.clone()

    def note_fooled(x_new):
        with torch.no_grad():
            wrong = _logits(model, x_new).argmax(1) != y
        newly = wrong & ~fooled
        x_fooled[newly] = x_new[newly]
        fooled.logical_or_(wrong)

    note_fooled(x_cur)
    x_prev = x_cur.clone()
    checkpoints = _apgd_checkpoints(steps)
    last_check, successes = 0, torch.zeros(B, device=x.device)
    loss_at_check, reduced_at_check = best_loss.clone(), torch.zeros(B, dtype=torch.bool, device=x.device)
    for k in range(steps):
        z = _project(x_cur + step * grad.sign(), x, eps)
        a = 1.0 if k == 0 else momentum
        x_next = _project(x_cur + a * (z - x_cur) + (1.0 - a) * (x_cur - x_prev), x, eps)
        grad_next, loss_next, _ = _gradient(model, x_next, y, eot, loss)
        note_fooled(x_next)
        successes += (loss_next > loss_cur).float()
        better = loss_next > best_loss
        best_loss = torch.where(better, loss_next, best_loss)
        x_best[better], grad_best[better] = x_next[better], grad_next[better]
        x_prev, x_cur, grad, loss_cur = x_cur, x_next, grad_next, loss_next
        if k + 1 in checkpoints:
            window = k + 1 - last_check
            stalled = successes < rho * window
            no_progress = (~reduced_at_check) & (best_loss <= loss_at_check)
            halve = stalled | no_progress
            step[halve] /= 2.0
            x_cur[halve], grad[halve], loss_cur[halve] = x_best[halve], grad_best[halve], best_loss[halve]
            x_prev[halve] = x_best[halve]
            last_check, successes = k + 1, torch.zeros_like(successes)
            loss_at_check, reduced_at_check = best_loss.clone(), halve
    return torch.where(fooled.view(view), x_fooled, x_best).detach(), fooled


DLR_EPS = 1e-12  # keeps the DLR loss finite where the logits tie


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The targeted DLR loss of Croce & Hein (2020), per image:

        -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

    with z_pi1 >= z_pi2 >= ... the sorted logits, y the true and t the target class: it grows as
    z_t overtakes z_y, and does not change when the logits are shifted or scaled by a positive
    factor. With 3 classes z_pi4 is taken as z_pi3 (the lowest logit); it needs at least 3 (with
    2 it would be the constant +-1)."""
    classes = logits.shape[1]
    if classes < 3:
        raise ValueError(f"the targeted DLR loss needs at least 3 classes, got {classes}")
    ranked = logits.sort(dim=1, descending=True).values
    scale = ranked[:, 0] - 0.5 * (ranked[:, 2] + ranked[:, min(3, classes - 1)]) + DLR_EPS
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_t = logits.gather(1, target[:, None])[:, 0]
    return -(z_y - z_t) / scale


def apgd_targeted(model, x, y, eps: float, steps: int = 100, eot: int = 1, n_targets: int = APGDT_TARGETS,
                  rho: float = 0.75, momentum: float = 0.75) -> torch.Tensor:
    """APGD-T (Croce & Hein 2020, as in AutoAttack): APGD (``apgd``'s iterations and step-size
    schedule, ``steps`` of them per target) on the targeted DLR loss (``dlr_targeted``), once per
    target class among the ``n_targets`` other classes of highest clean logit (all
    ``num_classes - 1`` when there are fewer), in that order; each run attacks only the images no
    earlier run has misclassified, each from its own uniform random start in the eps ball (the
    global RNG). An image counts as fooled if any run misclassifies it (into any class, as
    AutoAttack counts).

    Returns, per image, the first misclassified point found, else the first target's point of
    highest loss. Needs at least 3 classes.
    """
    if isinstance(n_targets, bool) or not isinstance(n_targets, int) or n_targets < 1:
        raise ValueError(f"n_targets must be an integer >= 1, got {n_targets!r}")
    with _eval_mode(model):
        x = x.detach()
        with torch.no_grad():
            clean = _logits(model, x)
        classes = clean.shape[1]
        if classes < 3:
            raise ValueError(f"apgd-t (the targeted DLR loss) needs at least 3 classes, got {classes}")
        others = clean.scatter(1, y[:, None], -math.inf)
        targets = others.sort(dim=1, descending=True, stable=True).indices[:, :min(n_targets, classes - 1)]
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        x_out = x.clone()
        for j in range(targets.shape[1]):
            todo = (~fooled).nonzero()[:, 0]
            if todo.numel() == 0:
                break
            target = targets[todo, j]
            x_j, fooled_j = _apgd(model, x[todo], y[todo], eps, steps, eot, rho, momentum,
                                  lambda z, y_, t=target: dlr_targeted(z, y_, t))
            keep = torch.ones_like(fooled_j) if j == 0 else fooled_j
            x_out[todo[keep]] = x_j[keep]
            fooled[todo[fooled_j]] = True
        return x_out.detach()


# ---------------------------------------------------------------- SA-PGD and ASSG (arXiv 2512.22522)

SAPGD_STEPS = 100  # the paper's budget
# SA-PGD's constants, as in the authors' code: decay of the L1-normalized momentum and of the
# normalized second moment; the step size starts at eps and is halved after 22% of the
# iterations, then at intervals that shrink by 3% of them down to 6%.
SAPGD_MOMENTUM, SAPGD_SECOND_MOMENT = 0.5, 0.8
SAPGD_FIRST_HALVING, SAPGD_INTERVAL_DECREASE, SAPGD_MIN_INTERVAL = 0.22, 0.03, 0.06
_TINY = 1e-12


def _per_image_mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(1).view((t.shape[0],) + (1,) * (t.dim() - 1))


def sapgd_halvings(steps: int) -> list[int]:
    """Iterations (1-based) after which SA-PGD halves its step: first after 22% of ``steps``, then at
    intervals 3% shorter each time, down to 6% (each at least one iteration)."""
    interval = max(int(SAPGD_FIRST_HALVING * steps), 1)
    decrease = max(int(SAPGD_INTERVAL_DECREASE * steps), 1)
    shortest = max(int(SAPGD_MIN_INTERVAL * steps), 1)
    out, k = [], interval
    while k <= steps:
        out.append(k)
        interval = max(interval - decrease, shortest)
        k += interval
    return out


def _restart_seed(seed: int, run: int) -> int:
    """The global RNG's seed for run ``run`` (1, 2, ...; run 0 takes the RNG as it comes) of an
    attack with restarts on the batch of ``seed``."""
    return (seed * 1_000_003 + run) % 2**63


def _with_restarts(attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: nn.Module,
                   x: torch.Tensor, y: torch.Tensor, restarts: int, seed: int,
                   first_run: list | None = None) -> torch.Tensor:
    """``attack(x, y)`` run ``restarts`` times, per image the worst case.

    The first run is ``attack(x, y)`` itself, with the global RNG as it comes (so ``restarts=1``
    is the attack as it is, bit for bit). Each further run attacks only the images no earlier run
    misclassified (checked by one forward pass in eval mode), from the attack's own random start
    drawn anew: the global RNG is reseeded with ``_restart_seed(seed, run)`` inside
    ``torch.random.fork_rng``, so the runs are repeatable and the global RNG after the call is as
    after the first run (later attacks of an evaluation draw what they would have drawn without
    restarts). Returns, per image, the first run's images where it misclassified them, else a
    later run's where one did, else the first run's. ``first_run``: a list that receives the first
    run's images (what the attack without restarts returns), to count both from one run.
    """
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    x_adv = attack(x, y)
    if first_run is not None:
        first_run.append(x_adv)
    if restarts == 1:
        return x_adv
    x_adv = x_adv.clone()
    devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
        if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _eval_mode(model):
        with torch.no_grad():
            fooled = _logits(model, x_adv).argmax(1) != y
        for run in range(1, restarts):
            todo = (~fooled).nonzero()[:, 0]
            if todo.numel() == 0:
                break
            torch.manual_seed(_restart_seed(seed, run))
            x_run = attack(x[todo], y[todo])
            with torch.no_grad():
                wrong = _logits(model, x_run).argmax(1) != y[todo]
            x_adv[todo[wrong]] = x_run[wrong]
            fooled[todo[wrong]] = True
    return x_adv


def sapgd(model, x, y, eps: float, steps: int = SAPGD_STEPS, eot: int = 1, before_draw=None, restarts: int = 1,
          seed: int = 0, first_run: list | None = None) -> torch.Tensor:
    """Stable Adaptive PGD (SA-PGD, Wang et al. 2025), L-inf, on the cross-entropy; with
    ``restarts`` > 1, more runs from new random starts (``_with_restarts``; ``seed`` seeds them;
    ``first_run`` receives the first run's images)."""
    if restarts != 1 and before_draw is not None:
        raise ValueError("sapgd: restarts run on subsets of the batch, which a before_draw hook's statistics "
                         "do not fit; restart the whole attack instead (as assg does)")
    return _with_restarts(lambda xs, ys: _sapgd(model, xs, ys, eps, steps, eot, before_draw), model, x, y,
                          restarts, seed, first_run)


def _sapgd(model, x, y, eps: float, steps: int = SAPGD_STEPS, eot: int = 1, before_draw=None) -> torch.Tensor:
    """Stable Adaptive PGD (SA-PGD, Wang et al. 2025), L-inf, on the cross-entropy: one run.

    From a random start on the surface of the eps ball (uniform noise scaled so that its largest
    entry is eps), each iteration, per image:

        g~ = g / mean|g|                       (L1-normalized gradient)
        m  = g~                 (first step),  m = 0.5 m + g~
        v  = g~^2 / mean(g~^2)  (first step),  v = 0.8 v + g~^2 / mean(g~^2)
        x  = P(x + clip(eta * m / (sqrt(v) + 1e-12), -eta, eta))

    with P the projection onto the eps ball and [0, 1], and the step eta = eps halved after the
    iterations of ``sapgd_halvings(steps)`` (for every image alike). ``before_draw``
    is passed to each gradient computation (ASSG's hook). Returns, per image, the first
    misclassified point found, else the point of highest loss.
    """
    with _eval_mode(model):
        x = x.detach()
        B = x.shape[0]
        view = (B,) + (1,) * (x.dim() - 1)
        noise = torch.empty_like(x).uniform_(-1.0, 1.0)
        noise = noise / noise.flatten(1).abs().amax(1).clamp_min(_TINY).view(view)
        x_adv = _project(x + eps * noise, x, eps)
        grad, loss, logits = _gradient(model, x_adv, y, eot, before_draw=before_draw)
        fooled = logits.argmax(1) != y
        x_fooled = x_adv.clone()
        best_loss, x_best = loss.clone(), x_adv.clone()
        step = torch.full(view, float(eps), device=x.device)
        halvings = set(sapgd_halvings(steps))
        m = v = None
        for k in range(steps):
            g = grad / _per_image_mean(grad.abs()).clamp_min(_TINY)
            g2 = g * g
            g2 = g2 / _per_image_mean(g2).clamp_min(_TINY)
            m = g if m is None else SAPGD_MOMENTUM * m + g
            v = g2 if v is None else SAPGD_SECOND_MOMENT * v + g2
            delta = torch.max(torch.min(step * m / (v.sqrt() + _TINY), step), -step)
            x_adv = _project(x_adv + delta, x, eps)
            grad, loss, logits = _gradient(model, x_adv, y, eot, before_draw=before_draw)
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


# ASSG's defaults and constants, those of the authors' code: the statistics start at M = 1,
# D = 0 (in units of u = h - V_th), and 1e-4 keeps the sharpness finite where |u| stays 0.
ASSG_LEVEL, ASSG_RELAX, ASSG_BETA1, ASSG_BETA2 = 0.425, 1.5, 0.9, 0.9
ASSG_INIT_M, ASSG_INIT_D, ASSG_EPS = 1.0, 0.0, 1e-4
ASSG_GRANULARITIES = ("neuron", "channel")
# The paper's search range of the level (its ternary search over the evaluation set).
ASSG_LEVEL_RANGE = (0.35, 0.49)


@dataclass(frozen=True)
class ASSGOptions:
    """Options of the adaptive-sharpness surrogate gradient.

    The surrogate is the arctangent one, g(u) = (alpha/2) / (1 + (pi/2 alpha u)^2) (``mt.ATan``),
    with, per neuron, time step and image, alpha = omega / (M + relax * D + 1e-4): M an exponential
    moving average over the attack's iterations of |u| (decay beta1), D one of ||u| - M| (decay
    beta2). ``level`` (the paper's A/2, in (0, 0.5)) sets omega = (2/pi) tan(pi * level): at
    |u| = M + relax * D the surrogate's smoothed step 1/2 + arctan(pi/2 alpha u)/pi has risen to
    1/2 + level. ``granularity`` "neuron" (the paper) keeps one alpha per element of [T, B, C,
    *spatial]; "channel" one per (time step, image, channel), from |u| averaged over positions.
    """

    level: float = ASSG_LEVEL
    relax: float = ASSG_RELAX
    beta1: float = ASSG_BETA1
    beta2: float = ASSG_BETA2
    granularity: str = "neuron"

    def __post_init__(self):
        for name in ("level", "relax", "beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise TypeError(f"ASSG {name} must be a real number, got {value!r}")
        if not 0.0 < self.level < 0.5:
            raise ValueError(f"ASSG level must be in (0, 0.5) (the paper's A/2; its default {ASSG_LEVEL}), "
                             f"got {self.level}")
        if not 0.0 <= self.relax < math.inf:
            raise ValueError(f"ASSG relax must be finite and >= 0, got {self.relax}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ASSG {name} must be in [0, 1) (a moving average's decay), got {getattr(self, name)}")
        if self.granularity not in ASSG_GRANULARITIES:
            raise ValueError(f"ASSG granularity must be one of {ASSG_GRANULARITIES}, got {self.granularity!r}")

    @property
    def omega(self) -> float:
        return 2.0 / math.pi * math.tan(math.pi * self.level)


class AdaptiveSharpness:
    """ASSG on every ``mt.LIF`` of a model for the duration of a ``with`` block.

    Each LIF gets the arctangent surrogate and, before each of its forward calls, a
    ``surrogate_param`` tensor alpha = omega / (M + relax D + 1e-4) from the statistics of the
    membrane potentials u of that very call (recomputed from the layer's input by the
    reference, without gradient) and of the earlier calls at the same place in earlier passes.
    Statistics are updated on passes begun with ``begin_pass(update=True)`` only (the first draw
    of an EOT average, as in the paper), and kept per (layer, call within the pass). One object
    per attacked batch: a new batch starts from M = 1, D = 0. A model without LIF layers is
    left as it is. Every layer's surrogate, backward mode and surrogate_param are restored on exit.
    """

    def __init__(self, model: nn.Module, options: ASSGOptions | None = None):
        self.options = options or ASSGOptions()
        self.layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
        self.stats: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.update = True
        self._calls = [0] * len(self.layers)
        self._hooks = []
        self._saved = []

    def __enter__(self):
        self._saved = [(layer.config, layer.backward_mode, layer.surrogate_param) for layer in self.layers]
        for i, layer in enumerate(self.layers):
            layer.surrogate = mt.ATan()  # its scalar alpha is replaced by the tensor in every call
            layer.backward_mode = "bptt"
            self._hooks.append(layer.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer, (config, mode, param) in zip(self.layers, self._saved):
            layer.config, layer.backward_mode, layer.surrogate_param = config, mode, param
        return False

    def begin_pass(self, update: bool = True) -> None:
        """Start a forward pass: calls are counted from 0; statistics move only if ``update``."""
        self._calls = [0] * len(self.layers)
        self.update = update

    def draw(self, i: int) -> None:
        """``before_draw`` hook of ``sapgd``: update the statistics on the first EOT draw only."""
        self.begin_pass(update=i == 0)

    def _abs_u(self, layer: mt.LIF, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        u = mt.lif_reference(x.detach().float(), layer.config).u
        a = u.abs()
        if self.options.granularity == "channel" and a.dim() > 3:
            return a.mean(dim=tuple(range(3, a.dim())), keepdim=True), a
        return a, None

    def _hook(self, i: int):
        opts = self.options

        def hook(layer, args):
            x = args[0]
            key = (i, self._calls[i])
            self._calls[i] += 1
            with torch.no_grad():
                a, per_element = self._abs_u(layer, x)
                if key not in self.stats:
                    self.stats[key] = (torch.full_like(a, ASSG_INIT_M), torch.full_like(a, ASSG_INIT_D))
                M, D = self.stats[key]
                if M.shape != a.shape:
                    raise RuntimeError(f"ASSG: LIF layer {i} got input of shape {tuple(x.shape)} after "
                                       f"{tuple(M.shape)}; use one AdaptiveSharpness per attacked batch")
                if self.update:
                    M = opts.beta1 * M + (1.0 - opts.beta1) * a
                    dev = (a - M).abs() if per_element is None else (per_element - M).abs().mean(
                        dim=tuple(range(3, per_element.dim())), keepdim=True)
                    D = opts.beta2 * D + (1.0 - opts.beta2) * dev
                    self.stats[key] = (M, D)
                layer.surrogate_param = opts.omega / (M + opts.relax * D + ASSG_EPS)

        return hook

    def sharpness(self) -> list[torch.Tensor]:
        """The alpha of each (layer, call) of the last pass, in layer order (for plots and tests)."""
        opts = self.options
        return [opts.omega / (M + opts.relax * D + ASSG_EPS) for _, (M, D) in sorted(self.stats.items())]


def assg(model, x, y, eps: float, steps: int = SAPGD_STEPS, eot: int = 1,
         options: ASSGOptions | None = None, restarts: int = 1, seed: int = 0,
         first_run: list | None = None) -> torch.Tensor:
    """SA-PGD through the adaptive-sharpness surrogate gradient (ASSG + SA-PGD, the paper's attack).
    ``restarts`` > 1: more runs from new random starts (``_with_restarts``; ``seed`` seeds them),
    each with its own ASSG statistics from M = 1, D = 0; ``first_run`` receives the first run's images."""

    def once(xs, ys):
        with _eval_mode(model), AdaptiveSharpness(model, options) as sharp:
            return _sapgd(model, xs, ys, eps, steps, eot, before_draw=sharp.draw)

    return _with_restarts(once, model, x, y, restarts, seed, first_run)


def _square_p(p_init: float, it: int, n_queries: int) -> float:
    """Share of pixels changed at iteration ``it``, the schedule of the Square attack rescaled to n_queries."""
    it = int(it / n_queries * 10_000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


@torch.no_grad()
def square(model, x, y, eps: float, n_queries: int = 1000, p_init: float = 0.05,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Square attack, L-inf (Andriushchenko et al. 2020): score-based random search that uses only
    the logits. Starts from vertical stripes of +-eps and keeps a random square update at the
    vertices of the eps ball when it lowers the margin z_y - max_{j != y} z_j."""
    with _eval_mode(model):
        x = x.detach()
        B, C, H, W = x.shape
        g = generator or torch.Generator().manual_seed(0)

        def rand_sign(*shape):
            return (torch.randint(0, 2, shape, generator=g).float() * 2 - 1).to(x.device)

        x_adv = _project(x + eps * rand_sign(B, C, 1, W), x, eps)
        m = margin(_logits(model, x_adv), y)
        for it in range(n_queries - 1):
            active = (m > 0).nonzero()[:, 0]
            if active.numel() == 0:
                break
            p = _square_p(p_init, it, n_queries)
            s = min(max(int(round(math.sqrt(p * H * W))), 1), H - 1 if H > 1 else 1, W - 1 if W > 1 else 1)
            top = int(torch.randint(0, H - s + 1, (1,), generator=g))
            left = int(torch.randint(0, W - s + 1, (1,), generator=g))
            xa, xc = x_adv[active], x[active]
            candidate = xa.clone()
            candidate[:, :, top:top + s, left:left + s] = xc[:, :, top:top + s, left:left + s] + eps * rand_sign(
                len(active), C, 1, 1)
            candidate = _project(candidate, xc, eps)
            m_new = margin(_logits(model, candidate), y[active])
            accept = m_new < m[active]
            x_adv[active[accept]] = candidate[accept]
            m[active[accept]] = m_new[accept]
        return x_adv


@torch.no_grad()
def gaussian_noise(model, x, y, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise with standard deviation eps, clipped to the eps ball and to [0, 1]."""
    g = generator or torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g).to(x.device) * eps
    return _project(x + noise, x, eps)


@torch.no_grad()
def uniform_noise(model, x, y, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise in [-eps, eps], clipped to [0, 1]."""
    g = generator or torch.Generator().manual_seed(0)
    noise = (torch.rand(x.shape, generator=g).to(x.device) * 2 - 1) * eps
    return _project(x + noise, x, eps)


def transfer(source: nn.Module, x, y, eps: float, alpha: float, steps: int, eot: int = 1, attack: str = "pgd",
             assg_options: ASSGOptions | None = None) -> torch.Tensor:
    """Black-box transfer: examples crafted on an independently trained source model by ``attack``
    (one of ``TRANSFER_ATTACKS``, through the source's own surrogate; ``steps`` is its iteration count)."""
    if attack == "pgd":
        return pgd(source, x, y, eps, alpha, steps, eot=eot)
    if attack == "apgd":
        return apgd(source, x, y, eps, steps=steps, eot=eot)
    if attack == "assg":
        return assg(source, x, y, eps, steps=steps, eot=eot, options=assg_options)
    raise ValueError(f"the transfer attack runs one of {', '.join(TRANSFER_ATTACKS)} on its source, not {attack!r}")


def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 7,
               alpha: float = 0.01, eot: int = 1, gradient: str = "own", source: nn.Module | None = None,
               n_queries: int = 1000, seed: int = 0, assg_options: ASSGOptions | None = None,
               transfer_attack: str = "pgd", restarts: int = 1, n_targets: int = APGDT_TARGETS,
               first_run: list | None = None) -> torch.Tensor:
    """One attack by name on a batch; returns the adversarial images. ``steps`` is the iteration
    count of every iterative attack (PGD, BIM, APGD, APGD-T per target, SA-PGD, ASSG; for
    ``transfer``, of ``transfer_attack`` on the source). ``restarts``: runs of SA-PGD and ASSG
    (``RESTART_ATTACKS``; the others ignore it), seeded by ``seed``; ``first_run``, a list, receives
    their first run's images. ``n_targets``: APGD-T's target classes."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    g = torch.Generator().manual_seed(seed)
    if name == "assg":
        return assg(model, x, y, eps, steps=steps, eot=eot, options=assg_options, restarts=restarts, seed=seed,
                    first_run=first_run)
    if name in GRADIENT_ATTACKS:
        with gradient_source(model, gradient, x):
            if name == "fgsm":
                return fgsm(model, x, y, eps, eot=eot)
            if name == "pgd":
                return pgd(model, x, y, eps, alpha, steps, eot=eot)
            if name == "bim":
                return bim(model, x, y, eps, alpha, steps, eot=eot)
            if name == "sapgd":
                return sapgd(model, x, y, eps, steps=steps, eot=eot, restarts=restarts, seed=seed,
                             first_run=first_run)
            if name == "apgd-t":
                return apgd_targeted(model, x, y, eps, steps=steps, eot=eot, n_targets=n_targets)
            return apgd(model, x, y, eps, steps=steps, eot=eot)
    if name == "gaussian":
        return gaussian_noise(model, x, y, eps, generator=g)
    if name == "uniform":
        return uniform_noise(model, x, y, eps, generator=g)
    if name == "square":
        return square(model, x, y, eps, n_queries=n_queries, generator=g)
    if source is None:
        raise ValueError("the transfer attack needs a source model (--source CHECKPOINT)")
    return transfer(source, x, y, eps, alpha, steps, eot=eot, attack=transfer_attack, assg_options=assg_options)
