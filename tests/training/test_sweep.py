"""python -m train.sweep: planning, resuming decisions, the summary, and a real sweep end to end
(interrupted and continued)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from plumbing.lock import folder_lock
from train import sweep
from train.sweep import SweepError, main, parse_cases, parse_grid, plan_points
from train.sweep import cli as sweep_cli
from train.sweep import runner as sweep_runner
from train.sweep import summary as sweep_summary

ROOT = Path(__file__).resolve().parents[2]
TINY = ("--train-limit 100 --test-limit 40 --epochs 1 --batch-size 50 --eval-attacks '' --width 4 "
        "--eval-batch-size 40")


# ---------------------------------------------------------------- planning


def test_points_are_the_cases_crossed_with_the_grid():
    points = plan_points(parse_grid(["eta=0,0.1", "seed=0,1"]), parse_cases(["plain=--sr-lambda 0", "at=--adv-train"]))
    assert [p.name for p in points] == [
        "plain_eta=0_seed=0", "plain_eta=0_seed=1", "plain_eta=0.1_seed=0", "plain_eta=0.1_seed=1",
        "at_eta=0_seed=0", "at_eta=0_seed=1", "at_eta=0.1_seed=0", "at_eta=0.1_seed=1"]
    assert points[-1].train_flags == ["--adv-train", "--eta", "0.1", "--seed", "1"]
    assert points[0].setting == "plain_eta=0" and points[1].setting == "plain_eta=0"
    switches = plan_points(parse_grid(["adv-train=on,off", "classifier-bn=on,off"]), {})
    assert [p.train_flags for p in switches] == [["--adv-train", "--classifier-bn"],
                                                ["--adv-train", "--no-classifier-bn"],
                                                ["--no-adv-train", "--classifier-bn"],
                                                ["--no-adv-train", "--no-classifier-bn"]]
    assert [p.name for p in plan_points({}, {})] == ["default"]


@pytest.mark.parametrize("grid, cases, message", [
    (["eta"], [], "expected KEY=V1,V2"),
    (["eta=0", "eta=1"], [], "given twice"),
    (["eta=0,0"], [], "repeated"),
    (["colour=red"], [], "not a train.run option"),
    (["out=a,b"], [], "not a train.run option"),
    (["adv-train=maybe"], [], "on or off"),
    ([], ["no flags"], "expected LABEL="),
    ([], ["a=--eta 0", "a=--eta 1"], "given twice"),
])
def test_bad_plans_are_refused_in_one_line(grid, cases, message):
    with pytest.raises(SweepError, match=message):
        plan_points(parse_grid(grid), parse_cases(cases))


@pytest.mark.parametrize("args, message", [
    (["--train-args", "--out elsewhere"], "--out is set by the sweep"),
    (["--train-args=--out=elsewhere"], "--out is set by the sweep"),
    (["--train-args=--forc"], "--force is set by the sweep"),
    (["--case", "a=--force"], "leave --force out of --case a"),
    (["--case", "a=--resume"], "--resume is set by the sweep"),
    (["--eval-args", "--name x"], "--name is set by the sweep"),
    (["--eval-args", "--checkpoint m.pt"], "--checkpoint is set by the sweep"),
    (["--case", "..=--eta 0"], "at least one letter or digit"),
    (["--jobs", "2", "--train-args=--download"], "download it first"),
    (["--jobs", "0"], "must be >= 1"),
])
def test_options_the_sweep_sets_itself_are_refused(tmp_path, capsys, args, message):
    assert main(["--out", str(tmp_path / "s"), "--grid", "seed=0", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_second_sweep_in_the_same_folder_is_refused(tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    with folder_lock(tmp_path, "train.sweep", sweep_cli.SWEEP_LOCK):
        assert main(["--out", str(tmp_path), "--grid", "seed=0", "--summary-only"]) == 2
        assert f"{tmp_path} is in use by train.sweep (pid {os.getpid()}" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--grid", "seed=0", "--summary-only"]) == 0


def test_bad_command_lines(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--grid", "eta=-1"]) == 2
    assert "point eta=-1: train.run refuses its flags: eta must be >= 0" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--train-args", "--epochs 'x"]) == 2
    assert "--train-args" in capsys.readouterr().err
    assert main(["--grid", "eta=0"]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err


def test_dry_run_lists_the_commands(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "s"), "--train-args", "--epochs 2", "--grid", "seed=0,1",
                 "--eval-args", "--attacks fgsm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "seed=1:" in out and "-m train.run --epochs 2 --seed 1 --no-compare --out" in out
    assert "-m train.eval --checkpoint" in out and "--attacks fgsm" in out
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- what run_point decides


class FakeChildren:
    """Stands in for the child processes: records their commands and leaves the files they would."""

    def __init__(self, monkeypatch, fail: str | None = None):
        self.commands, self.fail = [], fail
        monkeypatch.setattr(sweep_runner, "_run_child", self)

    def __call__(self, command, log, label, runner):
        self.commands.append(command)
        step = "train" if "train.run" in command else "eval"
        if step == self.fail:
            return 2, "error: something broke"
        out = Path(command[command.index("--out") + 1])
        if step == "train":
            (out / "plain").mkdir(parents=True, exist_ok=True)
            (out / "plain" / "model.pt").write_bytes(b"")
            (out / "plain" / "report.json").write_text("{}")
        else:
            out.mkdir(parents=True, exist_ok=True)
            name = command[command.index("--name") + 1]
            (out / "eval.json").write_text(json.dumps({"models": {name: {}}}))
        return 0, ""


RUNNER = sweep.Runner(echo=False)


def _point(grid=("seed=0",)):
    return plan_points(parse_grid(list(grid)), {})[0]


def test_a_fresh_point_trains_then_evaluates_and_is_then_skipped(tmp_path, monkeypatch):
    children = FakeChildren(monkeypatch)
    point = _point()
    assert sweep.run_point(point, tmp_path, ["--epochs", "1"], ["--attacks", "fgsm"], RUNNER, False) == "done"
    train, evaluate = children.commands
    assert "--resume" not in train and "--resume" not in evaluate
    assert evaluate[evaluate.index("--checkpoint") + 1].endswith("plain/model.pt")
    assert sweep.run_point(point, tmp_path, ["--epochs", "1"], ["--attacks", "fgsm"], RUNNER, False) == "skipped"
    assert len(children.commands) == 2
    with pytest.raises(SweepError, match="made with other train arguments"):
        sweep.run_point(point, tmp_path, ["--epochs", "2"], ["--attacks", "fgsm"], RUNNER, False)
    with pytest.raises(SweepError, match="made with other eval arguments"):
        sweep.run_point(point, tmp_path, ["--epochs", "1"], ["--attacks", "pgd"], RUNNER, False)


def _started(out, point, train_args=(), eval_args=("--attacks", "fgsm")):
    """The point's folder as a sweep leaves it when it starts the point (its plan recorded)."""
    folder = out / "points" / point.name
    folder.mkdir(parents=True)
    planned = sweep.planned_commands(point, list(train_args), None if eval_args is None else list(eval_args))
    sweep_runner._record(folder, sweep.PLAN_FILE, {"commands": planned})
    return folder


