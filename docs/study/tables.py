"""The study's tables recomputed from the committed result files, with 95% intervals over seeds and images.

    python docs/study/tables.py            # print every table
    python docs/study/tables.py --write    # rewrite the tables between their markers in docs/study/README.md
    python docs/study/tables.py --check    # exit 1 if docs/study/README.md differs from the files (a test runs it)
    python docs/study/tables.py --plot-at2 docs/study/figures/at2_retrained.png   # the AT 2/255 pair's figure
    python docs/study/tables.py --plot-validity docs/study/figures/validity.png   # the attack-validity study's figure

Each table reads the `eval.json` files that `train.eval` wrote (and the sweep's `sweep.json` for clean
accuracy on all 10,000 test images) under docs/study/data/. The intervals are the two-stage bootstrap of
docs/study/README.md's analysis (`train.stats`: seeds drawn with replacement, then images within each seed,
10,000 draws). A difference between the two recipes is paired image by image where both files hold each
image's outcome (results version 3), with the exact McNemar test per seed; where they do not, the two are
resampled independently (a wider interval) and the table says "unpaired".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root, for train and mpd_triton
from mpd_triton.attacks.evaluation import FIRST_RUN, eps_key, unpack_outcomes  # noqa: E402
from mpd_triton.attacks.units import eps_label  # noqa: E402
from train.stats import (  # noqa: E402
    Interval,
    bootstrap_difference,
    bootstrap_mean,
    bootstrap_unpaired_difference,
    mcnemar_exact,
)

DATA = ROOT / "docs" / "study" / "data"
STUDY = ROOT / "docs" / "study" / "README.md"
EPS = 8 / 255


@dataclass
class Outcome:
    """One model's per-image outcomes under one count (clean, an attack, or the worst case) at one eps."""

    mask: np.ndarray  # bool, one entry per image; the order is meaningful only when paired
    paired: bool  # True when read from the file's per-image record


def outcome(result: dict, attack: str, eps: float = EPS) -> Outcome:
    """``attack``: "clean", an attack of the run ("fgsm", "pgd", "apgd", "assg", ...) or "all" (the worst
    case over every attack at this and every smaller eps)."""
    n = result["n"]
    per_image = result.get("per_image")
    if per_image:
        text = per_image["clean"] if attack == "clean" else per_image["survived"][attack][eps_key(eps)]["worst"]
        return Outcome(unpack_outcomes(text, n), paired=True)
    if attack == "clean":
        acc = result["clean"]
    elif attack == "all":
        acc = result["worst_case"][eps_key(eps)]
    else:
        acc = result["accuracy"][attack][eps_key(eps)]
    k = int(round(acc * n))
    return Outcome(np.arange(n) < k, paired=False)  # k of n images: enough for a mean, not for pairing


def read_model(path: Path, name: str | None = None) -> dict:
    """The result of one model in an eval.json (its only model, or the one called ``name``)."""
    models = json.loads(path.read_text())["models"]
    if name in models:
        return models[name]
    if len(models) != 1:
        raise SystemExit(f"{path}: no model {name!r} among {', '.join(models)}")
    (result,) = models.values()
    return result


# --- the tables ---------------------------------------------------------------------------------------------

