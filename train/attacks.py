"""L-inf attacks on spiking models, on images in [0, 1] (conventions of torchattacks).

Every attack puts the model in eval mode and restores its mode afterwards,
leaves the parameters' .grad untouched, and returns images inside the eps ball
around x and inside [0, 1].

Gradient-based attacks (fgsm, pgd, bim, apgd) take the attacker's gradient
through ``gradient_source``:

- ``"own"``: backpropagation through time with the model's own surrogate;
- ``"triangle"``, ``"sigmoid"``, ``"atan"``, ...: BPTT with another surrogate
  (the forward is unchanged, only the backward differs);
- ``"bptr"``: backward through the firing rate (``mt.rate_backward``).

and ``eot`` > 1 averages the gradient over that many forward/backward passes
(expectation over transformation, for Poisson-encoded models whose forward is
random). Score-based and random attacks (square, gaussian, uniform) need no
gradient; ``transfer`` crafts PGD examples on a source model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

import mpd_triton as mt

__all__ = [
    "fgsm", "pgd", "bim", "apgd", "square", "gaussian_noise", "uniform_noise", "transfer", "input_gradient",
    "gradient_source", "GRADIENT_SOURCES", "GRADIENT_ATTACKS", "ATTACKS", "run_attack", "margin",
]

GRADIENT_ATTACKS = ("fgsm", "pgd", "bim", "apgd")
ATTACKS = GRADIENT_ATTACKS + ("gaussian", "uniform", "square", "transfer")
GRADIENT_SOURCES = ("own", "bptr") + mt.SURROGATE_NAMES


@contextmanager
def gradient_source(model: nn.Module, source: str):
    """Temporarily give every LIF layer the attacker's backward (see module docstring)."""
    if source not in GRADIENT_SOURCES:
        raise ValueError(f"unknown gradient source {source!r}; choose one of {', '.join(GRADIENT_SOURCES)}")
    layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
    saved = [(layer.config, layer.backward_mode) for layer in layers]
    try:
        for layer in layers:
            if source == "bptr":
                layer.backward_mode = "rate"
            elif source != "own":
                layer.surrogate = source
        yield model
    finally:
        for layer, (config, mode) in zip(layers, saved):
            layer.config, layer.backward_mode = config, mode


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


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eot: int = 1,
                   loss: str = "ce") -> tuple[torch.Tensor, torch.Tensor]:
    """-> (d loss / dx averaged over ``eot`` passes, per-image loss of the last pass).

    loss "ce": cross-entropy per image; "margin": max_{j != y} z_j - z_y (larger = closer to fooled).
    """
    grad = torch.zeros_like(x)
    for _ in range(eot):
        xi = x.detach().requires_grad_(True)
        z = _logits(model, xi)
        per_image = nn.functional.cross_entropy(z, y, reduction="none") if loss == "ce" else -margin(z, y)
        (g,) = torch.autograd.grad(per_image.sum(), xi)
        grad += g
    return grad / eot, per_image.detach()


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
        x = x.detach()
        B = x.shape[0]
        view = (B,) + (1,) * (x.dim() - 1)
        step = torch.full(view, 2.0 * eps, device=x.device)
        x_cur = _project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
        grad, loss = input_gradient(model, x_cur, y, eot)
        best_loss, x_best, grad_best = loss.clone(), x_cur.clone(), grad.clone()
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
            grad_next, loss_next = input_gradient(model, x_next, y, eot)
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


def transfer(source: nn.Module, x, y, eps: float, alpha: float, steps: int, eot: int = 1) -> torch.Tensor:
    """Black-box transfer: PGD examples crafted on an independently trained source model."""
    return pgd(source, x, y, eps, alpha, steps, eot=eot)


def run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 7,
               alpha: float = 0.01, eot: int = 1, gradient: str = "own", source: nn.Module | None = None,
               n_queries: int = 1000, seed: int = 0) -> torch.Tensor:
    """One attack by name on a batch; returns the adversarial images."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    g = torch.Generator().manual_seed(seed)
    if name in GRADIENT_ATTACKS:
        with gradient_source(model, gradient):
            if name == "fgsm":
                return fgsm(model, x, y, eps, eot=eot)
            if name == "pgd":
                return pgd(model, x, y, eps, alpha, steps, eot=eot)
            if name == "bim":
                return bim(model, x, y, eps, alpha, steps, eot=eot)
            return apgd(model, x, y, eps, steps=steps, eot=eot)
    if name == "gaussian":
        return gaussian_noise(model, x, y, eps, generator=g)
    if name == "uniform":
        return uniform_noise(model, x, y, eps, generator=g)
    if name == "square":
        return square(model, x, y, eps, n_queries=n_queries, generator=g)
    if source is None:
        raise ValueError("the transfer attack needs a source model (--source CHECKPOINT)")
    return transfer(source, x, y, eps, alpha, steps, eot=eot)
