"""Faults of the machine: a file system that fills up, a read-only or unwritable folder, a
process killed mid-write, a damaged checkpoint, a rank that dies or hangs under torchrun, an
interrupted evaluation or benchmark sweep. Each ends in one line, keeps what was complete and leaves
no temporary file behind.

A full disk is a small tmpfs and a read-only folder a read-only bind mount where the test may mount
(root on Linux; root ignores permission bits, so chmod cannot make a folder unwritable); elsewhere
those tests skip, and the same faults are injected as the OSError the file system would raise
(ENOSPC, EACCES), which runs everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import free_port

import plumbing.files as files
import train.engine as engine
import train.run as run_module
from plumbing.files import (
    WriteError,
    ensure_writable,
    optional_plot,
    save_figure,
    write_text,
    write_with,
)
from plumbing.lock import folder_lock
from train.checkpoint import (
    OPTIMIZER_STATE_COPIES,
    checkpoint_bytes,
    load_checkpoint,
    save_checkpoint,
)
from train.results import images_done
from train.run import main

ROOT = Path(__file__).resolve().parents[2]
# Two steps of 50 images per epoch, two time steps: the faults, not the learning, are under test.
SMALL = ["--train-limit", "100", "--test-limit", "50", "--eval-attacks", "", "--batch-size", "50", "--T", "2",
         "--eta", "0.05", "--no-compare"]


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _temporary_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp"))


# ------------------------------------------------------------------ file systems made for a test

def _mount(*args) -> str | None:
    """None, or why the mount failed."""
    try:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None if done.returncode == 0 else (done.stderr or done.stdout).strip()


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    why = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if why:
        pytest.skip(f"cannot mount a tmpfs here ({why}); the injected-error variant covers this fault")
    try:
        yield path
    finally:
        _umount(path)


@contextmanager
def read_only(path: Path):
    """``path`` as a read-only bind mount of a fresh folder."""
    source = path.with_name(path.name + "-source")
    source.mkdir(parents=True)
    path.mkdir(parents=True)
    why = _mount("--bind", str(source), str(path))
    if why:
        pytest.skip(f"cannot bind-mount here ({why}); the injected-error variant covers this fault")
    try:
        why = _mount("-o", "remount,bind,ro", str(path))
        if why:
            pytest.skip(f"cannot remount read-only here ({why}); the injected-error variant covers this fault")
        yield path
    finally:
        _umount(path)


def _fill(folder: Path) -> Path:
    """Take every free byte of folder's file system."""
    filler = folder / "filler"
    f = open(filler, "wb")
    try:
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        try:
            f.close()
        except OSError:
            pass
    return filler


def _fail_writes_with(error_number: int, after_bytes: int = 1000):
    """A replacement for the write helper's file writes: the first after_bytes bytes go through, then
    the OS error (as a full disk does, part-way through a file)."""
    real = files._RecordingFile.write
    written = [0]

    def write(self, data):
        if written[0] + len(data) > after_bytes:
            self.error = self.error or OSError(error_number, os.strerror(error_number))
            raise self.error
        written[0] += len(data)
        return real(self, data)

    return write


# ------------------------------------------------------------------ the write helper

@pytest.mark.parametrize("where", ["write", "fsync", "rename"])
@pytest.mark.parametrize("error_number,cause", [(errno.ENOSPC, "no space left on device"),
                                                 (errno.EACCES, "permission denied"),
                                                 (errno.EROFS, "read-only file system")])
def test_a_failed_write_is_one_line_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, where,
                                                                               error_number, cause):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()
    error = OSError(error_number, os.strerror(error_number))
    if where == "write":  # inside torch.save, which turns it into "RuntimeError: ... unexpected pos"
        monkeypatch.setattr(files._RecordingFile, "write", _fail_writes_with(error_number))
    else:
        target = {"fsync": "fsync", "rename": "replace"}[where]
        monkeypatch.setattr(files.os, target, lambda *a: (_ for _ in ()).throw(error))
    with pytest.raises(WriteError) as caught:
        save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(100_000)})
    monkeypatch.undo()
    assert str(caught.value) == f"cannot write {path}: {cause}"
    assert caught.value.errno == error_number
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    assert _temporary_files(tmp_path) == []