@dataclass
class Pair:
    """Two recipes (a: without MPD-SGR, b: with it) over seeds, each seed's two models on the same images."""

    title: str
    label_a: str
    label_b: str
    seeds: tuple[int, ...]
    files: dict  # seed -> (eval.json of a, eval.json of b, sweep.json or None)
    names: dict  # seed -> (name of a, name of b): the sweep's points, and the models in eval.json
    rows: tuple[tuple[str, str, float], ...]  # (row label, attack, eps)
    per_seed: tuple[tuple[str, str, str, str], ...] = ()  # (row label, "sweep" or "eval", key, format) after clean

    def available(self) -> list[int]:
        return [s for s in self.seeds if all(Path(f).is_file() for f in self.files[s][:2])]

    def markdown(self) -> str:
        seeds = self.available()
        missing = [s for s in self.seeds if s not in seeds]
        head = (f"| {self.title} | {self.label_a} | {self.label_b} | difference [95% interval] | "
                f"McNemar p, per seed |\n|---|---|---|---|---|")
        if not seeds:
            return head + "\n| (no seed has its files yet) | | | | |"
        lines = [head]
        clean = [self._clean10k(s) for s in seeds]
        if all(c is not None for c in clean):
            a = " / ".join(f"{100 * c[0]:.2f}" for c in clean)
            b = " / ".join(f"{100 * c[1]:.2f}" for c in clean)
            d = " / ".join(f"{100 * (c[1] - c[0]):+.2f}" for c in clean)
            lines.append(f"| clean, all 10,000 test images (per seed) | {a} | {b} | {d} | |")
        for label, source, key, fmt in self.per_seed:
            values = [self._value(s, source, key) for s in seeds]
            if all(v is not None for v in values):
                a = " / ".join(format(v[0], fmt) for v in values)
                b = " / ".join(format(v[1], fmt) for v in values)
                d = " / ".join(format(v[1] - v[0], "+" + fmt) for v in values)
                lines.append(f"| {label} (per seed) | {a} | {b} | {d} | |")
        for label, attack, eps in self.rows:
            a_out, b_out = [], []
            for s in seeds:
                (fa, fb, _), (na, nb) = self.files[s], self.names[s]
                a_out.append(outcome(read_model(Path(fa), na), attack, eps))
                b_out.append(outcome(read_model(Path(fb), nb), attack, eps))
            lines.append(_pair_row(f"{label} ({a_out[0].mask.size:,} images)", a_out, b_out))
        note = (f"\n\nSeeds {', '.join(map(str, seeds))} ({len(seeds)} of {len(self.seeds)})"
                + (f"; not yet run: seed {', '.join(map(str, missing))}" if missing else "") + ".")
        return "\n".join(lines) + note

    def _clean10k(self, seed: int) -> tuple[float, float] | None:
        return self._value(seed, "sweep", "clean_acc")

    def _value(self, seed: int, source: str, key: str) -> tuple[float, float] | None:
        """One number per model of a seed: a field of its sweep point (the sweep's summary) or of its
        eval.json result."""
        fa, fb, sweep = self.files[seed]
        na, nb = self.names[seed]
        if source == "eval":
            a, b = read_model(Path(fa), na).get(key), read_model(Path(fb), nb).get(key)
        else:
            if sweep is None or not Path(sweep).is_file():
                return None
            points = {p["point"]: p for p in json.loads(Path(sweep).read_text())["points"]}
            a, b = ((points.get(n) or {}).get(key) for n in (na, nb))
        return None if a is None or b is None else (a, b)


def _pair_row(label: str, a_out: list[Outcome], b_out: list[Outcome]) -> str:
    """One row of a pair's table: each recipe's mean over seeds and images, the difference (paired image by
    image where both have per-image records, with McNemar per seed; else unpaired)."""
    a_i = bootstrap_mean([o.mask for o in a_out])
    b_i = bootstrap_mean([o.mask for o in b_out])
    if all(x.paired and y.paired for x, y in zip(a_out, b_out)):
        diff = bootstrap_difference([o.mask for o in a_out], [o.mask for o in b_out])
        tests = " / ".join(f"{mcnemar_exact(x.mask, y.mask)['p']:.2g}" for x, y in zip(a_out, b_out))
    else:
        diff = bootstrap_unpaired_difference([o.mask for o in a_out], [o.mask for o in b_out])
        tests = "unpaired"
    return f"| {label} | {a_i.percent()} | {b_i.percent()} | {diff.points()} | {tests} |"


@dataclass(frozen=True)
class Cell:
    """One model's accuracy in one row: its eval.json, its name there, the attack ("clean", an attack or
    "all") and which record ("worst"; "first_run" for a restarted attack's first run alone)."""

    path: Path
    name: str
    attack: str
    eps: float = EPS
    variant: str = "worst"

    def mask(self) -> np.ndarray | None:
        """Each image's outcome, or None while the file has not landed."""
        found = self.outcome()
        return None if found is None else found.mask

    def outcome(self) -> Outcome | None:
        if not self.path.is_file():
            return None
        result = read_model(self.path, self.name)
        if self.variant == "worst":
            return outcome(result, self.attack, self.eps)
        if self.attack == "clean" or not result.get("per_image"):
            raise SystemExit(f"{self.path}: {self.name} has no per-image {self.variant} record of {self.attack}")
        text = result["per_image"]["survived"][self.attack][eps_key(self.eps)][self.variant]
        return Outcome(unpack_outcomes(text, result["n"]), paired=True)


