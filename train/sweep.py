"""python -m train.sweep: a grid of train.run (and train.eval) runs, one after another, resumable.

    python -m train.sweep --out runs/eta-sweep --train-args "--preset study --epochs 15" \\
        --grid eta=0,0.01,0.1,1 --grid seed=0,1,2 \\
        --eval-args "--attacks fgsm,pgd,apgd --ensemble --eps 8/255,0.1 --limit 1000"
    # named settings instead of (or crossed with) a grid: each --case is a label and train.run flags
    python -m train.sweep --out runs/baselines --train-args "--preset study" --grid seed=0,1,2 \\
        --case plain="--eta 0" --case mpd="--eta 0.1" --case sr="--eta 0 --sr-lambda 0.01"

A point is one setting: a --case (if any) crossed with one value of every --grid key (a
train.run option, written as its flag without the dashes: eta, seed, model, adv-train, ...;
on/off for a switch). Each point trains one model with ``python -m train.run <train-args>
<case> <grid values> --no-compare --out OUT/points/<point>``, then, with --eval-args,
evaluates it with ``python -m train.eval --checkpoint .../model.pt <eval-args> --out
OUT/points/<point>/eval``; without --eval-args the summary takes the evaluation train.run ran
itself at the end (its --eval-attacks at --eval-eps, e.g. the quick preset's). Both run as child processes; their output goes to
``train.log`` / ``eval.log`` in the point's folder and, line by line, to this terminal.

Nothing is lost when the sweep is interrupted (Ctrl-C, or SIGTERM: ``kill`` for a sweep in the
background, which ignores Ctrl-C's SIGINT): a finished point (``point.json``) is not
run again, an interrupted training continues with train.run --resume from its last epoch and
an interrupted evaluation with train.eval --resume from its last batch; run the same command
again. A point that failed (``failed.json``: its command and error) is not retried unless
--retry-failed. Adding values to a grid adds points and keeps the finished ones; a point
whose folder was made with other commands is refused.

Outputs in OUT: ``sweep.json`` (every point's settings, accuracies, Omega and per-layer
diagnostics, and the settings aggregated over seeds: mean and standard error), ``sweep.md``
(the tables) and ``sweep.png`` (clean accuracy against robust accuracy, for every attack
and eps that train.eval ran and for the per-image worst case over all of them, with
standard errors over seeds; over the test images where a setting has one seed); when one
numeric grid key varies (eta, sr-lambda, ...), ``sweep_<key>.png``: every accuracy against it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mpd_triton.files import WriteError, ensure_writable, optional_plot, save_figure, write_json, write_text  # noqa: E402
from plumbing.provenance import provenance  # noqa: E402

from .config import ConfigError, eps_label  # noqa: E402
from .config import build_parser as build_run_parser  # noqa: E402
from .diagnostics import DIAGNOSTICS  # noqa: E402

__all__ = ["Point", "Runner", "plan_points", "run_point", "summarize", "write_summary", "main", "SEED_KEY"]

SEED_KEY = "seed"  # the grid key a setting is aggregated over
POINT_FILE, FAILED_FILE, PLAN_FILE = "point.json", "failed.json", "plan.json"
# Exit statuses of a child stopped by Ctrl-C or SIGTERM (train.run / train.eval's own, or the signal's).
_STOPPED_CODES = {130, 143, -signal.SIGINT, -signal.SIGTERM}
# train.run options a sweep sets itself (one model per point, in the point's folder): not grid keys.
_RESERVED = {"out", "resume", "force", "compare"}


class SweepError(ValueError):
    """A bad sweep option or an output folder made by another sweep: one line."""


@dataclass
class Point:
    name: str  # folder name: the case and the grid values, e.g. "mpd_eta=0.1_seed=2"
    case: str | None
    values: dict[str, str]  # grid key -> value as given
    train_flags: list[str]  # the point's own train.run flags (case + grid), after the sweep's --train-args
    setting: str = field(init=False)  # the name without the seed: what seeds are aggregated over

    def __post_init__(self):
        self.setting = _point_name(self.case, {k: v for k, v in self.values.items() if k != SEED_KEY})


def _point_name(case: str | None, values: dict[str, str]) -> str:
    parts = ([case] if case else []) + [f"{k}={v}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9_=.,+-]+", "-", "_".join(parts)) or "default"


def _run_options() -> dict[str, argparse.Action]:
    """train.run's options by their flag without dashes ("eta", "adv-train", ...)."""
    options = {}
    for action in build_run_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--"):
                options[flag[2:]] = action
    return options


