"""Copy what a sweep of the study has finished into the repository, where the study cites it from.

    python docs/study/land.py runs/study/retrain/at2_seed0      # then commit what it lists

For a sweep folder NAME (train.sweep's --out), each point's trained model (model.pt, report.json,
report.md) goes to docs/study/models/DATE/NAME/POINT/ as soon as its training has ended, and its finished
evaluation (eval.json, eval.md) to docs/study/data/DATE/NAME/eval_POINT.json; the sweep's summary
(sweep.json, sweep.md) follows once every point is evaluated. DATE is the day the model was trained (its
provenance), POINT the point's name without '=' (at2_seed=0 -> at2_seed0). A file already landed is never
overwritten: a second run lists only what is new.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root, for train
from train.results import finished_models  # noqa: E402

MODELS = ROOT / "docs" / "study" / "models"
DATA = ROOT / "docs" / "study" / "data"
MODEL_FILES = ("model.pt", "report.json", "report.md")


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _trained(point: Path) -> Path | None:
    """The point's run folder once train.run has finished (model.pt and report.json written)."""
    runs = sorted(r.parent for r in point.glob("*/report.json") if (r.parent / "model.pt").is_file())
    return runs[0] if runs else None


def _date(run: Path) -> str:
    report = _json(run / "report.json") or {}
    date = (report.get("provenance") or {}).get("date_utc", "")
    if len(date) < 10:
        raise SystemExit(f"{run / 'report.json'} has no provenance date: land it by hand")
    return date[:10]


def _copy(src: Path, dst: Path, landed: list[Path]) -> None:
    if src.is_file() and not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        landed.append(dst)


def land(sweep: Path, models: Path = MODELS, data: Path = DATA) -> list[Path]:
    """The files copied, in the order copied."""
    if not (sweep / "points").is_dir():
        raise SystemExit(f"{sweep} is not a train.sweep folder (no points/)")
    landed: list[Path] = []
    evaluated, dates = [], set()
    points = sorted(p for p in (sweep / "points").iterdir() if p.is_dir())
    for point in points:
        run = _trained(point)
        if run is None:
            continue
        date, name = _date(run), point.name.replace("=", "")
        dates.add(date)
        for file in MODEL_FILES:
            _copy(run / file, models / date / sweep.name / name / file, landed)
        if finished_models(point / "eval" / "eval.json") is not None:
            evaluated.append(point)
            for suffix in (".json", ".md"):
                _copy(point / "eval" / f"eval{suffix}", data / date / sweep.name / f"eval_{name}{suffix}", landed)
    if points and len(evaluated) == len(points) and len(dates) == 1:
        (date,) = dates
        for file in ("sweep.json", "sweep.md"):
            _copy(sweep / file, data / date / sweep.name / file, landed)
    return landed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweeps", nargs="+", type=Path, help="train.sweep folders (their --out)")
    args = p.parse_args(argv)
    for sweep in args.sweeps:
        landed = land(sweep)
        for path in landed:
            print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        if not landed:
            print(f"{sweep}: nothing new to land", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