@dataclass(frozen=True)
class AllOf:
    """The images that survive every one of several cells' attacks (the same images, in the same order:
    per-image records of one model on the first n test images), on the images all of them ran."""

    cells: tuple[Cell, ...]

    def outcome(self) -> Outcome | None:
        found = [c.outcome() for c in self.cells]
        if any(f is None for f in found):
            return None
        if not all(f.paired for f in found):
            raise SystemExit(f"{self.cells[0].path}: a per-image worst case needs per-image records")
        n = min(f.mask.size for f in found)
        return Outcome(np.logical_and.reduce([f.mask[:n] for f in found]), paired=True)


@dataclass
class PairCells:
    """Two recipes over seeds where each row reads its own files: ``rows`` gives, per row, a function of the
    seed that returns (the cell of a, the cell of b). A row shows the seeds whose two cells have landed and
    names them when they are not all."""

    title: str
    label_a: str
    label_b: str
    seeds: tuple[int, ...]
    rows: tuple[tuple[str, Callable[[int], tuple[Cell | AllOf, Cell | AllOf]]], ...]

    def markdown(self) -> str:
        lines = [f"| {self.title} | {self.label_a} | {self.label_b} | difference [95% interval] | "
                 "McNemar p, per seed |", "|---|---|---|---|---|"]
        for label, cells in self.rows:
            found = {s: tuple(c.outcome() for c in cells(s)) for s in self.seeds}
            seeds = [s for s in self.seeds if None not in found[s]]
            if not seeds:
                lines.append(f"| {label} | not run yet | | | |")
                continue
            which = "" if len(seeds) == len(self.seeds) else f", seed{'s' * (len(seeds) > 1)} " + \
                ", ".join(map(str, seeds))
            shown = f"{label} ({found[seeds[0]][0].mask.size:,} images{which})"
            lines.append(_pair_row(shown, [found[s][0] for s in seeds], [found[s][1] for s in seeds]))
        return "\n".join(lines)


@dataclass
class Columns:
    """Several models of one seed side by side, one column each; every cell the accuracy with its 95%
    interval over the images (the two-stage bootstrap with one seed). A cell whose file has not landed
    says so."""

    title: str
    labels: tuple[str, ...]
    rows: tuple[tuple[str, tuple[Cell, ...]], ...]  # (row label, one cell per column)
    note: str = ""

    def markdown(self) -> str:
        lines = [f"| {self.title} | " + " | ".join(self.labels) + " |", "|---|" + "---|" * len(self.labels)]
        for label, cells in self.rows:
            masks = [c.mask() for c in cells]
            sizes = {m.size for m in masks if m is not None}
            shown = f"{label} ({', '.join(f'{n:,}' for n in sorted(sizes))} images)" if sizes else label
            lines.append(f"| {shown} | " + " | ".join(
                "not run yet" if m is None else bootstrap_mean([m]).percent() for m in masks) + " |")
        return "\n".join(lines) + (f"\n\n{self.note}" if self.note else "")