def _flags_for(key: str, value: str, options: dict[str, argparse.Action]) -> list[str]:
    action = options.get(key)
    if action is None or action.dest in _RESERVED:
        known = ", ".join(sorted(k for k, a in options.items() if a.dest not in _RESERVED and k != "help"))
        raise SweepError(f"--grid {key}: not a train.run option the sweep can vary (choose from {known})")
    if isinstance(action, argparse.BooleanOptionalAction):
        if value.lower() in ("on", "true", "yes", "1"):
            return [f"--{key}"]
        if value.lower() in ("off", "false", "no", "0"):
            return [f"--no-{key}"]
        raise SweepError(f"--grid {key}: a switch takes on or off, got {value!r}")
    if action.nargs == 0:  # store_true
        if value.lower() in ("on", "true", "yes", "1"):
            return [f"--{key}"]
        if value.lower() in ("off", "false", "no", "0"):
            return []
        raise SweepError(f"--grid {key}: a switch takes on or off, got {value!r}")
    return [f"--{key}", value]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise SweepError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. eta=0,0.01,0.1)")
        if key in grid:
            raise SweepError(f"--grid {key} given twice: list all its values in one --grid")
        if len(set(vals)) < len(vals):
            raise SweepError(f"--grid {key}: a value is repeated ({values})")
        grid[key] = vals
    return grid


def parse_cases(items: list[str]) -> dict[str, list[str]]:
    cases: dict[str, list[str]] = {}
    for item in items:
        label, sep, flags = item.partition("=")
        label = label.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9.+-]*[A-Za-z0-9][A-Za-z0-9.+-]*", label):
            raise SweepError(f"--case {item!r}: expected LABEL=\"train.run flags\" with a label of letters, digits, "
                             "'.', '+' or '-' (at least one letter or digit)")
        if label in cases:
            raise SweepError(f"--case {label} given twice")
        try:
            cases[label] = shlex.split(flags)
        except ValueError as e:
            raise SweepError(f"--case {label}: {e}") from None
    return cases


def plan_points(grid: dict[str, list[str]], cases: dict[str, list[str]]) -> list[Point]:
    """Every case crossed with the grid's product (in the order given; seeds innermost when last)."""
    options = _run_options()
    for key in grid:
        _flags_for(key, grid[key][0], options)  # checks the key
    points = []
    keys = list(grid)
    for case, case_flags in (cases.items() if cases else [(None, [])]):
        for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
            values = dict(zip(keys, combo))
            flags = list(case_flags)
            for k, v in values.items():
                flags += _flags_for(k, v, options)
            points.append(Point(_point_name(case, values), case, values, flags))
    names = [p.name for p in points]
    if len(set(names)) < len(names):
        raise SweepError("two points have the same name: give the cases distinct labels")
    return points


# ---------------------------------------------------------------- running


def _train_command(point: Point, train_args: list[str], folder: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "train.run", *train_args, *point.train_flags, "--no-compare",
            "--out", str(folder), *(["--resume"] if resume else [])]


def _eval_command(point: Point, model: Path, eval_args: list[str], folder: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "train.eval", "--checkpoint", str(model), "--name", point.name, *eval_args,
            "--out", str(folder), *(["--resume"] if resume else [])]


def _without_resume(command: list[str]) -> list[str]:
    return [c for c in command if c != "--resume"]


def _trained_model(folder: Path) -> Path | None:
    """The point's model.pt once train.run has finished (its report written too), else None."""
    models = sorted(m for m in folder.glob("*/model.pt") if (m.parent / "report.json").is_file())
    return models[0] if models else None


def _has_checkpoint(folder: Path) -> bool:
    return any(folder.glob("*/checkpoint.pt"))


def _evaluation_done(folder: Path, name: str) -> bool:
    path = folder / "eval.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return name in saved.get("models", {}) and "in_progress" not in saved


class _Stopped(Exception):
    """SIGTERM or Ctrl-C reached the sweep; the children were stopped and keep what they finished."""