def test_an_interrupted_training_and_evaluation_continue_with_resume(tmp_path, monkeypatch):
    children = FakeChildren(monkeypatch)
    point = _point()
    folder = _started(tmp_path, point)
    (folder / "plain").mkdir()
    (folder / "plain" / "checkpoint.pt").write_bytes(b"")  # a training killed after an epoch
    (folder / "eval").mkdir()
    (folder / "eval" / "eval.json").write_text(json.dumps({"models": {}, "in_progress": {"model": point.name}}))
    assert sweep.run_point(point, tmp_path, [], ["--attacks", "fgsm"], RUNNER, False) == "done"
    train, evaluate = children.commands
    assert train[-1] == "--resume" and evaluate[-1] == "--resume"


def test_a_training_stopped_after_its_model_but_before_its_report_is_resumed(tmp_path, monkeypatch):
    children = FakeChildren(monkeypatch)
    point = _point()
    _started(tmp_path, point, eval_args=None)
    (tmp_path / "points" / point.name / "plain").mkdir()
    for f in ("checkpoint.pt", "model.pt"):
        (tmp_path / "points" / point.name / "plain" / f).write_bytes(b"")
    assert sweep.run_point(point, tmp_path, [], None, RUNNER, False) == "done"
    assert children.commands[0][-1] == "--resume"  # train.run --resume writes the missing reports