@dataclass
class TenSeeds:
    """Adversarial training at eps 0.1, seeds 0-9 (docs/study/at01_ten_seeds.py's verdicts): each seed's
    worst case at 8/255, the mean with its interval over seeds and images, the false-robust counts and the
    fixed Fisher tests. The files hold no per-image record (made before it existed): unpaired."""

    def markdown(self) -> str:
        at01 = _script("at01_ten_seeds")
        lines = ["| seeds | AT: worst case, each seed | AT + MPD-SGR | false-robust (one-sided Fisher p) |",
                 "|---|---|---|---|"]
        for seeds, label in ((range(0, 5), "0-4"), (range(5, 10), "5-9 (fixed before they ran)"),
                             (range(0, 10), "**0-9, the count fixed on 2026-12-06**")):
            runs = {r: [at01.verdict(r, s) for s in seeds] for r in at01.RECIPES}
            if any(v is None for vs in runs.values() for v in vs):
                lines.append(f"| {label} | not complete | | |")
                continue
            c = at01.count(seeds)
            cells = []
            for recipe in at01.RECIPES:
                vectors = [np.arange(v["n"]) < round(v["worst"] * v["n"]) for v in runs[recipe]]
                if len(seeds) == 10:
                    cells.append(f"mean {bootstrap_mean(vectors).percent()}")
                else:
                    cells.append(", ".join(f"{100 * v['worst']:.1f}" for v in runs[recipe]))
            lines.append(f"| {label} | {cells[0]} | {cells[1]} | {c['plain']} of {c['n']} against {c['mpd']} of "
                         f"{c['n']} (p = {c['p']:.3f}) |")
        lines.append(self._with_models(at01))
        return "\n".join(lines)

    @staticmethod
    def _with_models(at01) -> str:
        """The row of the runs whose models are committed (seeds 0-7 trained again, 8-9 first; fixed on
        2026-12-08): the seeds landed so far while it fills, then the mean, the count and the test."""
        label = "0-9 with their models (0-7 trained again)"
        runs = {r: {s: at01.verdict(r, s, "models") for s in range(10)} for r in at01.RECIPES}
        done = [s for s in range(10) if all(runs[r][s] is not None for r in at01.RECIPES)]
        k, m = (sum(runs[r][s]["false_robust"] for s in done) for r in at01.RECIPES)
        if len(done) < 10:
            cells = [", ".join(f"{100 * runs[r][s]['worst']:.1f}" for s in done) for r in at01.RECIPES]
            return (f"| {label}: seeds {', '.join(map(str, done))} so far | {cells[0]} | {cells[1]} | "
                    f"{k} of {len(done)} against {m} of {len(done)} (no test until all ten) |")
        c = at01.count(range(10), "models")
        means = [bootstrap_mean([np.arange(v["n"]) < round(v["worst"] * v["n"]) for v in runs[r].values()])
                 for r in at01.RECIPES]
        return (f"| **{label}** | mean {means[0].percent()} | mean {means[1].percent()} | "
                f"{c['plain']} of 10 against {c['mpd']} of 10 (p = {c['p']:.3f}) |")


@dataclass
class Text:
    """A script's own report placed in the page as it prints it (the validity study's fixed analysis)."""

    make: Callable[[], str]

    def markdown(self) -> str:
        return self.make()


def _script(name: str):
    """A script of this folder, imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"study_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sweep_files(sweep: str, a: str, b: str) -> tuple[Path, Path, Path]:
    """A pair's files as docs/study/land.py lays them out: data/DATE/SWEEP/eval_POINT.json and sweep.json."""
    folder = DATA / "2026-12-07" / sweep
    return folder / f"eval_{a}.json", folder / f"eval_{b}.json", folder / "sweep.json"


ROWS_8 = (("clean", "clean", EPS), (f"FGSM {eps_label(EPS)}", "fgsm", EPS), (f"PGD-7 {eps_label(EPS)}", "pgd", EPS),
          (f"APGD {eps_label(EPS)}", "apgd", EPS), (f"worst case {eps_label(EPS)}", "all", EPS))

SEED0 = DATA / "2026-12-07" / "seed0"  # table 2's evaluations of seed 0's five models (docs/study/retrain.sh paper)
SEED0_MODELS = (("plain", "plain"), ("SR", "sr"), ("MPD-SGR", "mpd"), ("AT", "at2"), ("AT + MPD-SGR", "at2+mpd"))


VALIDITY_STUDY = _script("validity")  # the attack-validity study's jobs, attacks and folder, defined there once
VALIDITY = VALIDITY_STUDY.DATA


def _seed0_rows() -> tuple:
    paper = SEED0 / "paper10k.json"
    rows = [(label, tuple(Cell(paper, name, attack, EPS) for _, name in SEED0_MODELS))
            for label, attack in (("clean", "clean"), ("FGSM", "fgsm"), ("PGD-7", "pgd"), ("BIM-7", "bim"))]
    assg = SEED0 / "assg.json"
    cells = tuple(Cell(assg, name, "assg") for _, name in SEED0_MODELS[:3]) + tuple(
        _validity_cell(recipe, 0, "assg100", "assg", FIRST_RUN) for recipe in VALIDITY_STUDY.RECIPES)
    rows.append(("ASSG + SA-PGD, 100 iterations, three levels", cells))
    return tuple(rows)



def _at2_eval(seed: int) -> tuple[Cell, Cell]:
    a, b, _ = _sweep_files(f"at2_seed{seed}", f"at2_seed{seed}", f"at2+mpd_seed{seed}")
    return Cell(a, f"at2_seed={seed}", "all"), Cell(b, f"at2+mpd_seed={seed}", "all")