class Runner:
    """Runs the sweep's child processes: their environment (threads per child with --jobs), the
    echo of their output, and stopping them all cleanly on Ctrl-C or SIGTERM."""

    def __init__(self, echo: bool = True, threads: int | None = None):
        self.echo = echo
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads is not None:
            self.env["OMP_NUM_THREADS"] = str(threads)  # torch's threads and the C kernels' (mt.lif)
        self.stopping = threading.Event()
        self._live: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def start(self, command: list[str]) -> subprocess.Popen:
        with self._lock:
            if self.stopping.is_set():
                raise _Stopped()
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=self.env, bufsize=1)
            self._live.add(proc)
            return proc

    def finished(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._live.discard(proc)

    def stop(self, from_terminal: bool) -> None:
        """Stop every child with SIGTERM (train.run and train.eval stop cleanly on it and keep what they
        did; SIGINT would not do: a sweep started in the background ignores it, and so do its children).
        A Ctrl-C in the terminal has reached them already (one process group): a moment first."""
        self.stopping.set()
        with self._lock:
            live = list(self._live)
        deadline = time.monotonic() + (5 if from_terminal else 0)
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in live:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _run_child(command: list[str], log: Path, label: str, runner: Runner) -> tuple[int, str]:
    """Run a child process, its output to ``log`` and (line by line) to this terminal;
    -> (exit status, its last line)."""
    last = ""
    try:
        log_file = open(log, "a", buffering=1)
    except OSError as e:
        raise WriteError.from_os_error(log, e) from None
    with log_file:
        log_file.write(f"$ {shlex.join(command)}\n")
        proc = runner.start(command)
        try:
            for line in proc.stdout:
                log_file.write(line)
                text = line.rstrip("\n")
                if text.strip() and "\r" not in text:
                    last = text
                    if runner.echo:
                        tqdm.write(f"  [{label}] {text}")
            return proc.wait(), last
        finally:
            runner.finished(proc)


def _record(folder: Path, file: str, payload: dict) -> None:
    write_json(folder / file, payload)


def planned_commands(point: Point, train_args: list[str], eval_args: list[str] | None) -> dict:
    """What a point's folder holds the results of: its train.run arguments and train.eval's (without
    the folders, so that the same sweep moved or named by another path still matches)."""
    return {"train": ["-m", "train.run", *train_args, *point.train_flags, "--no-compare"], "eval": eval_args}


def _saved_commands(folder: Path) -> dict | None:
    """The commands the point's folder was made with (PLAN_FILE, or an older sweep's point.json)."""
    for name in (PLAN_FILE, POINT_FILE):
        path = folder / name
        if not path.is_file():
            continue
        saved = _read_json(path)
        commands = saved.get("commands") if isinstance(saved, dict) else None
        if not isinstance(commands, dict) or not isinstance(commands.get("train"), list):
            raise SweepError(f"{path} is not a sweep's record (no commands in it): delete the folder {folder} to "
                             "run the point again")
        return {"train": _without_folders(commands["train"]), "eval": commands.get("eval")}
    return None


def _without_folders(command: list[str]) -> list[str]:
    """A stored command without --out DIR and --resume (older sweeps stored them)."""
    out, skip = [], False
    for word in command:
        if skip:
            skip = False
        elif word == "--out":
            skip = True
        elif word != "--resume":
            out.append(word)
    return out


def check_plan(point: Point, out: Path, planned: dict) -> None:
    """Refuse a point whose folder holds results of other commands (before any work starts)."""
    folder = out / "points" / point.name
    saved = _saved_commands(folder)
    if saved is None:
        if _has_checkpoint(folder) or any(folder.glob("*/model.pt")):
            raise SweepError(f"{folder} holds a training the sweep did not record (no {PLAN_FILE}): delete it, or "
                             "use another --out")
        return
    for step in ("train", "eval"):
        if saved[step] != planned[step]:
            was = shlex.join(saved[step]) if saved[step] is not None else "none"
            now = shlex.join(planned[step]) if planned[step] is not None else "none"
            raise SweepError(f"point {point.name} in {out} was made with other {step} arguments ({was}; now {now}): "
                             f"use another --out, or delete {folder} to run it again")


def run_point(point: Point, out: Path, train_args: list[str], eval_args: list[str] | None, runner: Runner,
              retry_failed: bool) -> str:
    """Train (and evaluate) one point; -> "done", "skipped" (finished before), "failed" or
    "failed before" (not retried). Raises _Stopped when the sweep is being stopped."""
    folder = out / "points" / point.name
    eval_folder = folder / "eval"
    planned = planned_commands(point, train_args, eval_args)
    check_plan(point, out, planned)
    if (folder / POINT_FILE).is_file():
        return "skipped"
    failed = folder / FAILED_FILE
    if failed.is_file() and not retry_failed:
        return "failed before"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / PLAN_FILE).is_file():  # before any work: a later call with other arguments is refused
        _record(folder, PLAN_FILE, {"commands": planned, "point": point.name})
    failed.unlink(missing_ok=True)

    def fail(step: str, code: int, last: str) -> str:
        if runner.stopping.is_set() or code in _STOPPED_CODES:  # Ctrl-C / SIGTERM: not a failure
            runner.stopping.set()  # and no other point starts
            raise _Stopped()
        _record(folder, FAILED_FILE, {"commands": planned, "step": step, "exit": code, "error": last})
        return "failed"

    model = _trained_model(folder)
    if model is None:
        command = _train_command(point, train_args, folder, resume=_has_checkpoint(folder))
        code, last = _run_child(command, folder / "train.log", point.name, runner)
        model = _trained_model(folder)
        if code != 0 or model is None:
            return fail("train", code, last)
    if eval_args is not None and not _evaluation_done(eval_folder, point.name):
        resume = (eval_folder / "eval.json").is_file()
        command = _eval_command(point, model, eval_args, eval_folder, resume)
        code, last = _run_child(command, folder / "eval.log", point.name, runner)
        if code != 0 or not _evaluation_done(eval_folder, point.name):
            return fail("eval", code, last)
    _record(folder, POINT_FILE, {"commands": planned, "point": point.name, "case": point.case,
                                 "values": point.values, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return "done"


# ---------------------------------------------------------------- results


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def point_result(point: Point, out: Path) -> dict | None:
    """What a finished point measured (report.json of its run, eval.json of its evaluation; without an
    evaluation, the one train.run ran itself at the end, if any)."""
    folder = out / "points" / point.name
    if not (folder / POINT_FILE).is_file():
        return None
    model = _trained_model(folder)
    report = _read_json(model.parent / "report.json") if model else None
    if report is None:
        return None
    result = {"point": point.name, "setting": point.setting, "case": point.case, "values": point.values,
              "clean_acc": report["clean_acc"], "test_images": report.get("test_images"), "mean_omega": report["mean_omega"],
              "omega_per_layer": report["omega_per_layer"], "seconds_per_epoch": report["seconds_per_epoch"],
              "epochs": report["epochs"], "diagnostics": report.get("diagnostics"), "robust": {}}
    evaluation = _read_json(folder / "eval" / "eval.json")
    if evaluation and point.name in evaluation.get("models", {}):
        r = evaluation["models"][point.name]
        result.update(eval_images=r["n"], eval_clean=r["clean"], grad_l1=r["grad_l1"],
                      checks_passed=r["all_checks_passed"],
                      failed_checks=[c["name"] for c in r["checks"] if not c["passed"]])
        for attack, by_eps in r["accuracy"].items():
            for eps, acc in by_eps.items():
                result["robust"][f"{attack} @ {eps_label(eps)}"] = acc
        for eps, acc in r["worst_case"].items():
            result["robust"][f"all attacks @ {eps_label(eps)}"] = acc
    elif report.get("robustness"):  # no --eval-args: train.run's own evaluation (--eval-attacks, one eps)
        r = report["robustness"]
        eps = eps_label(r["eps"])
        result.update(eval_images=r["n"], eval_clean=r["accuracy"].get("clean"), grad_l1=r["grad_l1"],
                      checks_passed=r["checks_passed"], failed_checks=[c["name"] for c in r["checks"] if not c["passed"]])
        for attack, acc in r["accuracy"].items():
            if attack != "clean":
                result["robust"][f"{attack} @ {eps}"] = acc
    return result


def mean_se(values: list[float], n_images: int | None) -> tuple[float, float, str]:
    """(mean, standard error, what the error is over): over seeds when there are several, else
    the binomial error over the images."""
    mean = sum(values) / len(values)
    if len(values) > 1:
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        return mean, math.sqrt(var / len(values)), "seeds"
    if n_images:
        return mean, math.sqrt(max(mean * (1 - mean), 0.0) / n_images), "images"
    return mean, float("nan"), "-"


def summarize(points: list[Point], out: Path) -> dict:
    """sweep.json's content: every finished point, and each setting aggregated over its seeds."""
    results = [r for r in (point_result(p, out) for p in points) if r is not None]
    settings: dict[str, list[dict]] = {}
    for r in results:
        settings.setdefault(r["setting"], []).append(r)
    groups = []
    for setting, rs in settings.items():
        test_images = rs[0].get("test_images")
        eval_images = rs[0].get("eval_images")
        group = {"setting": setting, "case": rs[0]["case"],
                 "values": {k: v for k, v in rs[0]["values"].items() if k != SEED_KEY},
                 "seeds": [r["values"].get(SEED_KEY) for r in rs], "n": len(rs), "metrics": {}}
        group["metrics"]["clean"] = mean_se([r["clean_acc"] for r in rs], test_images)
        group["metrics"]["mean Omega"] = mean_se([r["mean_omega"] for r in rs], None)
        for key in rs[0]["robust"]:
            if all(key in r["robust"] for r in rs):
                group["metrics"][key] = mean_se([r["robust"][key] for r in rs], eval_images)
        if all("grad_l1" in r for r in rs):
            group["metrics"]["input-gradient L1"] = mean_se([r["grad_l1"] for r in rs], None)
        if all(r.get("diagnostics") for r in rs):
            n_layers = len(rs[0]["diagnostics"])
            group["diagnostics"] = [{key: sum(r["diagnostics"][i][key] for r in rs) / len(rs) for key in DIAGNOSTICS}
                                    | {"layer": i + 1, "window": rs[0]["diagnostics"][i]["window"]}
                                    for i in range(n_layers)]
        group["checks_passed"] = all(r.get("checks_passed", True) for r in rs)
        groups.append(group)
    return {"points": results, "settings": groups}


def _pm(metric: tuple[float, float, str], percent: bool = True) -> str:
    mean, se, _ = metric
    scale = 100 if percent else 1
    if math.isnan(se):
        return f"{scale * mean:.2f}"
    return f"{scale * mean:.2f} ± {scale * se:.2f}"


def markdown(summary: dict, command: str, curve: str | None = None) -> str:
    lines = ["# Sweep", "", f"Command: `{command}`", "",
             "Accuracies in %, mean ± standard error: over seeds where a setting has several, else over the "
             "test images (binomial). Robust accuracy counts an image only if it is right both clean and attacked; "
             "\"all attacks\" is the per-image worst case over every attack train.eval (or, without --eval-args, "
             "train.run's own evaluation) ran.", ""]
    groups = summary["settings"]
    if not groups:
        return "\n".join(lines + ["No point has finished yet."])
    keys = list(dict.fromkeys(k for g in groups for k in g["metrics"]))
    lines += ["| setting | seeds | " + " | ".join(keys) + " | checks |", "|---|---|" + "---|" * (len(keys) + 1)]
    for g in groups:
        cells = [(_pm(g["metrics"][k], percent=k not in ("mean Omega", "input-gradient L1"))
                  if k in g["metrics"] else "-") for k in keys]
        lines.append(f"| {g['setting']} | {g['n']} | " + " | ".join(cells) + " | "
                     + ("pass" if g["checks_passed"] else "**FAIL**") + " |")
    if any(g.get("diagnostics") for g in groups):
        lines += ["", "## Membrane potential per LIF layer (test images, eval mode; mean over seeds)", "",
                  "| setting | layer | window | " + " | ".join(t for t, _ in DIAGNOSTICS.values()) + " |",
                  "|---|---|---|" + "---|" * len(DIAGNOSTICS)]
        for g in groups:
            for d in g.get("diagnostics") or []:
                window = d["window"] if isinstance(d["window"], str) else f"{d['window']:.3g}"
                lines.append(f"| {g['setting']} | {d['layer']} | {window} | "
                             + " | ".join(fmt.format(d[k]) for k, (_, fmt) in DIAGNOSTICS.items()) + " |")
    lines += ["", "## Points", "", "| point | clean | mean Omega | s / epoch | epochs | checks |",
              "|---|---|---|---|---|---|"]
    for r in summary["points"]:
        checks = "-" if "checks_passed" not in r else ("pass" if r["checks_passed"] else
                                                     "**FAIL** " + ", ".join(r["failed_checks"]))
        lines.append(f"| {r['point']} | {100 * r['clean_acc']:.2f} | {r['mean_omega']:.4f} | "
                     f"{r['seconds_per_epoch']:.1f} | {r['epochs']} | {checks} |")
    lines += ["", "![clean against robust accuracy](sweep.png)", ""]
    if curve is not None:
        lines += [f"![accuracy against {curve}](sweep_{curve}.png)", ""]
    return "\n".join(lines)


@optional_plot()
def plot(summary: dict, path: Path) -> None:
    """Clean accuracy (x) against robust accuracy (y), one panel per attack @ eps, error bars."""
    groups = summary["settings"]
    panels = list(dict.fromkeys(k for g in groups for k in g["metrics"] if "@" in k))
    if not panels:
        return
    panels.sort(key=_panel_order)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {g["setting"]: colors[i % len(colors)] for i, g in enumerate(groups)}  # one colour per setting
    for ax, key in zip(axes.flat, panels):
        for g in (g for g in groups if key in g["metrics"]):
            cx, sx, _ = g["metrics"]["clean"]
            ry, sy, _ = g["metrics"][key]
            ax.errorbar(100 * cx, 100 * ry, xerr=None if math.isnan(sx) else 100 * sx,
                        yerr=None if math.isnan(sy) else 100 * sy, fmt="o", color=color[g["setting"]],
                        label=g["setting"], capsize=2, markersize=4)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("clean accuracy %", fontsize=8)
        ax.set_ylabel("robust accuracy %", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    # the legend names every setting (not only those of the first panel), below the panels
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=color[g["setting"]], markersize=4) for g in groups]
    ncol = min(4, max(1, len(groups)))
    fig.legend(handles, [g["setting"] for g in groups], loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    legend_inches = 0.2 * math.ceil(len(groups) / ncol) + 0.1
    fig.tight_layout(rect=(0, min(0.3, legend_inches / fig.get_figheight()), 1, 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _panel_order(key: str):
    """'all attacks @ eps' first, then by eps (smallest first), then by attack."""
    attack, _, eps = key.partition(" @ ")
    value = float(eps[:-4]) / 255 if eps.endswith("/255") else float(eps)
    return (attack != "all attacks", value, attack)


def numeric_key(summary: dict) -> str | None:
    """The one grid key (other than the seed) that varies over the settings, if all its values are
    numbers (eta, sr-lambda, ...): the sweep is then a curve over it."""
    groups = summary["settings"]
    if len(groups) < 2 or any(g["case"] is not None for g in groups):
        return None
    keys = [k for k in groups[0]["values"] if len({g["values"].get(k) for g in groups}) > 1]
    if len(keys) != 1:
        return None
    try:
        [float(g["values"][keys[0]]) for g in groups]
    except (KeyError, ValueError):
        return None
    return keys[0]


@optional_plot()
def plot_curve(summary: dict, key: str, path: Path) -> None:
    """Clean and robust accuracy (each attack @ eps, and the worst case) against a numeric grid key,
    one panel per eps, with error bars; a log axis when the values span a factor of 10 or more (the
    smallest, when 0, drawn one step below the next)."""
    groups = sorted(summary["settings"], key=lambda g: float(g["values"][key]))
    xs = [float(g["values"][key]) for g in groups]
    positive = sorted(x for x in xs if x > 0)
    log = len(positive) >= 2 and positive[-1] / positive[0] >= 10
    zero_at = positive[0] / (positive[1] / positive[0]) if log else None
    plot_xs = [x if x > 0 or not log else zero_at for x in xs]
    metrics = list(dict.fromkeys(m for g in groups for m in g["metrics"] if "@" in m))
    eps_list = sorted({m.partition(" @ ")[2] for m in metrics}, key=lambda e: _panel_order(f"x @ {e}")[1])
    fig, axes = plt.subplots(1, len(eps_list), figsize=(4.6 * len(eps_list), 3.6), squeeze=False)
    for ax, eps in zip(axes.flat, eps_list):
        curves = [("clean", "clean")] + [(m.partition(" @ ")[0], m) for m in sorted(metrics, key=_panel_order)
                                          if m.endswith(f"@ {eps}")]
        for label, metric in curves:
            ys = [100 * g["metrics"][metric][0] if metric in g["metrics"] else math.nan for g in groups]
            errs = [100 * g["metrics"][metric][1] if metric in g["metrics"] else math.nan for g in groups]
            style = dict(linewidth=2.2, color="k") if label == "all attacks" else {}
            ax.errorbar(plot_xs, ys, yerr=[0 if math.isnan(e) else e for e in errs], marker="o", markersize=3.5,
                        capsize=2, label=label, **style)
        if log:
            ax.set_xscale("log")
            if zero_at is not None and 0.0 in xs:
                ticks = [zero_at] + positive
                ax.set_xticks(ticks, ["0"] + [f"{t:g}" for t in positive])
        ax.set_title(f"eps {eps}", fontsize=10)
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel("accuracy %", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def write_summary(points: list[Point], out: Path, command: str) -> dict:
    summary = summarize(points, out)
    write_json(out / "sweep.json", {"command": command, "provenance": provenance(), **summary})
    key = numeric_key(summary)
    write_text(out / "sweep.md", markdown(summary, command, curve=key))
    plot(summary, out / "sweep.png")
    if key is not None:
        plot_curve(summary, key, out / f"sweep_{key}.png")
    return summary


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SweepError(f"{message} (see --help)")

    p = Parser(prog="python -m train.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the sweep's folder (points/, sweep.json, sweep.md, sweep.png)")
    p.add_argument("--train-args", default="", help="train.run flags every point shares (quoted), e.g. "
                                                    "\"--preset study --epochs 15\" (default: none)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a train.run option and its values (repeat for a product of grids)")
    p.add_argument("--case", action="append", default=[], metavar="LABEL=FLAGS",
                   help="a named setting: a label and train.run flags (repeat; crossed with the grids)")
    p.add_argument("--eval-args", default=None,
                   help="train.eval flags (quoted) to evaluate every point with, e.g. \"--attacks fgsm,pgd,apgd "
                        "--eps 8/255 --limit 1000\" (default: no train.eval; the reports' own evaluation only)")
    p.add_argument("--retry-failed", action="store_true", help="run again the points that failed before")
    p.add_argument("--dry-run", action="store_true", help="list the points and their commands, run nothing")
    p.add_argument("--summary-only", action="store_true", help="rewrite sweep.json / .md / .png from what is done")
    p.add_argument("--quiet", action="store_true", help="do not echo the children's output (it is in the logs)")
    p.add_argument("--jobs", type=int, default=1,
                   help="points run at a time (default 1); each child then gets cores / jobs threads: on a small "
                        "CPU, two one-thread trainings do more per hour than one two-thread training")
    p.add_argument("--threads", type=int, help="threads per child (OMP_NUM_THREADS; default: cores / --jobs with "
                                               "--jobs > 1, else torch's own choice)")
    return p


# Options each point's command sets itself: refused in --train-args, --case and --eval-args (any
# abbreviation argparse would accept, and the --flag=value form, included).
_RESERVED_TRAIN = ("--out", "--resume", "--force", "--compare", "--no-compare")
_RESERVED_EVAL = ("--out", "--resume", "--checkpoint", "--name")


def _check_reserved(words: list[str], reserved: tuple[str, ...], where: str) -> None:
    for word in words:
        flag = word.split("=", 1)[0]
        if len(flag) > 2 and flag.startswith("--"):
            hit = next((r for r in reserved if r.startswith(flag)), None)
            if hit is not None:
                raise SweepError(f"{hit} is set by the sweep for each point: leave {word} out of {where}")


def main(argv=None) -> int:
    command = "python -m train.sweep " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        try:
            train_args = shlex.split(args.train_args)
            eval_args = shlex.split(args.eval_args) if args.eval_args is not None else None
        except ValueError as e:
            raise SweepError(f"--train-args / --eval-args: {e}") from None
        if args.jobs < 1 or (args.threads is not None and args.threads < 1):
            raise SweepError("--jobs and --threads must be >= 1")
        points = plan_points(parse_grid(args.grid), parse_cases(args.case))
        _check_reserved(train_args, _RESERVED_TRAIN, "--train-args")
        for p in points:
            _check_reserved(p.train_flags, _RESERVED_TRAIN, f"--case {p.case}" if p.case else "--grid")
        _check_reserved(eval_args or [], _RESERVED_EVAL, "--eval-args")
        if args.jobs > 1 and any(w.startswith("--down") for w in train_args + [f for p in points for f in p.train_flags]):
            raise SweepError("--download with --jobs > 1 would download the data in several processes at once: "
                             "download it first (python -m train.run --download ...), then run the sweep")
        out = Path(args.out)
        _check_train_args(train_args, points)
        if args.dry_run:
            for p in points:
                print(f"{p.name}:\n  {shlex.join(_train_command(p, train_args, out / 'points' / p.name, False)[1:])}")
                if eval_args is not None:
                    model = out / "points" / p.name / "<run>" / "model.pt"
                    print(f"  {shlex.join(_eval_command(p, model, eval_args, out / 'points' / p.name / 'eval', False)[1:])}")
            return 0
        for p in points:  # a folder made with other arguments is refused now, not hours into the sweep
            check_plan(p, out, planned_commands(p, train_args, eval_args))
        ensure_writable(out, what="the sweep")
        lock = _lock(out)
    except (SweepError, ConfigError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with lock:
        if args.summary_only:
            write_summary(points, out, command)
            print(f"wrote {out}/sweep.json, sweep.md, sweep.png")
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        jobs = min(args.jobs, len(points))
        threads = args.threads or (max(1, cores // jobs) if args.jobs > 1 else None)
        runner = Runner(echo=not args.quiet, threads=threads)
        statuses = _run_points(points, out, train_args, eval_args, runner, jobs, args.retry_failed, command)
    if isinstance(statuses, int):
        return statuses
    if isinstance(statuses, Exception):
        print(f"error: {statuses}", file=sys.stderr)
        return 2
    failed = [name for name, status in statuses.items() if "failed" in status]
    print(f"\nwrote {out}/sweep.json, sweep.md, sweep.png: {len(points) - len(failed)} of {len(points)} points "
          "finished" + (f"; failed: {', '.join(failed)} (their failed.json and logs say why; --retry-failed runs "
                        "them again)" if failed else ""))
    return 1 if failed else 0


class _Lock:
    """OUT/.sweep.lock held (flock) while a sweep runs there: a second sweep in the same folder is refused."""

    def __init__(self, path: Path, handle):
        self.path, self.handle = path, handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()
        return False


def _lock(out: Path) -> _Lock:
    import fcntl

    path = out / ".sweep.lock"
    try:
        handle = open(path, "a+")
    except OSError as e:
        raise WriteError.from_os_error(path, e) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise SweepError(f"another sweep runs in {out} ({holder}): wait for it, or stop it first") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return _Lock(path, handle)


def _run_points(points: list[Point], out: Path, train_args: list[str], eval_args: list[str] | None, runner: Runner,
                jobs: int, retry_failed: bool, command: str):
    """Every point, ``jobs`` at a time -> {point: status}; an exit status (130: Ctrl-C, 143: SIGTERM)
    when stopped; a SweepError or WriteError that stopped the sweep. Whatever ends it, the children
    are stopped and the summary is written before this returns."""
    statuses: dict[str, str] = {}
    lock = threading.Lock()
    bar = tqdm(total=len(points), desc="sweep", unit="point", dynamic_ncols=True, disable=None)  # None: off in a log

    def one(point: Point) -> None:
        if runner.stopping.is_set():
            return
        tqdm.write(f"[start] {point.name}")
        status = run_point(point, out, train_args, eval_args, runner, retry_failed)
        with lock:
            statuses[point.name] = status
            bar.update(1)
            tqdm.write(f"[{len(statuses)}/{len(points)}] {point.name}: {status}"
                       + (f" (see {out / 'points' / point.name / FAILED_FILE})" if "failed" in status else ""))
            if status != "skipped":
                write_summary(points, out, command)

    previous, previous_int = signal.signal(signal.SIGTERM, _raise_stopped), signal.getsignal(signal.SIGINT)
    pool = ThreadPoolExecutor(max_workers=jobs)
    pending = {pool.submit(one, p) for p in points}
    outcome = None
    try:
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            for future in done:
                error = future.exception()
                if error is not None:
                    raise error
        outcome = statuses
    except BaseException as e:  # stop the children whatever happened, then say it
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C or SIGTERM does not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        runner.stop(from_terminal=isinstance(e, KeyboardInterrupt))
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(e, (KeyboardInterrupt, _Stopped)):
            print("\ninterrupted: the finished points and the interrupted ones' last epoch / batch are kept; run the "
                  "same command again to continue", file=sys.stderr)
            outcome = 130 if isinstance(e, KeyboardInterrupt) else 143
        elif isinstance(e, (SweepError, WriteError)):
            outcome = e
        else:
            write_summary(points, out, command)
            raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    write_summary(points, out, command)
    return outcome


def _raise_stopped(signum, frame):
    raise _Stopped()


def _check_train_args(train_args: list[str], points: list[Point]) -> None:
    """Every point's train.run flags parse (an unknown flag or value is said now, not hours later)."""
    from .config import parse_args

    for p in points:
        try:
            parse_args([*train_args, *p.train_flags, "--no-compare"])
        except ConfigError as e:
            raise SweepError(f"point {p.name}: train.run refuses its flags: {e}") from None


if __name__ == "__main__":
    raise SystemExit(main())
