"""Is the gain of adversarial training + MPD-SGR robustness, or the attack failing? The attack-validity
study of issue #30, item 2, exactly as fixed in docs/study/log.md ("Fixed on 2026-12-07 at 06:35 UTC").

    python docs/study/validity.py plan              # every job, its command, what is done, how far a started one got
    python docs/study/validity.py run --jobs 2      # run what is left, two jobs at a time, resumable
    python docs/study/validity.py interim           # what the finished jobs give so far (a progress report)
    python docs/study/validity.py analysis          # the analysis fixed beforehand, on what is done
    python docs/study/validity.py run --jobs 2 --data ../main/docs/study/data/validity   # from a worktree

The models: the adversarially trained pair at 2/255 (AT and AT + MPD-SGR), seeds 0-2, as trained again
on 2026-12-07 and committed under docs/study/models/2026-12-07/. Each job is one `train.eval` run on
one model at 8/255 (its folder under runs/study/validity/, continued with --resume after an
interruption); when a job has finished, its eval.json is copied to docs/study/data/validity/ (or to
`--data`: run from a worktree, the main checkout's folder, so that results land where they are committed),
to be committed at once. `run` stops cleanly on Ctrl-C or SIGTERM (each running job keeps what it finished).
The jobs run in the order of :func:`order` (ASSG at 100 iterations on every model first).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root, for train and mpd_triton
from mpd_triton.attacks.evaluation import FIRST_RUN, eps_key, unpack_outcomes  # noqa: E402
from plumbing.lock import FolderBusy, folder_lock  # noqa: E402
from train.results import finished_models, images_done  # noqa: E402
from train.stats import bootstrap_difference, bootstrap_mean, mcnemar_exact  # noqa: E402

MODELS = ROOT / "docs" / "study" / "models" / "2026-12-07"
DATA = ROOT / "docs" / "study" / "data" / "validity"
RUNS = ROOT / "runs" / "study" / "validity"
SEEDS = (0, 1, 2)
RECIPES = ("at2", "at2+mpd")
EPS = 8 / 255
LEVELS = "0.35,0.425,0.49"
IMAGES, LONG_IMAGES = 1000, 250  # the primary analysis's images; ASSG at 1,000 iterations runs on the first 250
LOCK = ".validity.lock"  # in a job's folder while a run of this script runs it
GRADIENTS = "own,triangle,sigmoid,atan,bptr,ste,fitted"  # the surrogate ensemble, BPTR, straight-through, fitted


def _shown(path: Path) -> str:
    """A path as a command shows it: relative to the repository root (the commands run there)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def model_path(recipe: str, seed: int) -> Path:
    return MODELS / f"at2_seed{seed}" / f"{recipe}_seed{seed}" / "model.pt"


def twin(recipe: str) -> str:
    return RECIPES[1 - RECIPES.index(recipe)]


@dataclass(frozen=True)
class Job:
    """One train.eval run of the fixed study on one model."""

    recipe: str
    seed: int
    name: str  # assg100, assg300, assg1000, apgd, square, transfer_twin, transfer_independent
    flags: tuple[str, ...]
    images: int
    data: Path | None = None  # where the finished result is copied to (`--data`); None: DATA

    @property
    def model(self) -> str:
        return f"{self.recipe}_seed{self.seed}"

    @property
    def folder(self) -> Path:
        return RUNS / self.model / self.name

    @property
    def result(self) -> Path:
        return (self.data or DATA) / self.model / f"{self.name}.json"

    def command(self, resume: bool = False) -> list[str]:
        return [sys.executable, "-m", "train.eval", "--checkpoint", _shown(model_path(self.recipe, self.seed)),
                "--name", self.model, "--eps", "8/255", "--limit", str(self.images), *self.flags,
                "--out", _shown(self.folder), *(["--resume"] if resume else [])]


def _next(seed: int, seeds) -> int:
    """The independently trained source of the transfer: the next seed of the same recipe (0 <- 1, 1 <- 2, 2 <- 0)."""
    return seeds[(seeds.index(seed) + 1) % len(seeds)]