def _at2_assg(seed: int, variant: str) -> tuple[Cell, Cell]:
    return tuple(_validity_cell(r, seed, "assg100", "assg", variant) for r in VALIDITY_STUDY.RECIPES)


AT2_ASSG_ROWS = (
    ("worst case of FGSM, PGD-7 and APGD, own + arctangent", _at2_eval),
    ("ASSG + SA-PGD, 100 iterations, three levels: the attack of 2026-12-03",
     lambda s: _at2_assg(s, FIRST_RUN)),
    ("ASSG + SA-PGD, the same with two restarts", lambda s: _at2_assg(s, "worst")),
    ("worst case of FGSM, PGD-7, APGD and ASSG, as the table of 2026-12-03 counts it",
     lambda s: tuple(AllOf((e, g)) for e, g in zip(_at2_eval(s), _at2_assg(s, FIRST_RUN)))),
)

def _validity_cell(recipe: str, seed: int, job: str, attack: str, record: str = "worst") -> Cell:
    return Cell(VALIDITY / f"{recipe}_seed{seed}" / f"{job}.json", f"{recipe}_seed{seed}", attack, variant=record)


def _validity_row(job: str, attack: str, record: str) -> Callable[[int], tuple[Cell, Cell]]:
    return lambda s: tuple(_validity_cell(r, s, job, attack, record) for r in VALIDITY_STUDY.RECIPES)


def _validity_worst(extra: tuple[str, ...] = ()) -> Callable[[int], tuple[AllOf, AllOf]]:
    """Each model's worst case over every attack of the primary jobs (and ``extra`` jobs), on the images
    all of them ran."""
    return lambda s: tuple(AllOf(tuple(_validity_cell(r, s, job, "all") for job in (*VALIDITY_STUDY.PRIMARY, *extra)))
                           for r in VALIDITY_STUDY.RECIPES)


VALIDITY_ROWS = (
    *((label, _validity_row(job, attack, record)) for label, job, attack, record in VALIDITY_STUDY.ATTACKS),
    ("**worst case over every attack of the primary jobs**", _validity_worst()),
    ("ASSG, 1,000 it., first 250 images", _validity_row("assg1000", "assg", "worst")),
    ("worst case with ASSG at 1,000 it., first 250 images", _validity_worst(("assg1000",))),
)


TABLES = {
    "at2_retrained": Pair(
        title="AT 2/255, trained again 2026-12-07; own + arctangent surrogate",
        label_a="AT", label_b="AT + MPD-SGR", seeds=(0, 1, 2),
        files={s: _sweep_files(f"at2_seed{s}", f"at2_seed{s}", f"at2+mpd_seed{s}") for s in (0, 1, 2)},
        names={s: (f"at2_seed={s}", f"at2+mpd_seed={s}") for s in (0, 1, 2)},
        rows=ROWS_8),
    "at2_assg": PairCells(
        title="AT 2/255, trained again 2026-12-07, under ASSG; 8/255", label_a="AT", label_b="AT + MPD-SGR",
        seeds=(0, 1, 2), rows=AT2_ASSG_ROWS),
    "validity": PairCells(
        title="the attack-validity study: AT 2/255 pair, trained again 2026-12-07; 8/255", label_a="AT",
        label_b="AT + MPD-SGR", seeds=VALIDITY_STUDY.SEEDS, rows=VALIDITY_ROWS),
    "validity_analysis": Text(lambda: VALIDITY_STUDY.analysis(data=VALIDITY)),
    "eta_retrained": Pair(
        title="plain against MPD-SGR, trained again 2026-12-07; own + arctangent surrogate",
        label_a="plain (eta = 0)", label_b="MPD-SGR (eta = 1)", seeds=(0, 1, 2),
        files={s: _sweep_files(f"eta_seed{s}", f"eta0_seed{s}", f"eta1_seed{s}") for s in (0, 1, 2)},
        names={s: (f"eta=0_seed={s}", f"eta=1_seed={s}") for s in (0, 1, 2)},
        rows=ROWS_8,
        per_seed=(("mean Omega, end of training", "sweep", "mean_omega", ".3f"),
                  ("input-gradient L1, 1,000 images", "eval", "grad_l1", ".1f"))),
    "seed0_paper": Columns(
        title="seed 0, trained again 2026-12-07; 8/255", labels=tuple(label for label, _ in SEED0_MODELS),
        rows=_seed0_rows(),
        note="Clean, FGSM, PGD-7 and BIM-7: the paper's protocol (the model's own surrogate, 7 steps of 0.01) "
             "on all 10,000 test images, `data/2026-12-07/seed0/paper10k.json`; ASSG on the first 1,000, "
             "`data/2026-12-07/seed0/assg.json` and, for the two adversarially trained models, the first run "
             "of the validity study's ASSG job, `data/validity/*_seed0/assg100.json` "
             "(`bash docs/study/retrain.sh paper`, then `validity`)."),
    "at01_ten_seeds": TenSeeds(),
}