def test_a_write_that_is_not_an_os_error_propagates_and_cleans_up(tmp_path):
    with pytest.raises(ZeroDivisionError):
        write_with(tmp_path / "x.json", lambda f: f.write(b"{") and 1 / 0)
    assert list(tmp_path.iterdir()) == []


def test_a_full_tmpfs(tmp_path):
    """The real thing: torch.save into a file system that fills up mid-file."""
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "checkpoint.pt"
        save_checkpoint(path, {"epoch": 1})
        before = path.read_bytes()
        with pytest.raises(WriteError) as caught:
            save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(1 << 20)})  # 4 MiB
        assert str(caught.value) == f"cannot write {path}: no space left on device"
        assert path.read_bytes() == before and _temporary_files(disk) == []
        assert os.statvfs(disk).f_bfree * os.statvfs(disk).f_frsize > 900_000  # the space is given back


def test_a_read_only_folder(tmp_path):
    with read_only(tmp_path / "ro") as folder:
        with pytest.raises(WriteError) as caught:
            write_text(folder / "eval.json", "{}")
        assert str(caught.value) == f"cannot write {folder / 'eval.json'}: read-only file system"
        with pytest.raises(WriteError) as caught:
            ensure_writable(folder / "run" / "plain")
        assert str(caught.value) == f"cannot write {folder / 'run' / 'plain'}: read-only file system"


def test_ensure_writable_checks_room_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda folder: 3 << 20)
    with pytest.raises(WriteError) as caught:
        ensure_writable(tmp_path / "a" / "b", need_bytes=5 << 20, what="the run")
    assert str(caught.value) == f"cannot write {tmp_path / 'a' / 'b'}: the run needs about 5.0 MiB but only " \
                                "3.0 MiB are free there"
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone again
    assert ensure_writable(tmp_path / "a", need_bytes=2 << 20) == tmp_path / "a"
    assert list((tmp_path / "a").iterdir()) == []


def test_a_plot_that_cannot_be_written_or_drawn_is_a_warning(tmp_path, monkeypatch, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    monkeypatch.setattr(files, "_create_temporary", lambda path: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied")))
    assert save_figure(fig, tmp_path / "p.png") is False
    monkeypatch.undo()
    plt.close(fig)
    assert _one_line(capsys.readouterr().err) == (f"warning: cannot write {tmp_path / 'p.png'}: permission denied "
                                                  "(plot skipped)")

    @optional_plot(fallback=list)
    def broken_plot(path):
        plt.subplots(2, 2)
        raise ValueError("autodetected range of [nan, nan] is not finite")

    open_before = plt.get_fignums()
    assert broken_plot(tmp_path / "q.png") == []
    assert plt.get_fignums() == open_before
    assert _one_line(capsys.readouterr().err) == ("warning: broken_plot could not draw its plot (ValueError: "
                                                  "autodetected range of [nan, nan] is not finite); plot skipped")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ what a run will write

def test_checkpoint_size_estimate():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20))
    params = (10 * 20 + 20 + 20 + 20) * 4
    buffers = (20 + 20) * 4 + 8  # running mean and var, num_batches_tracked
    extra = 1 << 20
    assert checkpoint_bytes(model, "sgd", momentum=0.9) == params * 2 + buffers + extra
    assert checkpoint_bytes(model, "sgd", momentum=0.0) == params + buffers + extra
    assert checkpoint_bytes(model, "adam") == params * 3 + buffers + extra
    assert OPTIMIZER_STATE_COPIES == {"sgd": 1, "adam": 2}
    with torch.device("meta"):  # how train.run sizes it, before any weight exists
        meta = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20))
    assert checkpoint_bytes(meta, "adam") == checkpoint_bytes(model, "adam")


def test_planned_output_is_two_checkpoints_a_model_and_reports_per_run(tmp_path):
    from train.config import parse_args
    from train.data import dataset_info

    cfg, _ = parse_args(["--optimizer", "adam", "--out", str(tmp_path)])
    info = dataset_info(cfg.data)
    model = engine.build_for(cfg, info)
    ckpt = checkpoint_bytes(model, "adam")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    per_run = 2 * ckpt + weights + engine.REPORT_BYTES
    assert engine.planned_output_bytes(cfg, info, runs=2) == 2 * per_run
    cfg.keep_previous = True
    assert engine.planned_output_bytes(cfg, info, runs=1) == per_run + ckpt
    (tmp_path / "mpd").mkdir()
    (tmp_path / "mpd" / "checkpoint.pt").write_bytes(b"x" * 1000)  # replaced by the run: already counted
    assert engine.planned_output_bytes(cfg, info, runs=1, run_dirs=[tmp_path / "mpd"]) == per_run + ckpt - 1000
    # 'quick': a small SNN, about 0.2 M parameters, Adam: a few MiB per checkpoint
    assert 2 << 20 < ckpt < 8 << 20