def test_a_trained_point_is_only_evaluated(tmp_path, monkeypatch):
    children = FakeChildren(monkeypatch)
    point = _point()
    _started(tmp_path, point)
    (tmp_path / "points" / point.name / "mpd").mkdir()
    (tmp_path / "points" / point.name / "mpd" / "model.pt").write_bytes(b"")
    (tmp_path / "points" / point.name / "mpd" / "report.json").write_text("{}")
    assert sweep.run_point(point, tmp_path, [], ["--attacks", "fgsm"], RUNNER, False) == "done"
    assert len(children.commands) == 1 and "train.eval" in children.commands[0]


def test_a_folder_made_with_other_arguments_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """A point trained for 1 epoch whose evaluation failed, run again for 30 epochs: refused up
    front (its 1-epoch model is not evaluated and recorded as the 30-epoch one), and no child runs."""
    children = FakeChildren(monkeypatch, fail="eval")
    point = _point()
    assert sweep.run_point(point, tmp_path, ["--epochs", "1"], ["--attacks", "fgsm"], RUNNER, False) == "failed"
    assert len(children.commands) == 2
    code = main(["--out", str(tmp_path), "--grid", "seed=0", "--train-args", "--epochs 30",
                 "--eval-args", "--attacks fgsm"])
    assert code == 2 and len(children.commands) == 2
    err = capsys.readouterr().err
    assert "point seed=0 in" in err and "made with other train arguments" in err and "--epochs 1" in err
    assert "delete" in err and "use another --out" in err


def test_a_training_without_a_record_is_refused(tmp_path):
    point = _point()
    (tmp_path / "points" / point.name / "plain").mkdir(parents=True)
    (tmp_path / "points" / point.name / "plain" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SweepError, match="did not record"):
        sweep.run_point(point, tmp_path, [], None, RUNNER, False)
    (tmp_path / "points" / point.name / "point.json").write_text("{}")
    with pytest.raises(SweepError, match="not a sweep's record"):
        sweep.run_point(point, tmp_path, [], None, RUNNER, False)


def test_an_older_sweeps_record_is_read_whatever_its_folder_was_called(tmp_path, monkeypatch):
    """Records of an earlier version held --out (and the sweep may be moved or named by another
    path): what counts is the arguments."""
    children = FakeChildren(monkeypatch)
    point = _point()
    folder = tmp_path / "points" / point.name
    folder.mkdir(parents=True)
    old = ["-m", "train.run", "--epochs", "1", "--seed", "0", "--no-compare", "--out", "/elsewhere/points/seed=0"]
    (folder / "point.json").write_text(json.dumps({"commands": {"train": old, "eval": None}}))
    assert sweep.run_point(point, tmp_path, ["--epochs", "1"], None, RUNNER, False) == "skipped"
    assert children.commands == []


def test_a_failed_point_is_recorded_and_not_retried_unless_asked(tmp_path, monkeypatch):
    children = FakeChildren(monkeypatch, fail="train")
    point = _point()
    assert sweep.run_point(point, tmp_path, [], None, RUNNER, False) == "failed"
    failed = json.loads((tmp_path / "points" / point.name / "failed.json").read_text())
    assert failed["step"] == "train" and failed["error"] == "error: something broke"
    assert sweep.run_point(point, tmp_path, [], None, RUNNER, False) == "failed before"
    assert len(children.commands) == 1
    children.fail = None
    assert sweep.run_point(point, tmp_path, [], None, RUNNER, True) == "done"
    assert not (tmp_path / "points" / point.name / "failed.json").exists()


# ---------------------------------------------------------------- the summary


def _finished_point(out, point, clean, robust, n=100):
    folder = out / "points" / point.name
    (folder / "plain").mkdir(parents=True)
    (folder / "plain" / "model.pt").write_bytes(b"")
    diagnostics = [{"layer": 1, "window": 1.0, "firing_rate": 0.2, "silent": 0.1, "in_window": 0.5, "omega": 0.5,
                    "u_mean": -0.5, "u_std": 1.0, "cell_std": 0.9}]
    (folder / "plain" / "report.json").write_text(json.dumps({
        "clean_acc": clean, "test_images": 1000, "mean_omega": 0.5, "omega_per_layer": [0.5],
        "seconds_per_epoch": 1.0, "epochs": 1, "diagnostics": diagnostics}))
    (folder / "eval").mkdir()
    (folder / "eval" / "eval.json").write_text(json.dumps({"models": {point.name: {
        "n": n, "clean": clean, "grad_l1": 1.0, "all_checks_passed": True, "checks": [],
        "accuracy": {"pgd": {"0.0313725": robust}}, "worst_case": {"0.0313725": robust - 0.05}}}}))
    sweep_runner._record(folder, sweep.POINT_FILE, {"commands": sweep.planned_commands(point, [], [])})