def plot_at2(path: Path) -> None:
    """The retrained AT 2/255 pair, seed by seed: the worst case of the fixed-surrogate attacks (left) and
    with ASSG (right), AT joined to AT + MPD-SGR by one line per seed, the mean over the seeds that have
    landed with its 95% interval (the table's bootstrap) beside each end. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ((AT2_ASSG_ROWS[0][1], "FGSM, PGD-7, APGD\n(own + arctangent)"),
              (AT2_ASSG_ROWS[3][1], "the same and ASSG + SA-PGD\n(100 iterations, three levels)"))
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 4), sharey=True)
    for ax, (cells, title) in zip(axes, panels):
        found = {s: tuple(c.outcome() for c in cells(s)) for s in (0, 1, 2)}
        seeds = [s for s in found if None not in found[s]]
        for s in seeds:
            a, b = (100 * o.mask.mean() for o in found[s])
            ax.plot([0, 1], [a, b], marker="o", color=f"C{s}", label=f"seed {s}")
        for x, side in ((0, 0), (1, 1)):
            if seeds:
                i = bootstrap_mean([found[s][side].mask for s in seeds])
                ax.errorbar([x + (0.12 if side else -0.12)], [100 * i.mean],
                            yerr=[[100 * (i.mean - i.low)], [100 * (i.high - i.mean)]], fmt="s", color="k",
                            capsize=3, label="mean, 95% interval" if side else None)
        if not seeds:
            ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([0, 1], ["AT", "AT + MPD-SGR"])
        ax.set_xlim(-0.4, 1.4)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("robust accuracy at 8/255 (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4, frameon=False)
    fig.suptitle("Adversarial training at 2/255, trained again 2026-12-07; first 1,000 test images", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def validity_points() -> list[tuple[str, list[tuple[dict[int, float], Interval | None]]]]:
    """The validity table's rows as the figure draws them: per row, per recipe (AT, AT + MPD-SGR), the
    accuracy (%) of each seed on which both models' jobs have landed and the mean over those seeds with its
    95% interval (None: no such seed)."""
    out = []
    for label, cells in VALIDITY_ROWS:
        found = {s: tuple(c.outcome() for c in cells(s)) for s in VALIDITY_STUDY.SEEDS}
        seeds = [s for s in found if None not in found[s]]  # both models landed: the row's seeds, as the table's
        sides = []
        for side in (0, 1):
            accuracy = {s: 100 * found[s][side].mask.mean() for s in seeds}
            sides.append((accuracy, bootstrap_mean([found[s][side].mask for s in seeds]) if seeds else None))
        out.append((label.strip("*"), sides))
    return out


def validity_iterations() -> dict[tuple[str, int], dict[int, float]]:
    """Per model whose ASSG 1,000 job has landed: ASSG's accuracy (%) on the first 250 images against its
    iterations (100, 300 and 1,000: the first run of each job), as validity.model_masks gives it."""
    out = {}
    for seed in VALIDITY_STUDY.SEEDS:
        for recipe in VALIDITY_STUDY.RECIPES:
            masks = VALIDITY_STUDY.model_masks(recipe, seed, VALIDITY)
            if masks is not None and "iterations_250" in masks:
                out[recipe, seed] = {k: 100 * v.mean() for k, v in masks["iterations_250"].items()}
    return out


def plot_validity(path: Path) -> None:
    """The attack-validity study in one picture: per attack (rows, as in the table), AT and AT + MPD-SGR,
    each landed seed as a small dot and the mean with its 95% interval; the worst case stands out. Beside it,
    ASSG's accuracy against its iterations, per model. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = validity_points()
    fig, (ax, curve) = plt.subplots(1, 2, figsize=(12, 0.4 * len(points) + 1.4), width_ratios=(3, 1))
    for row, (label, sides) in enumerate(points):
        for side, (accuracy, interval) in enumerate(sides):
            y = row + (0.15 if side else -0.15)
            color = f"C{side}"
            ax.plot(list(accuracy.values()), [y] * len(accuracy), "o", ms=3, color=color, alpha=0.5)
            if interval is not None:
                ax.errorbar([100 * interval.mean], [y], xerr=[[100 * (interval.mean - interval.low)],
                            [100 * (interval.high - interval.mean)]], fmt="D" if "worst" in label else "s",
                            color=color, capsize=2, ms=5)
        if all(interval is None for _, interval in sides):
            ax.text(1, row, "not run yet", va="center", fontsize=8, color="0.4")
    labels = []
    for label, sides in points:
        seeds = sorted(set(sides[0][0]) & set(sides[1][0]))
        if seeds and len(seeds) < len(VALIDITY_STUDY.SEEDS):
            label += f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
        labels.append(label)
    ax.set_yticks(range(len(points)), labels, fontsize=8)
    ax.set_ylim(len(points) - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("robust accuracy at 8/255 (%): each seed (dots), the mean and its 95% interval", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    for side, name in enumerate(("AT", "AT + MPD-SGR")):
        ax.plot([], [], "s", color=f"C{side}", label=name)
    ax.legend(fontsize=8, loc="lower right")
    curves = validity_iterations()
    for (recipe, seed), by_iterations in curves.items():
        side = VALIDITY_STUDY.RECIPES.index(recipe)
        curve.plot(list(by_iterations), list(by_iterations.values()), marker="o", ms=3, color=f"C{side}",
                   linestyle=("-", "--", ":")[seed % 3])
    for seed in sorted({seed for _, seed in curves}):  # the line style names the seed, the colour the recipe
        curve.plot([], [], color="0.3", linestyle=("-", "--", ":")[seed % 3], label=f"seed {seed}")
    if curves:
        curve.legend(fontsize=8, loc="lower left")
    else:
        curve.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=curve.transAxes, fontsize=8)
    curve.set_xscale("log")
    curve.set_xticks([100, 300, 1000], ["100", "300", "1,000"])
    curve.set_ylim(0, 100)
    curve.set_xlabel("ASSG iterations (first run)", fontsize=9)
    curve.set_ylabel("accuracy on the first 250 images (%)", fontsize=9)
    curve.set_title("does ASSG converge?", fontsize=9)
    curve.grid(alpha=0.3)
    fig.suptitle("The attack-validity study: adversarial training at 2/255 with and without MPD-SGR", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


MARKER = re.compile(r"(<!-- tables\.py: (\w+) -->\n)(.*?)(<!-- /tables\.py -->)", re.S)


def render(text: str) -> str:
    """``text`` with every marked table recomputed."""
    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise SystemExit(f"{STUDY}: a marker names the table {name!r}, which tables.py does not have")
        return m.group(1) + TABLES[name].markdown() + "\n" + m.group(4)
    missing = set(TABLES) - {m.group(2) for m in MARKER.finditer(text)}
    if missing:
        raise SystemExit(f"{STUDY}: no marker for the table(s) {', '.join(sorted(missing))}")
    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the marked tables in docs/study/README.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/study/README.md's tables differ")
    p.add_argument("--plot-at2", type=Path, metavar="PNG", help="also draw the retrained AT 2/255 pair, seed by "
                   "seed (docs/study/figures/at2_retrained.png; needs matplotlib)")
    p.add_argument("--plot-validity", type=Path, metavar="PNG", help="also draw the attack-validity study, "
                   "attack by attack (docs/study/figures/validity.png; needs matplotlib)")
    args = p.parse_args(argv)
    if args.plot_at2:
        plot_at2(args.plot_at2)
        print(f"wrote {args.plot_at2}")
    if args.plot_validity:
        plot_validity(args.plot_validity)
        print(f"wrote {args.plot_validity}")
    if not (args.write or args.check):
        for name, table in TABLES.items():
            print(f"{name}:\n{table.markdown()}\n")
        return 0
    text = STUDY.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{STUDY.relative_to(ROOT)}: its tables differ from the result files; "
                  "run python docs/study/tables.py --write", file=sys.stderr)
            return 1
        print(f"{STUDY.relative_to(ROOT)}: every table matches the result files")
        return 0
    STUDY.write_text(new)
    print(f"wrote {STUDY.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
