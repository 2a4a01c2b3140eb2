"""Attacks on spiking networks, and the evaluation that the robustness of a spiking network needs.

    import mpd_triton as mt
    result = mt.attacks.evaluate(model, images, labels, eps=[8 / 255], suite="reliable")
    result["worst_case"]      # per eps: the share of images that survived every attack (report this)
    result["accuracy"]        # per attack and eps
    result["checks"]          # the gradient-masking sanity checks, each passed or not, with figures
    result["per_image"]       # which images survived what (bitmasks: unpack_outcomes)

Attacks through a fixed surrogate overstate the robustness of spiking networks (docs/study/README.md measured
9 to 39 points): the ``"reliable"`` suite takes APGD through an ensemble of five gradients (the model's
own surrogate, three others and BPTR), ASSG + SA-PGD (the attack whose surrogate adapts to the
membrane potentials) at three levels, Square (no gradient) and FGSM, and counts an image robust only if
it survives all of them. The conventions are torchattacks': images in [0, 1], the model returns
logits. A model that takes [T, B, ...] input (a SpikingJelly model converted with
``mt.from_spikingjelly``) is evaluated through ``TimeSteps(model, T)``.

The attacks themselves (``fgsm``, ``pgd``, ``apgd``, ``apgd_targeted``, ``sapgd``, ``assg``,
``square``, ``transfer``, the gradient sources and ``gradient_source``) are in ``methods``; the
evaluation (``evaluate_robustness``, the checks, per-image outcomes) in ``evaluation``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from .evaluation import (
    DEFAULT_ATTACKS,
    OUTCOMES_FORMAT,
    RESULTS_VERSION,
    EvalSettings,
    attack_steps,
    evaluate_robustness,
    pack_outcomes,
    parse_attacks,
    sanity_checks,
    unpack_outcomes,
)
from .methods import (
    APGDT_TARGETS,
    ASSG_LEVEL,
    ASSG_LEVEL_RANGE,
    ATTACKS,
    GRADIENT_ATTACKS,
    GRADIENT_SOURCES,
    SAPGD_STEPS,
    TRANSFER_ATTACKS,
    ASSGOptions,
    apgd,
    apgd_targeted,
    assg,
    bim,
    fgsm,
    gradient_source,
    input_gradient,
    pgd,
    run_attack,
    sapgd,
    square,
    transfer,
)
from .units import eps_label, parse_eps

__all__ = ["evaluate", "SUITES", "ENSEMBLE", "RELIABLE_ATTACKS", "RELIABLE_ASSG_LEVELS", "DEFAULT_ATTACKS",
           "PAPER_ATTACKS", "TimeSteps", "EvalSettings", "evaluate_robustness", "sanity_checks", "parse_attacks",
           "pack_outcomes", "unpack_outcomes", "OUTCOMES_FORMAT", "RESULTS_VERSION", "attack_steps", "eps_label",
           "parse_eps", "fgsm", "pgd", "bim", "apgd", "apgd_targeted", "sapgd", "assg", "square", "transfer",
           "run_attack", "input_gradient", "gradient_source", "ASSGOptions", "ATTACKS", "GRADIENT_ATTACKS",
           "GRADIENT_SOURCES", "TRANSFER_ATTACKS", "ASSG_LEVEL", "ASSG_LEVEL_RANGE", "SAPGD_STEPS", "APGDT_TARGETS"]

# The five gradients of the ensemble: BPTT through the model's own surrogate, through three others, and BPTR.
ENSEMBLE = ("own", "triangle", "sigmoid", "atan", "bptr")
# The strongest set in one call (FGSM only feeds the masking checks); transfer joins it when a source is given.
RELIABLE_ATTACKS = ("fgsm", "apgd", "assg", "square")
# ASSG's levels in the reliable set: the ends of the paper's search range and its default, as a per-image
# worst case (at least as strong as the best single level the paper's search would pick; docs/evaluation.md).
RELIABLE_ASSG_LEVELS = (ASSG_LEVEL_RANGE[0], ASSG_LEVEL, ASSG_LEVEL_RANGE[1])
# The MPD-SGR paper's protocol: FGSM, and PGD and BIM with 7 steps of 0.01, through the model's own surrogate.
PAPER_ATTACKS = ("fgsm", "pgd", "bim")

# What each suite sets (the rest are EvalSettings' defaults); ``evaluate``'s arguments override it.
SUITES: dict[str, dict] = {
    "default": dict(attacks=DEFAULT_ATTACKS, gradients=("own",)),
    "reliable": dict(attacks=RELIABLE_ATTACKS, gradients=ENSEMBLE, assg_levels=RELIABLE_ASSG_LEVELS),
    "paper": dict(attacks=PAPER_ATTACKS, gradients=("own",), steps=7, alpha=0.01),
}


class TimeSteps(nn.Module):
    """A model of [T, B, ...] input and [T, B, classes] output (a SpikingJelly network in multi-step mode,
    converted with ``mt.from_spikingjelly``) as one of images and logits: the image is repeated over the
    T steps (direct encoding) and the logits are averaged over them. Its stateful neurons must be
    ``mt.LIF`` (which start every call from rest): a SpikingJelly neuron left in it would carry its
    state from one call to the next."""

    def __init__(self, model: nn.Module, T: int):
        super().__init__()
        if not isinstance(T, int) or isinstance(T, bool) or T < 1:
            raise ValueError(f"T must be a whole number >= 1, got {T!r}")
        self.model, self.T = model, T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images.unsqueeze(0).expand(self.T, *images.shape))
        if out.dim() < 2 or out.shape[0] != self.T:
            raise ValueError(f"the wrapped model returned shape {tuple(out.shape)}; expected [T = {self.T}, B, classes]")
        return out.mean(0)


def _as_tensors(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, C, H, W] float in [0, 1], labels [N]) from tensors or from an iterable of (x, y) batches."""
    if isinstance(images, torch.Tensor):
        if labels is None:
            raise ValueError("labels are needed with a tensor of images (or pass a DataLoader of (images, labels))")
        labels = torch.as_tensor(labels)
    else:
        if labels is not None:
            raise ValueError("give labels only with a tensor of images; a DataLoader brings its own")
        xs, ys = [], []
        for batch in images:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("a DataLoader of (images, labels) batches expected")
            xs.append(batch[0])
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError("the DataLoader gave no images")
        images, labels = torch.cat(xs), torch.cat(ys)
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1] (torchattacks' convention), got {images.dtype}")
    if images.dim() < 2 or labels.shape != images.shape[:1]:
        raise ValueError(f"{images.shape[0] if images.dim() else 0} images but labels of shape {tuple(labels.shape)}")
    if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
        raise ValueError(f"images must lie in [0, 1] (torchattacks' convention; normalize inside the model), got "
                         f"values in [{float(images.min()):.3g}, {float(images.max()):.3g}]")
    return images, labels.long()


def evaluate(model: nn.Module, images: torch.Tensor | Iterable, labels: torch.Tensor | None = None, *,
             eps: Sequence[float] = (8 / 255,), suite: str = "default", attacks: Sequence[str] | None = None,
             gradients: Sequence[str] | None = None, assg_levels: Sequence[float] | None = None,
             steps: int | None = None, alpha: float | None = None, apgd_steps: int | None = None,
             sapgd_steps: int | None = None, restarts: int | None = None, eot: int | None = None,
             n_queries: int | None = None, source: nn.Module | None = None, transfer_attack: str | None = None,
             large_eps_check: bool = True, num_classes: int | None = None, batch_size: int = 250, seed: int = 0,
             progress: bool = True) -> dict:
    """Every attack of ``suite`` at every eps on (images, labels), in batches; returns the result dict of
    ``evaluate_robustness``: "clean", "accuracy" (per attack and eps), "worst_case" (per eps: every attack
    and every smaller eps survived), "by_gradient", "assg_by_level", "checks" and "all_checks_passed",
    "per_image" (bitmasks), "grad_l1", "settings".

    images: [N, C, H, W] in [0, 1] with labels [N], or a DataLoader (an iterable) of (images, labels).
    suite: "default" (FGSM, PGD, APGD, Gaussian noise, through the model's own surrogate), "reliable"
        (the strongest set, above), "paper" (the MPD-SGR paper's FGSM, PGD-7, BIM-7). Any of the
        keyword arguments after it overrides the suite's value; None keeps it.
    source: an independently trained model, for the "transfer" attack (it then joins "reliable").
    num_classes: for the checks' chance level; None: read from the model's output on one image.
    progress: a bar on a terminal, a line now and then in a log (mpd_triton.progress).
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    images, labels = _as_tensors(images, labels)
    chosen = {k: list(v) if isinstance(v, tuple) else v for k, v in SUITES[suite].items()}
    if suite == "reliable" and source is not None:
        chosen["attacks"] = chosen["attacks"] + ["transfer"]
    given = dict(attacks=attacks, gradients=gradients, assg_levels=assg_levels, steps=steps, alpha=alpha,
                 apgd_steps=apgd_steps, sapgd_steps=sapgd_steps, restarts=restarts, eot=eot, n_queries=n_queries,
                 transfer_attack=transfer_attack)
    chosen.update({k: list(v) if isinstance(v, (tuple, list)) else v for k, v in given.items() if v is not None})
    settings = EvalSettings(eps=[float(e) for e in eps], batch_size=batch_size, seed=seed,
                            large_eps_check=large_eps_check, **chosen)
    if num_classes is None:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            num_classes = int(model(images[:1].to(device)).shape[-1])
        model.train(was_training)
    return evaluate_robustness(model, images, labels, settings, source=source, num_classes=num_classes,
                               desc="evaluate", progress=progress)