def jobs(seeds=SEEDS, images: int = IMAGES, long_images: int = LONG_IMAGES, scale: float = 1.0,
         data: Path | None = None) -> list[Job]:
    """The fixed study's jobs, their results landing in ``data`` (``scale`` < 1 shortens every budget: for the
    tests only)."""
    def n(x: int) -> str:
        return str(max(1, int(round(x * scale))))

    out = []
    for seed in seeds:
        for recipe in RECIPES:
            assg = ("--attacks", "fgsm,assg", "--assg-level", LEVELS)
            out += [
                # 1. ASSG + SA-PGD at the three levels: 100 iterations, 3 runs (--restarts counts runs; the first
                #    run = today's attack, recorded apart), 300 with 2 runs, and 1,000 on the first 250 images
                Job(recipe, seed, "assg100", (*assg, "--sapgd-steps", n(100), "--restarts", "3"), images, data),
                Job(recipe, seed, "assg300", (*assg, "--sapgd-steps", n(300), "--restarts", "2"), images, data),
                Job(recipe, seed, "assg1000", (*assg, "--sapgd-steps", n(1000)), long_images, data),
                # 2. APGD-CE and targeted APGD-DLR through the ensemble, BPTR, straight-through and the fitted window
                Job(recipe, seed, "apgd", ("--attacks", "fgsm,apgd,apgd-t", "--gradients", GRADIENTS,
                                           "--apgd-steps", n(50)), images, data),
                # 3. Square with 5,000 queries
                Job(recipe, seed, "square", ("--attacks", "fgsm,square", "--queries", n(5000)), images, data),
                # 4. ASSG's examples transferred from the twin and from an independent model (the next seed)
                Job(recipe, seed, "transfer_twin",
                    ("--attacks", "fgsm,transfer", "--transfer-attack", "assg", "--assg-level", LEVELS,
                     "--sapgd-steps", n(100), "--source", _shown(model_path(twin(recipe), seed)),
                     "--no-large-eps-check"), images, data),
                Job(recipe, seed, "transfer_independent",
                    ("--attacks", "fgsm,transfer", "--transfer-attack", "assg", "--assg-level", LEVELS,
                     "--sapgd-steps", n(100), "--source", _shown(model_path(recipe, _next(seed, SEEDS))),
                     "--no-large-eps-check"), images, data),
            ]
    return out


PRIMARY = ("assg100", "assg300", "apgd", "square", "transfer_twin", "transfer_independent")
BLACK_BOX = ("square", "transfer_twin", "transfer_independent")  # the jobs whose attacks use no gradient of the model
TODAY = "ASSG, 100 it., no restart (the attack of 2026-12-03)"
# Each attack of the study as the analysis and docs/study/tables.py count it: (label, job, attack in its
# eval.json, record: "worst" over the attack's runs and gradients, or FIRST_RUN alone).
ATTACKS = (
    (TODAY, "assg100", "assg", FIRST_RUN),
    ("ASSG, 100 it., 3 runs (2 restarts)", "assg100", "assg", "worst"),
    ("ASSG, 300 it., 2 runs (1 restart)", "assg300", "assg", "worst"),
    ("APGD-CE, 7 gradients", "apgd", "apgd", "worst"),
    ("APGD-T (DLR), 7 gradients", "apgd", "apgd-t", "worst"),
    ("Square, 5,000 queries", "square", "square", "worst"),
    ("transfer from the twin", "transfer_twin", "transfer", "worst"),
    ("transfer from the next seed", "transfer_independent", "transfer", "worst"),
)


def _eval_done(path: Path) -> dict | None:
    """The one model's result of a finished eval.json, else None."""
    models = finished_models(path)
    if models is None or len(models) != 1:
        return None
    (result,) = models.values()
    return result


# ---------------------------------------------------------------- running

def plan(all_jobs: list[Job]) -> int:
    for job in order(all_jobs):
        state = "done" if job.result.is_file() else ("started" if (job.folder / "eval.json").is_file() else "to run")
        if state == "started" and (done := images_done(job.folder / "eval.json")):
            state = f"{done[0]}/{done[1]}"  # images finished of the job's images
        print(f"{job.model:16s} {job.name:22s} {state:9s} {' '.join(job.command()[1:])}")
    missing = [m for m in {model_path(j.recipe, j.seed) for j in all_jobs} if not m.is_file()]
    if missing:
        print(f"not trained yet: {', '.join(str(m.relative_to(ROOT)) for m in sorted(missing))}")
    return 0


