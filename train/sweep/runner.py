"""Running a point: its train.run and train.eval child processes, resumable, their logs, the records
that say what is done or failed, and the pool that runs several points at once."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from tqdm import tqdm  # noqa: E402

from plumbing.files import WriteError, write_json  # noqa: E402

from ..results import finished_models  # noqa: E402
from .plan import Point, SweepError  # noqa: E402

# ---------------------------------------------------------------- running

POINT_FILE, FAILED_FILE, PLAN_FILE = "point.json", "failed.json", "plan.json"
# Exit statuses of a child stopped by Ctrl-C or SIGTERM (train.run / train.eval's own, or the signal's).
_STOPPED_CODES = {130, 143, -signal.SIGINT, -signal.SIGTERM}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None




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
    return name in (finished_models(folder / "eval.json") or {})


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


