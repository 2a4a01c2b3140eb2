"""Robustness evaluation: attacks over an eps list, the worst case over the attacker's
gradient sources, the input-gradient norm, and the gradient-masking sanity checks.

Robust accuracy counts an image only if it is classified correctly both clean
and under the attack (as AutoAttack does), so it never exceeds clean accuracy.
``worst_case[eps]`` counts an image only if it survives every attack at that
eps and at every smaller eps of the run (an example within a smaller eps is
within eps too, so an attack that finds less at a larger eps does not make
the image robust there): the number to report as robust accuracy; it never
rises with eps. The per-attack figures (``accuracy``) are each eps's own,
which the ``eps_monotone`` check compares.
With several gradient sources (``gradients=["own", "sigmoid", "bptr", ...]``)
an image counts as robust only if it survives every one of them (the
ensemble, a per-image worst case); the reported accuracy of a gradient attack
is that worst case. ASSG (``assg``) brings its own adaptive gradient and runs
once per level in ``assg_levels`` (a per-image worst case over them likewise).
``restarts`` > 1 runs SA-PGD and ASSG + SA-PGD that many times per image from new
random starts (an image fooled by any run counts as fooled; its mask keeps the
attack's usual key). APGD-T (``apgd-t``) runs once per target class within each
gradient source and counts as fooled an image any target's run fooled.

Sanity checks (Carlini et al. 2019; Athalye et al. 2018), each PASS / FAIL with figures:
- ``eps_monotone``: accuracy does not rise as eps grows (per attack);
- ``iterative_beats_one_step``: PGD / BIM / APGD / APGD-T / SA-PGD / ASSG are at least as strong as FGSM
  (PGD and BIM only at an eps their steps x step size can travel: 7 x 0.01 cannot reach eps = 0.1,
  and a weaker attack there is its budget, not masking; the detail names what was left out);
- ``white_box_strongest``: noise is weaker than the strongest white-box attack, and Square and transfer
  than the strongest iterative one (a many-query or iterative attack may beat FGSM on a robust model
  without any masking: with FGSM as the only white-box attack, Square and transfer are not compared);
- ``large_eps``: PGD with a very large eps (1.0: any image) brings accuracy near zero, and so does
  ASSG + SA-PGD when it is evaluated (its adaptive gradient must lead somewhere too).
A tolerance of max(1%, 2 images) absorbs the randomness of the random attacks.

Per-image outcomes: ``result["per_image"]`` holds, for the clean pass and for every count above
(each attack, eps and gradient source or ASSG level, each attack's per-image worst case, the worst
case over every attack, the large-eps check; with ``restarts`` > 1, also each restarted attack's first
run alone, under ``FIRST_RUN``: the attack without restarts, bit for bit), which images counted as
correct, as a bitmask
(``pack_outcomes``: bit i is image i of the evaluated images; ``unpack_outcomes`` reads it). Two
models evaluated on the same images can so be compared image by image (a paired test), and every
accuracy can be recounted from the file.

An evaluation can be continued: ``on_batch(state)`` receives, after every batch, what
``resume_state=state`` needs to go on from the next one (the counts so far and the RNG
state), to the same result as an evaluation that was never interrupted.
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..progress import Progress
from .methods import (
    ASSG_LEVEL,
    ATTACKS,
    FIXED_STEP_ATTACKS,
    GRADIENT_ATTACKS,
    GRADIENT_SOURCES,
    ITERATIVE_ATTACKS,
    NOISE_ATTACKS,
    RESTART_ATTACKS,
    SAPGD_STEPS,
    TRANSFER_ATTACKS,
    WHITE_BOX_ATTACKS,
    ASSGOptions,
    input_gradient,
    run_attack,
)
from .units import eps_label

# The evaluation's defaults, one set for the library, train.eval and train.run's end-of-run evaluation:
# cheap enough for every run, with APGD (the strongest of them) and a gradient-free check.
DEFAULT_ATTACKS = ("fgsm", "pgd", "apgd", "gaussian")

__all__ = ["EvalSettings", "evaluate_robustness", "sanity_checks", "parse_attacks", "DEFAULT_ATTACKS", "attack_steps",
           "RESULTS_VERSION", "pack_outcomes", "unpack_outcomes", "OUTCOMES_FORMAT"]

# How the counts are made, for train.eval --resume (an evaluation is continued only by code that
# counts the same way). 2 (2026-12-06): worst_case at an eps also needs survival at every smaller eps.
# 3 (2026-12-07): per-image outcomes (an interrupted state of version 2 has none to continue).
RESULTS_VERSION = 3
OUTCOMES_FORMAT = ("base64 of the bits of numpy.packbits(mask, bitorder='little'): bit i is image i of the "
                   "evaluated images (the first n of the test set); 1 = counted as correct")

# The names tools and earlier versions used for an attack that now has one name: said in the error.
_RENAMED = {"noise": "gaussian"}
# eps = 1 admits any image; 10 steps of 0.2 cross the whole [0, 1] box twice from the random start.
LARGE_EPS, LARGE_EPS_STEPS, LARGE_EPS_ALPHA = 1.0, 10, 0.2
_LARGE_EPS_NAMES = {"pgd": "PGD", "assg": "ASSG + SA-PGD"}


def parse_attacks(text: str) -> list[str]:
    """'fgsm, pgd' -> ["fgsm", "pgd"]: comma-separated attack names, each once, checked."""
    names = [a.strip().lower() for a in text.split(",") if a.strip()]
    for name in names:
        if name not in ATTACKS:
            hint = f" (it is called {_RENAMED[name]!r})" if name in _RENAMED else ""
            raise ValueError(f"unknown attack {name!r}{hint}; choose from {', '.join(ATTACKS)}")
    return list(dict.fromkeys(names))


@dataclass
class EvalSettings:
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    eps: list[float] = field(default_factory=lambda: [8 / 255])
    steps: int = 7
    alpha: float = 0.01
    apgd_steps: int = 50
    sapgd_steps: int = SAPGD_STEPS  # SA-PGD and ASSG iterations
    restarts: int = 1  # runs of SA-PGD and ASSG + SA-PGD per image (RESTART_ATTACKS), a per-image worst case
    assg_levels: list[float] = field(default_factory=lambda: [ASSG_LEVEL])
    gradients: list[str] = field(default_factory=lambda: ["own"])
    eot: int = 1
    n_queries: int = 1000
    batch_size: int = 250
    seed: int = 0
    large_eps_check: bool = True
    transfer_attack: str = "pgd"  # what ``transfer`` runs on the source model (ASSG: at every level)

    def __post_init__(self):
        for a in self.attacks:
            if a not in ATTACKS:
                raise ValueError(f"unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
        for g in self.gradients:
            if g not in GRADIENT_SOURCES:
                raise ValueError(f"unknown gradient source {g!r}; choose from {', '.join(GRADIENT_SOURCES)}")
        for e in self.eps:
            if not 0.0 <= e <= 1.0:
                raise ValueError(f"eps must be in [0, 1] (images are in [0, 1]), got {e}")
        for name in ("steps", "apgd_steps", "sapgd_steps", "restarts", "eot", "n_queries", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.assg_levels:
            raise ValueError("assg_levels must list at least one ASSG level")
        for level in self.assg_levels:
            ASSGOptions(level=level)  # its message names the valid range
        if self.transfer_attack not in TRANSFER_ATTACKS:
            raise ValueError(f"the transfer attack runs one of {', '.join(TRANSFER_ATTACKS)} on the source model, "
                             f"not {self.transfer_attack!r}")
        if not self.alpha > 0:
            raise ValueError(f"step size must be > 0, got {self.alpha}")


# The per-image and "first_run" entry of an attack run with restarts: its first run alone (the attack
# without restarts, bit for bit: methods._with_restarts), per image the worst case over gradients or levels.
FIRST_RUN = "first_run"


def eps_key(eps: float) -> str:
    """How a result (and eval.json) keys an eps: six significant digits, '0.0313725' for 8/255."""
    return f"{eps:.6g}"


_key = eps_key


def _level_key(level: float) -> str:
    return f"{level:g}"


def attack_steps(settings: EvalSettings, attack: str) -> int:
    """The iteration budget of an attack under these settings (transfer: of the attack it runs on its source)."""
    if attack == "transfer":
        attack = settings.transfer_attack
    return {"apgd": settings.apgd_steps, "apgd-t": settings.apgd_steps, "sapgd": settings.sapgd_steps,
            "assg": settings.sapgd_steps}.get(attack, settings.steps)


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def pack_outcomes(mask: torch.Tensor | np.ndarray) -> str:
    """A boolean vector (one entry per image) as a short string: see OUTCOMES_FORMAT."""
    bits = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool).reshape(-1)
    return base64.b64encode(np.packbits(bits, bitorder="little").tobytes()).decode("ascii")


def unpack_outcomes(text: str, n: int) -> np.ndarray:
    """The boolean vector of ``n`` images that ``pack_outcomes`` wrote."""
    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    if raw.size != (n + 7) // 8:
        raise ValueError(f"an outcome mask of {raw.size} bytes holds {8 * raw.size} images, not {n}")
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


def _rng_snapshot(device: torch.device) -> dict:
    """The global RNG states (Poisson encoding draws from them), JSON-ready."""
    encode = lambda t: base64.b64encode(t.numpy().tobytes()).decode("ascii")  # noqa: E731
    state = {"cpu": encode(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = encode(torch.cuda.get_rng_state(device))
    return state


def _restore_rng(state: dict, device: torch.device) -> None:
    decode = lambda text: torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(decode(state["cpu"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(decode(state["cuda"]), device)


def evaluate_robustness(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: EvalSettings,
                        *, source: nn.Module | None = None, num_classes: int = 10, desc: str = "attacks",
                        progress: bool = True, resume_state: dict | None = None,
                        on_batch: Callable[[dict], None] | None = None) -> dict:
    """Run every attack at every eps on (images, labels) in batches; returns a JSON-ready dict.

    on_batch(state) after every batch; resume_state: such a state, to continue from the batch after it."""
    if "transfer" in settings.attacks and source is None:
        raise ValueError("the transfer attack needs a source model")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)  # Poisson draws and random starts: repeatable
    n = images.shape[0]
    counts: dict[tuple, int] = {}
    outcomes: dict[tuple, torch.Tensor] = {}  # per image, the same keys as counts, and ("clean",)
    clean_total, grad_l1_total, first = 0, 0.0, 0
    if resume_state is not None:
        counts = {tuple(key): value for *key, value in resume_state["counts"]}
        outcomes = {tuple(key): torch.from_numpy(unpack_outcomes(text, n)) for *key, text in resume_state["outcomes"]}
        clean_total, grad_l1_total, first = resume_state["clean"], resume_state["grad_l1"], resume_state["next"]
        _restore_rng(resume_state["rng"], device)

    def record(key, start, ok):  # images start.. of this batch: which counted as correct
        counts[key] = counts.get(key, 0) + int(ok.sum())
        outcomes.setdefault(key, torch.zeros(n, dtype=torch.bool))[start:start + ok.numel()] = ok.cpu()

    batches = range(first, n, settings.batch_size)
    bar = Progress(batches, desc, "batches", scale=settings.batch_size, scale_unit="images", quiet=not progress)
    for start in bar:
        x = images[start:start + settings.batch_size].to(device)
        y = labels[start:start + settings.batch_size].to(device)
        clean = _correct(model, x, y)
        clean_total += int(clean.sum())
        outcomes.setdefault(("clean",), torch.zeros(n, dtype=torch.bool))[start:start + clean.numel()] = clean.cpu()
        grad, _ = input_gradient(model, x, y, settings.eot)
        grad_l1_total += float(grad.abs().flatten(1).sum(1).sum())
        survived_all = {_key(eps): clean.clone() for eps in settings.eps}
        for attack in settings.attacks:
            for eps in settings.eps:
                bar.set_postfix(f"{attack} @ {eps_label(eps)}")
                restarted = settings.restarts > 1 and attack in RESTART_ATTACKS
                first_survived = clean.clone()  # the first run of each, for attacks with restarts
                if attack in GRADIENT_ATTACKS:
                    survived = clean.clone()
                    for source_name in settings.gradients:
                        first: list = []
                        x_adv = run_attack(attack, model, x, y, eps, steps=attack_steps(settings, attack),
                                           alpha=settings.alpha, eot=settings.eot, gradient=source_name,
                                           seed=settings.seed + start, restarts=settings.restarts, first_run=first)
                        ok = clean & _correct(model, x_adv, y)
                        record((attack, _key(eps), source_name), start, ok)
                        survived &= ok
                        if restarted:
                            first_survived &= clean & _correct(model, first[0], y)
                elif attack == "assg":
                    survived = clean.clone()
                    for level in settings.assg_levels:
                        first = []
                        x_adv = run_attack("assg", model, x, y, eps, steps=attack_steps(settings, "assg"), eot=settings.eot,
                                           assg_options=ASSGOptions(level=level), restarts=settings.restarts,
                                           seed=settings.seed + start, first_run=first)
                        ok = clean & _correct(model, x_adv, y)
                        record((attack, _key(eps), _level_key(level)), start, ok)
                        survived &= ok
                        if restarted:
                            first_survived &= clean & _correct(model, first[0], y)
                elif attack == "transfer":  # ASSG on the source: every level (per-image worst case)
                    survived = clean.clone()
                    levels = settings.assg_levels if settings.transfer_attack == "assg" else [settings.assg_levels[0]]
                    for level in levels:
                        x_adv = run_attack("transfer", model, x, y, eps, steps=attack_steps(settings, "transfer"),
                                           alpha=settings.alpha, eot=settings.eot, source=source,
                                           transfer_attack=settings.transfer_attack,
                                           assg_options=ASSGOptions(level=level), seed=settings.seed + start)
                        survived &= _correct(model, x_adv, y)
                else:
                    x_adv = run_attack(attack, model, x, y, eps, steps=settings.steps, alpha=settings.alpha,
                                       eot=settings.eot, source=source, n_queries=settings.n_queries,
                                       seed=settings.seed + start)
                    survived = clean & _correct(model, x_adv, y)
                record((attack, _key(eps), "worst"), start, survived)
                if restarted:  # the same attack without restarts, read from this run (bit for bit what it gives)
                    record((attack, _key(eps), FIRST_RUN), start, first_survived)
                survived_all[_key(eps)] &= survived
        smaller = None  # robust at eps only if robust at every smaller eps (its examples are within eps too)
        for eps in sorted(settings.eps):
            if smaller is not None:
                survived_all[_key(eps)] &= smaller
            smaller = survived_all[_key(eps)]
        for eps_key, survived in survived_all.items():
            record(("all", eps_key, "worst"), start, survived)
        if settings.large_eps_check:
            bar.set_postfix(f"large-eps check (eps {LARGE_EPS:g})")
            survived = clean.clone()
            for source_name in settings.gradients:
                x_adv = run_attack("pgd", model, x, y, LARGE_EPS, steps=LARGE_EPS_STEPS, alpha=LARGE_EPS_ALPHA,
                                   eot=settings.eot, gradient=source_name, seed=settings.seed + start)
                survived &= _correct(model, x_adv, y)
            record(("large_eps", _key(LARGE_EPS), "worst"), start, survived)
            if "assg" in settings.attacks:
                x_adv = run_attack("assg", model, x, y, LARGE_EPS, steps=LARGE_EPS_STEPS, eot=settings.eot,
                                   assg_options=ASSGOptions(level=settings.assg_levels[0]))
                record(("large_eps", _key(LARGE_EPS), "assg"), start, clean & _correct(model, x_adv, y))
        if on_batch is not None:
            on_batch({"next": start + settings.batch_size, "counts": [[*key, value] for key, value in counts.items()],
                      "outcomes": [[*key, pack_outcomes(mask)] for key, mask in outcomes.items()],
                      "clean": clean_total, "grad_l1": grad_l1_total, "rng": _rng_snapshot(device)})
    model.train(was_training)

    accuracy = {a: {_key(e): counts[(a, _key(e), "worst")] / n for e in settings.eps} for a in settings.attacks}
    by_gradient = {a: {_key(e): {g: counts[(a, _key(e), g)] / n for g in settings.gradients} for e in settings.eps}
                   for a in settings.attacks if a in GRADIENT_ATTACKS}
    first_run = ({a: {_key(e): counts[(a, _key(e), FIRST_RUN)] / n for e in settings.eps}
                  for a in settings.attacks if a in RESTART_ATTACKS} if settings.restarts > 1 else None)
    by_level = ({_key(e): {_level_key(lv): counts[("assg", _key(e), _level_key(lv))] / n
                           for lv in settings.assg_levels} for e in settings.eps}
                if "assg" in settings.attacks else None)
    large_eps = None
    if settings.large_eps_check:
        # "acc": PGD over the gradient sources; "by_attack" adds ASSG + SA-PGD when it was evaluated
        pgd_large = counts[("large_eps", _key(LARGE_EPS), "worst")] / n
        large_eps = {"eps": LARGE_EPS, "steps": LARGE_EPS_STEPS, "alpha": LARGE_EPS_ALPHA, "acc": pgd_large,
                     "by_attack": {"pgd": pgd_large}}
        if "assg" in settings.attacks:
            large_eps["by_attack"]["assg"] = counts[("large_eps", _key(LARGE_EPS), "assg")] / n
    result = {
        "n": n, "clean": clean_total / n, "grad_l1": grad_l1_total / n, "settings": asdict(settings),
        "accuracy": accuracy, "by_gradient": by_gradient, "assg_by_level": by_level, "first_run": first_run,
        "worst_case": {_key(e): counts[("all", _key(e), "worst")] / n for e in settings.eps},
        "large_eps": large_eps,
        "per_image": _per_image(outcomes),
    }
    result["checks"] = sanity_checks(result, num_classes)
    result["all_checks_passed"] = all(c["passed"] for c in result["checks"])
    return result


def _per_image(outcomes: dict[tuple, torch.Tensor]) -> dict:
    """{"format", "clean": mask, "survived": {attack: {eps: {gradient, level or "worst": mask}}}}."""
    survived: dict = {}
    for key, mask in outcomes.items():
        if key == ("clean",):
            continue
        attack, eps, variant = key
        survived.setdefault(attack, {}).setdefault(eps, {})[variant] = pack_outcomes(mask)
    return {"format": OUTCOMES_FORMAT, "clean": pack_outcomes(outcomes[("clean",)]), "survived": survived}


def sanity_checks(result: dict, num_classes: int = 10) -> list[dict]:
    """The gradient-masking checks of the module docstring on an evaluate_robustness result."""
    n = result["n"]
    tol = max(0.01, 2.0 / max(n, 1))
    acc = result["accuracy"]
    checks = []

    within = f" (within {100 * tol:.1f} points, the tolerance for {n} images)"

    def check(name, failures, what):
        checks.append({"name": name, "passed": not failures, "detail": "; ".join(failures) if failures else what})

    failures = []
    for attack, by_eps in acc.items():
        eps_sorted = sorted(by_eps, key=float)
        for lo, hi in zip(eps_sorted, eps_sorted[1:]):
            if by_eps[hi] > by_eps[lo] + tol:
                failures.append(f"{attack}: {100 * by_eps[lo]:.1f}% at eps {lo} but {100 * by_eps[hi]:.1f}% at {hi}")
    if any(len(v) > 1 for v in acc.values()):
        check("eps_monotone", failures, "accuracy does not rise with eps for any attack" + within)

    failures, compared, short = [], False, []
    settings = result.get("settings", {})
    reach = settings["steps"] * settings["alpha"] if "steps" in settings and "alpha" in settings else None
    if "fgsm" in acc:
        for attack in ITERATIVE_ATTACKS:
            for eps, value in acc.get(attack, {}).items():
                if eps not in acc["fgsm"]:
                    continue
                if attack in FIXED_STEP_ATTACKS and reach is not None and reach < float(eps) * (1 - 1e-6):
                    short.append(f"{attack} at eps {eps}")
                    continue
                compared = True
                if value > acc["fgsm"][eps] + tol:
                    failures.append(f"{attack} {100 * value:.1f}% > fgsm {100 * acc['fgsm'][eps]:.1f}% at eps {eps}")
    if compared:
        note = (f"not compared: {', '.join(short)} ({settings['steps']} steps of {settings['alpha']:g} "
                "cannot travel that far)") if short else None
        check("iterative_beats_one_step", failures + ([note] if failures and note else []),
              "iterative attacks are at least as strong as FGSM" + within + (f"; {note}" if note else ""))

    failures, compared, unmatched = [], False, []
    white = [a for a in acc if a in WHITE_BOX_ATTACKS]
    for attack in (*NOISE_ATTACKS, "square", "transfer"):
        # noise must not beat even FGSM; Square's thousands of queries and an iterative attack on a source
        # model may, on a robust model, without any masking: they are held to the iterative white-box attacks
        reference = white if attack in NOISE_ATTACKS else [w for w in white if w in ITERATIVE_ATTACKS]
        for eps, value in acc.get(attack, {}).items():
            strongest = [acc[w][eps] for w in reference if eps in acc[w]]
            if strongest:
                compared = True
                if value < min(strongest) - tol:
                    failures.append(f"{attack} {100 * value:.1f}% < white-box {100 * min(strongest):.1f}% at eps {eps}")
            elif any(eps in acc[w] for w in white) and attack not in unmatched:
                unmatched.append(attack)
    if compared:
        note = (f"not compared: {', '.join(unmatched)} (no iterative white-box attack in this run)"
                if unmatched else None)
        check("white_box_strongest", failures + ([note] if failures and note else []),
              "noise, Square and transfer are weaker than the white-box attacks" + within
              + (f"; {note}" if note else ""))

    large = result.get("large_eps")
    if large is not None:
        limit = max(0.05, 0.5 / num_classes)
        by_attack = large.get("by_attack", {"pgd": large["acc"]})
        found = [f"{_LARGE_EPS_NAMES.get(a, a)} at eps {large['eps']} leaves {100 * v:.1f}% accuracy"
                 for a, v in by_attack.items()]
        failures = [f"{line} (> {100 * limit:.0f}%)" for line, v in zip(found, by_attack.values()) if v > limit]
        check("large_eps", failures, "; ".join(found))
    return checks