# ------------------------------------------------------------------ train.run

@pytest.fixture
def no_data_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the data were loaded before the output folder was checked")

    monkeypatch.setattr(run_module, "load_dataset", refuse)


@pytest.mark.parametrize("how", ["read-only mount", "injected EACCES"])
def test_unwritable_out_is_refused_before_the_data_load(how, tmp_path, monkeypatch, capsys, no_data_load):
    if how == "read-only mount":
        with read_only(tmp_path / "ro") as folder:
            code = main(SMALL + ["--out", str(folder / "run")])
        cause, where = "read-only file system", folder / "run"
    else:
        monkeypatch.setattr(files, "_create_temporary", lambda path: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, "Permission denied")))
        code = main(SMALL + ["--out", str(tmp_path / "run")])
        cause, where = "permission denied", tmp_path / "run"
        assert not where.exists()
    assert code == 2
    assert _one_line(capsys.readouterr().err) == f"error: cannot write {where}: {cause}"


@pytest.mark.parametrize("how", ["tmpfs", "injected free space"])
def test_too_little_room_is_refused_before_the_data_load(how, tmp_path, monkeypatch, capsys, no_data_load):
    if how == "tmpfs":
        with tmpfs(tmp_path / "disk", "2m") as disk:
            code = main(SMALL + ["--out", str(disk / "run")])
            out = disk / "run"
    else:
        monkeypatch.setattr(files, "free_bytes", lambda folder: 2 << 20)
        code = main(SMALL + ["--out", str(tmp_path / "run")])
        out = tmp_path / "run"
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {out}: the run (1 model(s): checkpoints, model.pt, reports) "
                           "needs about ") and line.endswith(" are free there"), line


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tmpfs", "injected ENOSPC"])
def test_disk_full_during_a_checkpoint_stops_the_run_and_resume_continues(how, tmp_path, monkeypatch, capsys):
    """Epoch 1's checkpoint is written; the disk fills up in epoch 2's: the run stops in one line,
    checkpoint.pt still holds epoch 1, no temporary file is left; with room again --resume finishes."""
    with (tmpfs(tmp_path / "disk", "24m") if how == "tmpfs" else _folder(tmp_path / "disk")) as disk:
        out = disk / "run"
        real = engine._save_epoch

        def save_epoch(run_dir, state, keep_previous):
            if state["epoch"] == 2:
                if how == "tmpfs":
                    _fill(disk)
                else:
                    monkeypatch.setattr(files._RecordingFile, "write", _fail_writes_with(errno.ENOSPC))
            return real(run_dir, state, keep_previous)

        monkeypatch.setattr(engine, "_save_epoch", save_epoch)
        code = main(SMALL + ["--epochs", "3", "--out", str(out)])
        line = _one_line(capsys.readouterr().err)
        assert code == 2
        assert line == (f"error: cannot write {out / 'mpd' / 'checkpoint.pt'}: no space left on device; [mpd] stopped: "
                        "epoch 2 is lost, the last complete checkpoint (epoch 1) is kept; make room, then continue "
                        "with --resume")
        assert load_checkpoint(out / "mpd" / "checkpoint.pt")["epoch"] == 1
        assert len((out / "mpd" / "metrics.jsonl").read_text().splitlines()) == 1
        assert _temporary_files(disk) == []

        monkeypatch.undo()
        (disk / "filler").unlink(missing_ok=True)
        assert main(SMALL + ["--epochs", "3", "--out", str(out), "--resume"]) == 0
        assert "resuming after epoch 1/3" in capsys.readouterr().out
        assert load_checkpoint(out / "mpd" / "checkpoint.pt")["epoch"] == 3
        assert [json.loads(x)["epoch"] for x in (out / "mpd" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
        assert (out / "mpd" / "model.pt").is_file() and _temporary_files(disk) == []


@contextmanager
def _folder(path: Path):
    path.mkdir(parents=True)
    yield path


def test_sigterm_mid_write_and_out_of_memory_end_in_one_line(tmp_path, monkeypatch, capsys):
    """SIGTERM arriving while epoch 2's checkpoint is being written: the temporary file is removed,
    epoch 1's checkpoint kept. Then running out of memory in an epoch."""
    real_write = files._RecordingFile.write
    real_save = engine._save_epoch

    def save_epoch(run_dir, state, keep_previous):
        if state["epoch"] == 2:
            def write(self, data):
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
                return real_write(self, data)

            monkeypatch.setattr(files._RecordingFile, "write", write)
        return real_save(run_dir, state, keep_previous)

    monkeypatch.setattr(engine, "_save_epoch", save_epoch)
    out = tmp_path / "run"
    assert main(SMALL + ["--epochs", "3", "--out", str(out)]) == 143
    assert _one_line(capsys.readouterr().err) == ("stopped by SIGTERM: the last finished epoch is in the run's "
                                                  "checkpoint; continue with --resume")
    assert signal.getsignal(signal.SIGTERM) is not run_module._raise_terminated  # handed back
    assert load_checkpoint(out / "mpd" / "checkpoint.pt")["epoch"] == 1 and _temporary_files(tmp_path) == []
    monkeypatch.undo()

    def evaluate(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "evaluate", evaluate)
    assert main(SMALL + ["--epochs", "3", "--out", str(out), "--resume"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); lower --batch-size or "
        "--eval-batch-size; the last finished epoch is in the run's checkpoint; continue with --resume")


def test_a_plot_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    real = files._create_temporary

    def create(path):
        if path.suffix == ".png":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path)

    monkeypatch.setattr(files, "_create_temporary", create)
    assert main(SMALL + ["--epochs", "1", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: cannot write {tmp_path / 'mpd' / name}: no space left on device (plot skipped)"
                   for name in ("membrane.png", "curves.png")]
    assert (tmp_path / "mpd" / "report.md").is_file() and not list(tmp_path.rglob("*.png"))


# ------------------------------------------------------------------ damaged checkpoints and leftovers

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs with --keep-previous: checkpoint.pt (epoch 2) and checkpoint.previous.pt (epoch 1)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(SMALL + ["--epochs", "2", "--keep-previous", "--out", str(out)]) == 0
    assert load_checkpoint(out / "mpd" / "checkpoint.previous.pt")["epoch"] == 1
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    import shutil

    return Path(shutil.copytree(trained, tmp_path / "run"))


def test_flipped_bits_are_reported_and_the_previous_checkpoint_offered(run_copy, capsys):
    ckpt, previous = run_copy / "mpd" / "checkpoint.pt", run_copy / "mpd" / "checkpoint.previous.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the weights: torch.load alone would load it as a wrong weight
    ckpt.write_bytes(bytes(data))
    code = main(SMALL + ["--epochs", "2", "--out", str(run_copy), "--resume"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"error: {ckpt} is corrupt: its record archive/data/") and line.endswith(
        f"fails the CRC-32 check (bits changed after it was written); the previous epoch's {previous} is intact: "
        f"move it to {ckpt} and --resume again, or start over with --force"), line
    os.replace(previous, ckpt)
    assert main(SMALL + ["--epochs", "2", "--out", str(run_copy), "--resume"]) == 0
    assert "resuming after epoch 1/2" in capsys.readouterr().out


def test_a_second_train_run_on_the_same_folder_is_refused_and_writes_nothing(run_copy, capsys):
    """Another train.run holds the folder (its lock, as a running one does): this one stops in one line naming
    it, and writes nothing (before this lock, both exited 0 and left one's config.json beside the other's model)."""
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    with folder_lock(run_copy, "train.run"):
        code = main(SMALL + ["--epochs", "3", "--out", str(run_copy), "--resume"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and line.startswith(f"error: {run_copy} is in use by train.run (pid {os.getpid()} on ")
    assert line.endswith("wait for it to finish, or choose another output folder")
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert main(SMALL + ["--epochs", "2", "--out", str(run_copy), "--resume"]) == 0  # the lock went with its holder


def test_a_refused_resume_writes_nothing(run_copy, capsys):
    """--resume with other settings is refused before config.json (or anything else) is rewritten."""
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    code = main(SMALL + ["--epochs", "2", "--width", "8", "--out", str(run_copy), "--resume"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "the run was started with other settings (width: " in line, line
    assert {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_truncated_checkpoint_is_reported_and_force_starts_over(run_copy, capsys):
    ckpt = run_copy / "mpd" / "checkpoint.pt"
    (run_copy / "mpd" / "checkpoint.previous.pt").unlink()
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert main(SMALL + ["--epochs", "2", "--out", str(run_copy), "--resume"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"error: {ckpt} is cut short or corrupt (the end of its archive is missing); start over with --force, or "
        "put a copy of an earlier checkpoint you keep in its place (--keep-previous keeps the previous epoch's)")
    assert main(SMALL + ["--epochs", "2", "--out", str(run_copy), "--resume", "--force"]) == 2
    assert "--resume continues the run, --force starts it over" in _one_line(capsys.readouterr().err)
    assert main(SMALL + ["--epochs", "1", "--out", str(run_copy), "--force"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert load_checkpoint(ckpt)["epoch"] == 1

    from train.eval import main as eval_main

    model = run_copy / "mpd" / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    assert eval_main(["--checkpoint", str(model), "--limit", "8", "--out", str(run_copy / "eval")]) == 2
    assert _one_line(capsys.readouterr().err) == (f"error: {model} is cut short or corrupt (the end of its archive "
                                                  "is missing)")
    assert not (run_copy / "eval").exists()


def test_a_temporary_file_left_by_a_killed_process_is_ignored_and_removed_by_resume(run_copy, capsys):
    ckpt = run_copy / "mpd" / "checkpoint.pt"
    before = ckpt.read_bytes()
    # a process killed while it writes the checkpoint, through the real helper (plumbing/files.py, loaded alone)
    script = ("import importlib.util, os, signal, sys\n"
              f"spec = importlib.util.spec_from_file_location('files', {str(ROOT / 'plumbing' / 'files.py')!r})\n"
              "files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)\n"
              "def write(f):\n"
              "    f.write(b'PK' + bytes(100_000)); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              f"files.write_with({str(ckpt)!r}, write)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    leftovers = _temporary_files(run_copy)
    assert len(leftovers) == 1 and leftovers[0].name.startswith("checkpoint.pt.") and ckpt.read_bytes() == before
    old_style = run_copy / "mpd" / "checkpoint.pt.tmp"  # the name earlier versions used
    old_style.write_bytes(b"PK")
    assert main(SMALL + ["--epochs", "2", "--out", str(run_copy), "--resume"]) == 0
    out = capsys.readouterr().out
    for path in sorted(leftovers + [old_style]):
        assert f"removed {path} (a temporary file left by an interrupted write)" in out
    assert "resuming after epoch 2/2" in out and _temporary_files(run_copy) == []


# ------------------------------------------------------------------ several processes

def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a process that aborts prints where its Python code was
    env.update({k: str(v) for k, v in extra.items()})
    return env


WORKER = str(Path(__file__).resolve().parent / "fault_worker.py")
DDP = SMALL + ["--train-limit", "200", "--epochs", "2"]  # two steps per rank and epoch


def _torchrun(args, **env):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", WORKER, *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_with_a_killed_rank_stops_in_one_line_and_resumes(tmp_path):
    """Plain torchrun: rank 1 is killed in epoch 2; torchrun stops rank 0 (SIGTERM) or rank 0 finds
    its peer gone first. Either way rank 0 says so in one line, no traceback of ours, and epoch 1's
    checkpoint is intact; --resume under torchrun finishes the run."""
    out = tmp_path / "run"
    done = _torchrun(DDP + ["--out", str(out)], FAULT="kill", FAULT_RANK=1, FAULT_EPOCH=2)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith(("error:", "stopped by SIGTERM:"))]
    assert len(ours) == 1, done.stderr[-3000:]
    sigterm = "stopped by SIGTERM: rank 0: the last finished epoch is in the run's checkpoint; continue with --resume"
    assert ours[0] == sigterm or ours[0].startswith("error: rank 0: lost contact with the other processes ("), ours
    assert f'File "{ROOT / "train"}' not in done.stderr, done.stderr[-3000:]  # torchrun's own report aside
    assert load_checkpoint(out / "mpd" / "checkpoint.pt")["epoch"] == 1 and _temporary_files(tmp_path) == []

    resumed = _torchrun(DDP + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[mpd] resuming after epoch 1/2" in resumed.stdout
    assert load_checkpoint(out / "mpd" / "checkpoint.pt")["epoch"] == 2 and (out / "mpd" / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_processes_that_keep_running_stop_when_a_rank_dies_or_hangs(fault, tmp_path):
    """Two processes started by hand (no torchrun to tear them down): rank 1 is killed or hangs
    (SIGSTOP) at the end of epoch 2; rank 0 stops with one line naming its rank and the cause: at
    once for a dead peer, after --dist-timeout for a hung one. (A rank that runs out of memory says
    so in one line, test_sigterm_mid_write_and_out_of_memory_end_in_one_line, and exits: to the
    others, a dead peer.)"""
    port = free_port()
    args = [sys.executable, WORKER, *DDP, "--epochs", "3", "--dist-timeout", "15", "--out", str(tmp_path / "run")]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, FAULT=fault, FAULT_RANK=1, FAULT_EPOCH=2))
             for rank in (0, 1)]
    try:
        _, err0 = procs[0].communicate(timeout=300)
    finally:
        if fault == "stop" or procs[0].poll() is None:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        procs[1].communicate(timeout=60)
    assert procs[0].returncode == 2, err0[-3000:]
    line = _one_line(err0)
    assert line.startswith("error: rank 0: lost contact with the other processes (") and line.endswith(
        "): one of them died or hangs, see its message; the last finished epoch is in the run's checkpoint; "
        "continue with --resume"), line
    if fault == "stop":
        assert "Timed out" in line, line
    assert load_checkpoint(tmp_path / "run" / "mpd" / "checkpoint.pt")["epoch"] == 1
    assert _temporary_files(tmp_path) == []


# ------------------------------------------------------------------ an interrupted evaluation or sweep

def _tiny_model(path: Path, seed: int, encoding: str) -> Path:
    from models import build_model

    torch.manual_seed(seed)
    spec = {"model": "small", "in_channels": 1, "num_classes": 10, "image_size": 28, "T": 2, "encoding": encoding,
            "neuron": {"backend": "torch"}, "mean": [0.286], "std": [0.353], "data": "fmnist-subset"}
    model = build_model("small", **{k: v for k, v in spec.items() if k not in ("model", "data")})
    save_checkpoint(path, {"run": "plain", "eta": 0.0, "config": {}, "model": model.state_dict(), "model_spec": spec})
    return path


def test_resume_refuses_an_evaluation_counted_by_an_older_version(tmp_path, capsys):
    """An eval.json from before the worst case's smaller-eps rule (its key has no version) is not
    continued: its counts and the new ones would mix two rules."""
    import train.eval as eval_module

    a = _tiny_model(tmp_path / "a" / "model.pt", 0, "direct")
    argv = ["--checkpoint", str(a), "--attacks", "fgsm", "--eps", "8/255", "--limit", "8", "--batch-size", "8",
            "--no-large-eps-check", "--no-compile", "--out", str(tmp_path / "e")]
    assert eval_module.main(argv) == 0
    path = tmp_path / "e" / "eval.json"
    saved = json.loads(path.read_text())
    assert saved["key"]["version"] == eval_module.RESULTS_VERSION
    del saved["key"]["version"]
    path.write_text(json.dumps(saved))
    capsys.readouterr()
    assert eval_module.main(argv + ["--resume"]) == 2
    assert (f"counts differently (results version 1, this one {eval_module.RESULTS_VERSION})"
            in _one_line(capsys.readouterr().err))


@pytest.mark.slow
def test_an_interrupted_evaluation_continues_to_the_same_result(tmp_path, monkeypatch, capsys):
    """Model b (Poisson: its forward draws from the global RNG) is interrupted after its first batch;
    --resume keeps model a, continues b from its second batch, and ends with what an uninterrupted
    evaluation gives."""
    import train.eval as eval_module

    a, b = _tiny_model(tmp_path / "a" / "model.pt", 0, "direct"), _tiny_model(tmp_path / "b" / "model.pt", 1, "poisson")
    argv = ["--checkpoint", str(a), "--checkpoint", str(b), "--attacks", "fgsm,pgd,gaussian", "--steps", "2",
            "--eps", "8/255", "--limit", "16", "--batch-size", "8", "--eot", "1", "--no-large-eps-check",
            "--no-compile"]
    assert eval_module.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "eval.json").read_text())

    real = eval_module.evaluate_robustness

    def interrupted(model, *args, desc, on_batch, **kwargs):
        def stop_after_first_batch(state):
            on_batch(state)
            raise KeyboardInterrupt

        return real(model, *args, desc=desc, on_batch=stop_after_first_batch if desc == "b" else on_batch, **kwargs)

    monkeypatch.setattr(eval_module, "evaluate_robustness", interrupted)
    out = tmp_path / "parts"
    assert eval_module.main(argv + ["--out", str(out)]) == 130
    assert _one_line(capsys.readouterr().err) == (f"interrupted: what finished is in {out / 'eval.json'}; continue "
                                                  f"with the same command with --out {out} --resume")
    partial = json.loads((out / "eval.json").read_text())
    assert list(partial["models"]) == ["a"] and partial["in_progress"]["model"] == "b"
    assert partial["in_progress"]["state"]["next"] == 8
    assert images_done(out / "eval.json") == (8, 16)  # what validity.py plan shows of a started job
    monkeypatch.undo()

    assert eval_module.main(argv + ["--out", str(out), "--eps", "4/255", "--resume"]) == 2
    assert "was made with other settings (settings.eps)" in _one_line(capsys.readouterr().err)
    assert eval_module.main(argv + ["--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "[a] evaluated before: kept from" in printed and "[b] continuing after image 8 of 16" in printed
    resumed = json.loads((out / "eval.json").read_text())
    assert "in_progress" not in resumed and images_done(out / "eval.json") is None

    def without_time(report):
        return {name: {k: v for k, v in r.items() if k not in ("seconds", "provenance")}
                for name, r in report["models"].items()}

    assert without_time(resumed) == without_time(whole)
    assert (out / "eval.md").is_file() and (out / "robustness.png").is_file() and _temporary_files(tmp_path) == []


def test_an_interrupted_kernel_sweep_continues_with_the_sizes_it_lacks(tmp_path, monkeypatch, capsys):
    from bench import kernels

    argv = ["--providers", "torch_eager", "--dtype", "float32", "--T", "2", "--sizes", "2^10", "2^11", "--passes",
            "forward", "--stats", "off", "--rep-ms", "1", "--warmup-ms", "1", "--no-progress", "--out", str(tmp_path)]
    real_write, real_measure = kernels.write_json, kernels._measure

    def write_then_stop(path, payload):
        real_write(path, payload)
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels, "write_json", write_then_stop)
    assert kernels.main(argv) == 130
    assert _one_line(capsys.readouterr().err) == (
        f"interrupted: the sizes measured so far are in {tmp_path / 'results.json'}; continue with the same command "
        f"and --out {tmp_path} --resume")
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["complete"] is False and [r["elements"] for r in partial["measurements"]] == [1 << 10]
    monkeypatch.undo()

    measured = []
    monkeypatch.setattr(kernels, "_measure", lambda step, x, *a: measured.append(x.numel()) or real_measure(
        step, x, *a))
    assert kernels.main(argv + ["--resume"]) == 0
    assert measured == [1 << 11]  # only the size it lacked
    final = json.loads((tmp_path / "results.json").read_text())
    assert final["complete"] is True and [r["elements"] for r in final["measurements"]] == [1 << 10, 1 << 11]
    assert final["measurements"][0] == partial["measurements"][0]
    assert final["copy_bandwidth"] == partial["copy_bandwidth"]

    with pytest.raises(SystemExit):
        kernels.main(argv + ["--resume", "--rep-ms", "2"])
    assert "was measured with other settings or elsewhere (rep_ms)" in capsys.readouterr().err


def test_benchmarks_refuse_an_unwritable_out_in_one_line(tmp_path, capsys):
    from bench import kernels

    with read_only(tmp_path / "ro") as folder:
        code = kernels.main(["--providers", "torch_eager", "--T", "2", "--sizes", "2^10", "--out", str(folder / "k")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == f"error: cannot write {folder / 'k'}: read-only file system"