def test_settings_are_aggregated_over_seeds_with_standard_errors(tmp_path):
    points = plan_points(parse_grid(["eta=0,0.1", "seed=0,1"]), {})
    values = {"eta=0_seed=0": (0.80, 0.40), "eta=0_seed=1": (0.84, 0.44), "eta=0.1_seed=0": (0.78, 0.50)}
    for p in points:
        if p.name in values:  # eta=0.1 seed=1 has not finished
            _finished_point(tmp_path, p, *values[p.name])
    summary = sweep.write_summary(points, tmp_path, "python -m train.sweep ...")
    groups = {g["setting"]: g for g in summary["settings"]}
    assert set(groups) == {"eta=0", "eta=0.1"}
    mean, se, over = groups["eta=0"]["metrics"]["clean"]
    assert mean == pytest.approx(0.82) and se == pytest.approx(0.02) and over == "seeds"
    assert groups["eta=0"]["metrics"]["pgd @ 8/255"][:2] == pytest.approx((0.42, 0.02))
    assert groups["eta=0"]["metrics"]["all attacks @ 8/255"][0] == pytest.approx(0.37)
    mean, se, over = groups["eta=0.1"]["metrics"]["pgd @ 8/255"]  # one seed: binomial over 100 images
    assert (mean, over) == (0.5, "images") and se == pytest.approx(0.05)
    md = (tmp_path / "sweep.md").read_text()
    assert "| eta=0 | 2 | 82.00 ± 2.00 |" in md and "u in window (counted)" in md
    assert (tmp_path / "sweep.png").is_file()
    assert (tmp_path / "sweep_eta.png").is_file() and "sweep_eta.png" in md  # eta alone varies: a curve over it
    assert json.loads((tmp_path / "sweep.json").read_text())["settings"][0]["seeds"] == ["0", "1"]


def test_without_an_evaluation_the_runs_own_robustness_is_summarized(tmp_path):
    points = plan_points(parse_grid(["eta=0,1"]), {})
    for p, (clean, apgd) in zip(points, [(0.89, 0.64), (0.88, 0.41)]):
        folder = tmp_path / "points" / p.name / "plain"
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"")
        (folder / "report.json").write_text(json.dumps({
            "clean_acc": clean, "test_images": 2000, "mean_omega": 0.5, "omega_per_layer": [0.5],
            "seconds_per_epoch": 1.0, "epochs": 1, "robustness": {
                "eps": 8 / 255, "n": 500, "grad_l1": 13.0, "checks_passed": p.name == "eta=0",
                "checks": [{"name": "iterative_beats_one_step", "passed": p.name == "eta=0", "detail": ""}],
                "accuracy": {"clean": clean, "apgd": apgd, "all attacks": apgd - 0.01}}}))
        sweep_runner._record(tmp_path / "points" / p.name, sweep.POINT_FILE, {"commands": sweep.planned_commands(p, [], None)})
    summary = sweep.write_summary(points, tmp_path, "python -m train.sweep ...")
    groups = {g["setting"]: g for g in summary["settings"]}
    mean, se, over = groups["eta=1"]["metrics"]["apgd @ 8/255"]
    assert mean == pytest.approx(0.41) and over == "images" and se == pytest.approx((0.41 * 0.59 / 500) ** 0.5)
    assert groups["eta=0"]["metrics"]["all attacks @ 8/255"][0] == pytest.approx(0.63)
    assert groups["eta=0"]["checks_passed"] and not groups["eta=1"]["checks_passed"]
    assert "input-gradient L1" in groups["eta=0"]["metrics"]
    assert "**FAIL** iterative_beats_one_step" in (tmp_path / "sweep.md").read_text()


def test_a_curve_only_over_one_numeric_key():
    def summary(values, case=None):
        return {"settings": [{"values": v, "case": case, "metrics": {}} for v in values]}

    assert sweep.numeric_key(summary([{"eta": "0"}, {"eta": "0.1"}])) == "eta"
    assert sweep.numeric_key(summary([{"eta": "0", "T": "4"}, {"eta": "0.1", "T": "4"}])) == "eta"
    assert sweep.numeric_key(summary([{"eta": "0", "T": "4"}, {"eta": "0.1", "T": "8"}])) is None
    assert sweep.numeric_key(summary([{"model": "small"}, {"model": "vgg11"}])) is None
    assert sweep.numeric_key(summary([{"eta": "0"}, {"eta": "1"}], case="plain")) is None
    assert sweep.numeric_key(summary([{"eta": "0"}])) is None