def order(all_jobs: list[Job]) -> list[Job]:
    """The order the jobs run in (the analysis does not depend on it): ASSG at 100 iterations on every model
    first, which gives each model's figure under today's attack and the restarts beside it; then the rest of
    the primary jobs seed by seed, the two recipes of a seed together, so that each seed's paired comparison
    is complete as early as it can be; the secondary ASSG at 1,000 iterations last."""
    def key(job: Job) -> tuple:
        if job.name == "assg100":
            return (0, job.seed, RECIPES.index(job.recipe), 0)
        if job.name in PRIMARY:
            return (1, job.seed, PRIMARY.index(job.name), RECIPES.index(job.recipe))
        return (2, job.seed, RECIPES.index(job.recipe), 0)
    return sorted(all_jobs, key=key)


def _runnable(job: Job) -> bool:
    return model_path(job.recipe, job.seed).is_file() and all(
        (ROOT / f).is_file() for f in job.flags if f.endswith("model.pt"))


def _land(job: Job) -> None:
    job.result.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(job.folder / "eval.json", job.result)
    if (job.folder / "eval.md").is_file():
        shutil.copyfile(job.folder / "eval.md", job.result.with_suffix(".md"))
    print(f"[{job.model} {job.name}] done: {_shown(job.result)} (commit it)", flush=True)


