"""python -m train.sweep's command line (the package docstring says what it does)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from tqdm import tqdm  # noqa: E402

from plumbing.files import WriteError, ensure_writable  # noqa: E402
from plumbing.lock import FolderBusy, folder_lock  # noqa: E402

from ..config import ConfigError  # noqa: E402
from .plan import Point, SweepError, parse_cases, parse_grid, plan_points  # noqa: E402
from .runner import (  # noqa: E402
    FAILED_FILE,
    Runner,
    _eval_command,
    _Stopped,
    _train_command,
    check_plan,
    planned_commands,
    run_point,
)
from .summary import write_summary  # noqa: E402

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
SWEEP_LOCK = ".sweep.lock"  # the sweep's own (train.run holds .lock in each point's folder)
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
        lock = contextlib.ExitStack()
        lock.enter_context(folder_lock(out, "train.sweep", SWEEP_LOCK))  # a second sweep here is refused
    except (SweepError, ConfigError, WriteError, FolderBusy) as e:
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
    from ..config import parse_args

    for p in points:
        try:
            parse_args([*train_args, *p.train_flags, "--no-compare"])
        except ConfigError as e:
            raise SweepError(f"point {p.name}: train.run refuses its flags: {e}") from None