# ---------------------------------------------------------------- for real


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _sweep_command(out, epochs):
    return [sys.executable, "-m", "train.sweep", "--out", str(out), "--train-args",
            TINY.replace("--epochs 1", f"--epochs {epochs}").replace("--train-limit 100", "--train-limit 1500"),
            "--grid", "eta=0,0.5",
            "--eval-args", "--attacks fgsm --eps 8/255 --limit 20 --batch-size 20 --no-large-eps-check"]


def _interrupt_at(out, marker, send, ignore_sigint=False):
    """Start the sweep, wait for a line containing ``marker``, then interrupt it with ``send(proc)``;
    -> (exit status, everything it printed)."""
    proc = subprocess.Popen(_sweep_command(out, 2), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            # set either way: a test run from a background job inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:  # the child is in its next epoch now (it prints the line when it starts it)
            send(proc)
            break
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + rest


@pytest.mark.slow
def test_a_real_sweep_interrupted_and_continued(tmp_path):
    """Two points of two epochs, trained and evaluated by the real command lines. Ctrl-C (SIGINT to
    the process group, as a terminal sends it) during the first point's second epoch; then, started
    as a background job is (SIGINT ignored), SIGTERM to the sweep alone during the second point's
    second epoch; then the same command to the end: each point resumes after its first epoch, none
    is marked failed, and a fourth call runs nothing."""
    out = tmp_path / "sweep"
    code, printed = _interrupt_at(out, "[eta=0] [plain] epoch 1/2:", lambda p: os.killpg(p.pid, signal.SIGINT))
    assert code == 130, printed
    assert "run the same command again to continue" in printed
    assert any(out.glob("points/eta=0/*/checkpoint.pt")) and not (out / "points" / "eta=0.5").exists()
    code, printed = _interrupt_at(out, "[eta=0.5] [mpd] epoch 1/2:", lambda p: p.send_signal(signal.SIGTERM),
                                  ignore_sigint=True)
    assert code == 143, printed
    assert "stopped by SIGTERM" in (out / "points" / "eta=0.5" / "train.log").read_text()
    done = subprocess.run(_sweep_command(out, 2), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for name, run in (("eta=0", "plain"), ("eta=0.5", "mpd")):
        assert "resuming after epoch 1/2" in (out / "points" / name / "train.log").read_text(), name
        assert not (out / "points" / name / "failed.json").exists()
    summary = json.loads((out / "sweep.json").read_text())
    assert [p["point"] for p in summary["points"]] == ["eta=0", "eta=0.5"]
    assert all("fgsm @ 8/255" in p["robust"] and p["diagnostics"] for p in summary["points"])
    for f in ("sweep.md", "sweep.png"):
        assert (out / f).is_file()
    again = subprocess.run(_sweep_command(out, 2), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count(": skipped") == 2, again.stdout


def test_plot_gives_each_setting_one_colour_and_the_legend_every_setting(tmp_path, monkeypatch):
    """A setting missing from the first panel still has its legend entry, and its colour is the same in
    every panel (it used to shift with the settings a panel had)."""
    figures = []
    monkeypatch.setattr(sweep_summary, "save_figure", lambda fig, path, **kw: figures.append(fig))
    monkeypatch.setattr(sweep_summary.plt, "close", lambda fig: None)
    nan = float("nan")
    summary = {"settings": [
        {"setting": "a", "metrics": {"clean": (0.9, nan, 1), "pgd @ 8/255": (0.5, nan, 1)}},
        {"setting": "b", "metrics": {"clean": (0.8, 0.01, 2), "pgd @ 8/255": (0.4, 0.02, 2),
                                     "apgd @ 8/255": (0.3, 0.02, 2)}},
    ]}
    sweep.plot(summary, tmp_path / "sweep.png")
    (fig,) = figures
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    colours = {(ax.get_title(), c.get_label()): c.lines[0].get_color() for ax in fig.axes for c in ax.containers}
    assert set(colours) == {("pgd @ 8/255", "a"), ("pgd @ 8/255", "b"), ("apgd @ 8/255", "b")}
    assert colours[("apgd @ 8/255", "b")] == colours[("pgd @ 8/255", "b")] != colours[("pgd @ 8/255", "a")]