def run(all_jobs: list[Job], parallel: int = 1) -> int:
    """Run what is left in :func:`order`, ``parallel`` jobs at a time (each child then gets cores / parallel
    threads), and copy each finished result beside the data. Ctrl-C or SIGTERM stops every running job (each
    keeps the images it finished: the same command continues it with --resume); a job that fails stops the
    study after the running ones end. Each running job holds a lock on its folder, so that a second
    ``run`` started beside this one (to use a core that came free) takes the next job, not the same one."""
    if parallel < 1:
        raise SystemExit("--jobs must be >= 1")
    todo = []
    for job in order(all_jobs):
        if job.result.is_file():
            continue
        if not _runnable(job):
            print(f"[{job.model} {job.name}] skipped: a model it needs is not trained yet")
            continue
        todo.append(job)
    env = dict(os.environ)
    if parallel > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    running: dict[subprocess.Popen, Job] = {}
    locks: dict[subprocess.Popen, contextlib.ExitStack] = {}
    failed = 0
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        while (todo and not failed) or running:
            while todo and not failed and len(running) < parallel:
                job = todo.pop(0)
                lock = contextlib.ExitStack()
                try:
                    lock.enter_context(folder_lock(job.folder, "validity.py run", LOCK))
                except FolderBusy:
                    print(f"[{job.model} {job.name}] skipped: another validity.py run is running it", flush=True)
                    continue
                if job.result.is_file():  # landed by another run while this one waited
                    lock.close()
                    continue
                resume = (job.folder / "eval.json").is_file()
                print(f"[{job.model} {job.name}] {'continuing' if resume else 'starting'}", flush=True)
                proc = subprocess.Popen(job.command(resume=resume), cwd=ROOT, env=env)
                running[proc], locks[proc] = job, lock
            for proc in [p for p in running if p.poll() is not None]:
                job = running.pop(proc)
                if proc.returncode == 0:
                    _land(job)
                else:
                    print(f"[{job.model} {job.name}] stopped (exit {proc.returncode}); the same command "
                          "continues it", flush=True)
                    failed = failed or proc.returncode
                locks.pop(proc).close()
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc, job in running.items():
            proc.terminate()
        for proc, job in running.items():
            proc.wait()
            print(f"[{job.model} {job.name}] interrupted; the same command continues it", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        for lock in locks.values():
            lock.close()
    return failed


def _stop(signum, frame):  # SIGTERM: stop like Ctrl-C, children included
    raise KeyboardInterrupt


def interim(data: Path = DATA, seeds=SEEDS) -> str:
    """What the finished jobs give so far, per model and attack (accuracy at 8/255 on the job's images): a
    progress report, not the fixed analysis, which needs every primary job of both models of a seed."""
    lines = ["| model | job | images | attack | accuracy (%) |", "|---|---|---|---|---|"]
    found = False
    for seed in seeds:
        for recipe in RECIPES:
            for name in (*PRIMARY, "assg1000"):
                r = _eval_done(data / f"{recipe}_seed{seed}" / f"{name}.json")
                if r is None:
                    continue
                found = True
                for attack, by_eps in r["accuracy"].items():
                    if attack == "fgsm" or eps_key(EPS) not in by_eps:
                        continue
                    row = f"| {recipe}_seed{seed} | {name} | {r['n']:,} | {attack} | {100 * by_eps[eps_key(EPS)]:.1f} |"
                    first = (r.get("per_image") or {}).get("survived", {}).get(attack, {}).get(eps_key(EPS), {})
                    if FIRST_RUN in first:
                        today = unpack_outcomes(first[FIRST_RUN], r["n"]).mean()
                        row = row[:-2] + f" (first run alone: {100 * today:.1f}) |"
                    lines.append(row)
    return "\n".join(lines) if found else "No job has finished yet."


# ---------------------------------------------------------------- the analysis fixed beforehand

def _mask(result: dict, attack: str, variant: str = "worst", limit: int | None = None) -> np.ndarray:
    text = result["per_image"]["survived"][attack][eps_key(EPS)][variant]
    mask = unpack_outcomes(text, result["n"])
    return mask[:limit] if limit else mask


def model_masks(recipe: str, seed: int, data: Path = DATA) -> dict | None:
    """Per model: "worst" (every attack of the primary jobs, 1,000 images), "today" (ASSG, 100 iterations,
    three levels, no restart), per attack its own mask, and on the first 250 images the same with ASSG at
    1,000 iterations ("worst_250"), or None while a primary job is missing."""
    results = {}
    for name in (*PRIMARY, "assg1000"):
        r = _eval_done(data / f"{recipe}_seed{seed}" / f"{name}.json")
        if r is not None:
            results[name] = r
    if any(name not in results for name in PRIMARY):
        return None
    n = min(results[name]["n"] for name in PRIMARY)
    worst = np.logical_and.reduce([_mask(results[name], "all", limit=n) for name in PRIMARY])
    today = _mask(results["assg100"], "assg", FIRST_RUN, limit=n)
    by_attack = {label: _mask(results[job], attack, record, limit=n)
                 for label, job, attack, record in ATTACKS if label != TODAY}
    out = {"n": n, "worst": worst, "today": today, "by_attack": by_attack, "clean": unpack_outcomes(
        results["assg100"]["per_image"]["clean"], results["assg100"]["n"])[:n],
        "fgsm": np.logical_and.reduce([_mask(results[name], "fgsm", limit=n) for name in PRIMARY])}
    if "assg1000" in results:
        m = results["assg1000"]["n"]
        out["worst_250"] = worst[:m] & _mask(results["assg1000"], "all")
        out["iterations_250"] = {100: today[:m], 300: _mask(results["assg300"], "assg", FIRST_RUN, limit=m),
                                 1000: _mask(results["assg1000"], "assg")}
    return out


def analysis(data: Path = DATA, seeds=SEEDS) -> str:
    masks = {(r, s): model_masks(r, s, data) for r in RECIPES for s in seeds}
    done = [s for s in seeds if masks["at2", s] is not None and masks["at2+mpd", s] is not None]
    lines = [f"Seeds with every primary job of both models done: {', '.join(map(str, done)) or 'none'} "
             f"(of {', '.join(map(str, seeds))})."]
    if not done:
        return "\n".join(lines)
    a = [masks["at2", s] for s in done]
    b = [masks["at2+mpd", s] for s in done]
    lines += ["", "| 8/255 | AT | AT + MPD-SGR | difference [95%] | McNemar p per seed |", "|---|---|---|---|---|"]
    for label, key in (("the attack of 2026-12-03 alone (ASSG, 100 it., first run)", "today"),
                       ("**worst case over every attack (primary)**", "worst")):
        ia = bootstrap_mean([m[key] for m in a])
        ib = bootstrap_mean([m[key] for m in b])
        d = bootstrap_difference([m[key] for m in a], [m[key] for m in b])
        p = " / ".join(f"{mcnemar_exact(x[key], y[key])['p']:.2g}" for x, y in zip(a, b))
        lines.append(f"| {label} | {ia.percent()} | {ib.percent()} | {d.points()} | {p} |")
    worst = bootstrap_difference([m["worst"] for m in a], [m["worst"] for m in b])
    shrink = bootstrap_mean([(y["today"].astype(int) - x["today"].astype(int))
                             - (y["worst"].astype(int) - x["worst"].astype(int)) for x, y in zip(a, b)])
    how = "falls" if shrink.mean >= 0 else "rises"
    if shrink.mean < 0:  # the same interval, written as a rise
        shrink = type(shrink)(-shrink.mean, -shrink.high, -shrink.low, shrink.seeds, shrink.images)
    provisional = f" (provisional: {len(done)} of {len(seeds)} seeds)" if len(done) < len(seeds) else ""
    lines += ["", f"The gap {'survives' if worst.low > 0 else 'does not survive'}{provisional}: the paired "
                  f"difference of the worst case is {worst.points()} points (it survives if the interval's lower "
                  f"end is above 0); the difference (AT + MPD-SGR - AT) {how} by {shrink.points()} points from "
                  "the attack of 2026-12-03 alone to the worst case."]
    # which attacks join --reliable: below ASSG (today's) on any model by more than max(1 point, 2 images)
    joins = set()
    for (recipe, seed), m in masks.items():
        if m is None:
            continue
        tol = max(0.01, 2 / m["n"])
        for attack, mask in m["by_attack"].items():
            if not attack.startswith("ASSG") and mask.mean() < m["today"].mean() - tol:
                joins.add(attack)
    lines.append("Attacks stronger than ASSG on some model (they join --reliable): "
                 + (", ".join(sorted(joins)) if joins else "none") + ".")
    long = [(x, y) for x, y in zip(a, b) if "worst_250" in x and "worst_250" in y]
    if long:
        d = bootstrap_difference([x["worst_250"] for x, _ in long], [y["worst_250"] for _, y in long])
        lines.append(f"Secondary, first {long[0][0]['worst_250'].size} images with ASSG at 1,000 iterations: "
                     f"paired difference {d.points()} points over {len(long)} seed(s).")
        for (recipe, seed), m in masks.items():
            if m is not None and "iterations_250" in m:
                curve = ", ".join(f"{k}: {100 * v.mean():.1f}" for k, v in m["iterations_250"].items())
                lines.append(f"  {recipe} seed {seed}, ASSG accuracy against iterations: {curve}")
    return "\n".join(lines + ["", diagnostics(masks)])


def diagnostics(masks: dict) -> str:
    """Added on 2026-12-07 after seed 0 had landed, outside the fixed analysis (it changes no verdict): per
    model, how many images each attack alone breaks (no other attack of the primary jobs, FGSM included,
    does), and how many the attacks without the model's own gradients (Square; transfer, which uses the source
    model's) break that every attack through the model's gradients left correct. Gradient masking would show
    as a large count there; the count can show it only where those attacks are strong enough."""
    labels = [label for label, *_ in ATTACKS if label != TODAY]
    gradient = [label for label, job, *_ in ATTACKS if label != TODAY and job not in BLACK_BOX]
    black_box = [label for label, job, *_ in ATTACKS if job in BLACK_BOX]
    lines = ["Diagnostics, outside the fixed analysis (added 2026-12-07 after seed 0; they change no verdict): "
             "per model, the images one attack alone breaks (every other attack, FGSM included, leaves them "
             "correct), and the images the attacks without the model's own gradients (Square, the transfers) "
             "break that every attack through its gradients (FGSM included) left correct; gradient masking would "
             "show up as a large count there, where those attacks are strong enough to show it:", "",
             "| model | " + " | ".join(labels) + " | broken only without the model's gradients |",
             "|---" * (len(labels) + 2) + "|"]
    for (recipe, seed), m in masks.items():
        if m is None:
            continue
        by = {**m["by_attack"], "FGSM": m["fgsm"]}
        alone = [int((np.logical_and.reduce([by[o] for o in by if o != k]) & ~by[k]).sum()) for k in labels]
        survive_gradients = np.logical_and.reduce([by[k] for k in (*gradient, "FGSM")])
        beyond = int((survive_gradients & ~np.logical_and.reduce([by[k] for k in black_box])).sum())
        lines.append(f"| {recipe} seed {seed} | " + " | ".join(map(str, alone)) + f" | {beyond} of {m['n']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("plan", "run", "analysis", "interim"))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="seeds to plan or run (default 0,1,2)")
    p.add_argument("--data", type=Path, default=None, help="the folder the finished results are copied to and "
                   "read from (default docs/study/data/validity/ of this checkout; from a worktree, the main "
                   "checkout's, so that they land where they are committed)")
    p.add_argument("--jobs", type=int, default=1, help="jobs run at a time, each with cores / jobs threads "
                   "(default 1)")
    args = p.parse_args(argv)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    data = args.data.resolve() if args.data else DATA
    if args.what == "plan":
        return plan(jobs(seeds, data=data))
    if args.what == "run":
        return run(jobs(seeds, data=data), parallel=args.jobs)
    if args.what == "interim":
        print(interim(data=data, seeds=seeds))
        return 0
    print(analysis(data=data, seeds=SEEDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
