"""The sweep's plan: its grid and cases, the points they make, and each point's train.run flags."""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")


from ..config import build_parser as build_run_parser  # noqa: E402

SEED_KEY = "seed"  # the grid key a setting is aggregated over
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


