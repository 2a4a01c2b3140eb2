"""docs/study/tables.py and docs/study/validity.py: the study's tables match its committed result files;
the bootstrap intervals, the paired tests and the unpaired fallback; the attack-validity study's jobs are
the ones fixed in docs/study/log.md, they run end to end (tiny budgets), and the fixed analysis reads the
right masks."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_checkpoint

from mpd_triton.attacks.evaluation import FIRST_RUN, pack_outcomes

REPO = Path(__file__).resolve().parents[2]
KEY = f"{8 / 255:.6g}"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"study_{name}", REPO / "docs" / "study" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tables():
    return _script("tables")


@pytest.fixture(scope="module")
def validity():
    return _script("validity")


def test_the_study_page_shows_what_its_result_files_give(tables, capsys):
    """One command recomputes the tables: docs/study/README.md holds exactly what tables.py computes."""
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


def _eval_file(path: Path, name: str, masks: dict[str, np.ndarray], *, per_image: bool = True) -> Path:
    """An eval.json of one model with the given per-attack masks (and "clean") at 8/255."""
    n = masks["clean"].size
    result = {"n": n, "clean": float(masks["clean"].mean()),
              "accuracy": {a: {KEY: float(m.mean())} for a, m in masks.items() if a not in ("clean", "all")},
              "worst_case": {KEY: float(masks["all"].mean())}}
    if per_image:
        survived = {a: {KEY: {"worst": pack_outcomes(m)}} for a, m in masks.items() if a != "clean"}
        for a, m in masks.items():
            if a.endswith(FIRST_RUN):  # "assg/first_run": the first run of a restarted attack
                attack = a.split("/")[0]
                survived.setdefault(attack, {KEY: {}})[KEY][FIRST_RUN] = pack_outcomes(m)
        result["per_image"] = {"format": "test", "clean": pack_outcomes(masks["clean"]), "survived": survived}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": {name: result}}))
    return path


def _masks(rng, n, clean_p, robust_p):
    clean = rng.random(n) < clean_p
    fgsm = clean & (rng.random(n) < robust_p + 0.1)
    pgd = fgsm & (rng.random(n) < 0.95)
    apgd = pgd & (rng.random(n) < 0.95)
    return {"clean": clean, "fgsm": fgsm, "pgd": pgd, "apgd": apgd, "all": apgd}


def test_a_pair_table_pairs_images_and_tests_each_seed(tables, tmp_path):
    rng = np.random.default_rng(0)
    files, names = {}, {}
    for seed in (0, 1):
        a, b = _masks(rng, 400, 0.9, 0.5), _masks(rng, 400, 0.9, 0.7)
        files[seed] = (_eval_file(tmp_path / f"a{seed}.json", "x", a), _eval_file(tmp_path / f"b{seed}.json", "y", b),
                       None)
        names[seed] = ("x", "y")
    pair = tables.Pair(title="t", label_a="A", label_b="B", seeds=(0, 1, 2), files={**files, 2: (
        tmp_path / "none.json", tmp_path / "none.json", None)}, names={**names, 2: ("x", "y")}, rows=tables.ROWS_8)
    text = pair.markdown()
    assert "not yet run: seed 2" in text and "unpaired" not in text
    worst = next(line for line in text.splitlines() if line.startswith("| worst case"))
    cells = [c.strip() for c in worst.strip("|").split("|")]
    # B is the more robust by construction: about +20 points, the interval above 0, McNemar small per seed
    low = float(cells[3].split("[")[1].split(",")[0])
    assert low > 5 and all(float(p) < 1e-3 for p in cells[4].split(" / "))


def test_per_seed_rows_read_the_sweep_summary_and_the_eval_file(tables, tmp_path):
    """Omega (the sweep's summary) and the input-gradient L1 (eval.json), one value per seed and model; a
    row whose field is missing is left out rather than written as zero."""
    rng = np.random.default_rng(2)
    files, names = {}, {}
    for seed in (0, 1):
        fa = _eval_file(tmp_path / f"a{seed}.json", "x", _masks(rng, 100, 0.9, 0.5))
        fb = _eval_file(tmp_path / f"b{seed}.json", "y", _masks(rng, 100, 0.9, 0.5))
        for f, l1 in ((fa, 20.0 + seed), (fb, 25.5 + seed)):
            saved = json.loads(f.read_text())
            next(iter(saved["models"].values()))["grad_l1"] = l1
            f.write_text(json.dumps(saved))
        sweep = tmp_path / f"sweep{seed}.json"
        sweep.write_text(json.dumps({"points": [{"point": "x", "clean_acc": 0.92, "mean_omega": 0.5 + seed / 100},
                                                {"point": "y", "clean_acc": 0.91, "mean_omega": 0.125}]}))
        files[seed], names[seed] = (fa, fb, sweep), ("x", "y")
    per_seed = (("mean Omega", "sweep", "mean_omega", ".3f"), ("grad L1", "eval", "grad_l1", ".1f"),
                ("missing", "sweep", "no_such_field", ".1f"))
    text = tables.Pair(title="t", label_a="A", label_b="B", seeds=(0, 1), files=files, names=names,
                       rows=tables.ROWS_8, per_seed=per_seed).markdown()
    assert "| clean, all 10,000 test images (per seed) | 92.00 / 92.00 | 91.00 / 91.00 | -1.00 / -1.00 | |" in text
    assert "| mean Omega (per seed) | 0.500 / 0.510 | 0.125 / 0.125 | -0.375 / -0.385 | |" in text
    assert "| grad L1 (per seed) | 20.0 / 21.0 | 25.5 / 26.5 | +5.5 / +5.5 | |" in text
    assert "missing" not in text


def test_a_column_table_reads_each_cell_from_its_own_file_and_says_what_is_missing(tables, tmp_path):
    rng = np.random.default_rng(4)
    a, b = _masks(rng, 500, 0.9, 0.5), _masks(rng, 500, 0.9, 0.2)
    first = a["apgd"] | (rng.random(500) < 0.1)  # a restarted attack's first run alone: more images survive it
    fa = _eval_file(tmp_path / "a.json", "x", {**a, "apgd/first_run": first})
    fb = _eval_file(tmp_path / "b.json", "y", b)
    missing = tables.Cell(tmp_path / "no.json", "z", "apgd")
    table = tables.Columns(title="t", labels=("X", "Y", "Z"), rows=(
        ("APGD", (tables.Cell(fa, "x", "apgd"), tables.Cell(fb, "y", "apgd"), missing)),
        ("APGD, first run", (tables.Cell(fa, "x", "apgd", variant="first_run"),) * 3)))
    lines = table.markdown().splitlines()
    apgd = [c.strip() for c in lines[2].strip("|").split("|")]
    assert apgd[0] == "APGD (500 images)" and apgd[3] == "not run yet"
    for cell, mask in zip(apgd[1:3], (a["apgd"], b["apgd"])):
        mean, low, high = (float(x) for x in cell.replace("[", " ").replace(",", " ").replace("]", " ").split())
        assert mean == pytest.approx(100 * mask.mean(), abs=0.05) and low < mean < high and high - low < 12
    assert lines[3].split("|")[2].strip().startswith(f"{100 * first.mean():.1f} [")
    no_record = _eval_file(tmp_path / "c.json", "x", a, per_image=False)
    with pytest.raises(SystemExit, match="no per-image first_run record"):
        tables.Cell(no_record, "x", "apgd", variant="first_run").mask()


def test_a_pair_of_cells_combines_files_image_by_image_and_names_the_seeds_it_has(tables, tmp_path):
    """A row of PairCells reads each seed's cells from their own files; AllOf is the per-image worst case
    over two files of one model (cut to the images both ran); a seed whose file has not landed is left out
    and the row names the seeds it shows."""
    rng = np.random.default_rng(5)
    files = {}
    for seed in (0, 1):
        for recipe, robust in (("a", 0.6), ("b", 0.3)):
            base = _masks(rng, 400, 0.9, robust)
            other = base["apgd"] & (rng.random(400) < 0.7)  # a second, stronger attack in another file
            files[seed, recipe] = (_eval_file(tmp_path / f"{recipe}{seed}.json", recipe, base),
                                   _eval_file(tmp_path / f"{recipe}{seed}_assg.json", recipe,
                                              {"clean": base["clean"], "assg": other, "all": other}),
                                   base["all"], other)
    missing = tmp_path / "missing.json"

    def cells(seed, which):
        out = []
        for recipe in ("a", "b"):
            if seed == 1 and which == "assg":
                out.append(tables.Cell(missing, recipe, "assg"))  # seed 1's second file not landed
            elif which == "assg":
                out.append(tables.Cell(files[seed, recipe][1], recipe, "assg"))
            else:
                out.append(tables.AllOf((tables.Cell(files[seed, recipe][0], recipe, "all"),
                                         tables.Cell(files[seed, recipe][1], recipe, "assg"))))
        return tuple(out)

    table = tables.PairCells(title="t", label_a="A", label_b="B", seeds=(0, 1), rows=(
        ("ASSG", lambda s: cells(s, "assg")), ("worst", lambda s: cells(s, "worst")),
        ("nothing", lambda s: (tables.Cell(missing, "a", "x"), tables.Cell(missing, "b", "x")))))
    lines = table.markdown().splitlines()
    assert lines[2].startswith("| ASSG (400 images, seed 0) | ")
    assert lines[3].startswith("| worst (400 images) | ")
    assert lines[4] == "| nothing | not run yet | | | |"
    worst = tables.AllOf((tables.Cell(files[0, "a"][0], "a", "all"), tables.Cell(files[0, "a"][1], "a", "assg")))
    assert np.array_equal(worst.outcome().mask, files[0, "a"][2] & files[0, "a"][3])
    both = [files[s, "a"][2] & files[s, "a"][3] for s in (0, 1)]
    mean = float(lines[3].split("|")[2].split("[")[0])
    assert mean == pytest.approx(100 * np.mean([m.mean() for m in both]), abs=0.05)
    unpaired = tables.Cell(_eval_file(tmp_path / "u.json", "a", _masks(rng, 400, 0.9, 0.5), per_image=False),
                           "a", "all")
    with pytest.raises(SystemExit, match="needs per-image records"):
        tables.AllOf((unpaired, tables.Cell(files[0, "a"][1], "a", "assg"))).outcome()


def test_files_without_per_image_outcomes_give_an_unpaired_interval(tables, tmp_path):
    rng = np.random.default_rng(1)
    a, b = _masks(rng, 300, 0.9, 0.5), _masks(rng, 300, 0.9, 0.5)
    pair = tables.Pair(title="t", label_a="A", label_b="B", seeds=(0,),
                       files={0: (_eval_file(tmp_path / "a.json", "x", a, per_image=False),
                                  _eval_file(tmp_path / "b.json", "y", b), None)},
                       names={0: ("x", "y")}, rows=tables.ROWS_8)
    lines = [line for line in pair.markdown().splitlines() if line.startswith("| worst case")]
    assert lines and lines[0].rstrip().endswith("| unpaired |")
    # k of n images: the same mean as the file's figure
    assert tables.outcome({"n": 300, "worst_case": {KEY: a["all"].mean()}}, "all").mask.mean() == a["all"].mean()


def test_markers_and_tables_must_match(tables):
    with pytest.raises(SystemExit, match="does not have"):
        tables.render("<!-- tables.py: nothing -->\n<!-- /tables.py -->\n"
                      + "".join(f"<!-- tables.py: {n} -->\n<!-- /tables.py -->\n" for n in tables.TABLES))
    with pytest.raises(SystemExit, match="no marker"):
        tables.render("no markers here")


# ---------------------------------------------------------------- the attack-validity study


def test_the_jobs_are_the_ones_fixed_before_the_runs(validity):
    jobs = validity.jobs()
    assert len(jobs) == 3 * 2 * 7
    by = {(j.model, j.name): j for j in jobs}
    flags = {name: " ".join(by["at2+mpd_seed1", name].command()) for name in validity.PRIMARY + ("assg1000",)}
    assert "--sapgd-steps 100 --restarts 3" in flags["assg100"] and "--limit 1000" in flags["assg100"]
    assert "--sapgd-steps 300 --restarts 2" in flags["assg300"]
    assert "--sapgd-steps 1000" in flags["assg1000"] and "--limit 250" in flags["assg1000"]
    assert "--assg-level 0.35,0.425,0.49" in flags["assg100"]
    assert "apgd,apgd-t" in flags["apgd"] and "own,triangle,sigmoid,atan,bptr,ste,fitted" in flags["apgd"]
    assert "--queries 5000" in flags["square"]
    assert "at2_seed1/at2_seed1/model.pt" in flags["transfer_twin"]          # the twin: the other recipe
    assert "at2_seed2/at2+mpd_seed2/model.pt" in flags["transfer_independent"]  # the next seed, same recipe
    assert "at2_seed0/at2+mpd_seed0" in " ".join(by["at2+mpd_seed2", "transfer_independent"].command())
    assert all("--eps 8/255" in " ".join(j.command()) for j in jobs)


def _validity_files(validity, data: Path, seed: int, recipe: str, rng, robust: float, square_below: float = 0.0):
    """Each primary job's file: ASSG's first run leaves ``robust`` of the clean images, its restarts a few
    fewer; every other attack as strong as ASSG's first run, Square ``square_below`` stronger."""
    n = 200
    clean = rng.random(n) < 0.9
    today = clean & (rng.random(n) < robust)
    restarted = today & (rng.random(n) > 0.05)
    square = today & (rng.random(n) >= square_below)
    attack_of = {"apgd": "apgd", "square": "square", "transfer_twin": "transfer", "transfer_independent": "transfer"}
    folder = data / f"{recipe}_seed{seed}"
    for name in validity.PRIMARY:
        masks = {"clean": clean, "fgsm": clean.copy()}
        if name in ("assg100", "assg300"):
            masks.update({"assg": restarted, "assg/first_run": today, "all": restarted})
        else:
            mask = square if name == "square" else today
            masks.update({attack_of[name]: mask, "all": mask})
            if name == "apgd":
                masks["apgd-t"] = today
        _eval_file(folder / f"{name}.json", f"{recipe}_seed{seed}", masks)


def test_the_fixed_analysis_on_known_masks(validity, tmp_path):
    rng = np.random.default_rng(3)
    for seed in (0, 1):
        _validity_files(validity, tmp_path, seed, "at2", rng, robust=0.35)
        _validity_files(validity, tmp_path, seed, "at2+mpd", rng, robust=0.6)
    text = validity.analysis(data=tmp_path, seeds=(0, 1, 2))
    assert "done: 0, 1 (of 0, 1, 2)" in text
    assert "The gap survives" in text
    assert "join --reliable): none" in text
    masks = validity.model_masks("at2", 0, tmp_path)
    assert masks["n"] == 200 and masks["worst"].sum() < masks["today"].sum()
    # Square 20% stronger than ASSG on one model: it joins --reliable
    _validity_files(validity, tmp_path, 1, "at2+mpd", rng, robust=0.6, square_below=0.2)
    text = validity.analysis(data=tmp_path, seeds=(0, 1, 2))
    assert "join --reliable): Square, 5,000 queries." in text
    # the diagnostics: images only Square breaks, which no gradient attack broke, on that model alone
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines()
            if line.startswith("| at2")}
    m = validity.model_masks("at2+mpd", 1, tmp_path)
    gradient = m["by_attack"]["ASSG, 300 it., 2 runs (1 restart)"] & m["by_attack"]["APGD-CE, 7 gradients"] & m["fgsm"]
    only_square = int((gradient & ~m["by_attack"]["Square, 5,000 queries"]).sum())
    assert only_square > 5
    assert rows["at2+mpd seed 1"][-1] == f"{only_square} of 200 |"
    assert rows["at2+mpd seed 1"][4] == str(only_square)  # Square's own column: it alone breaks them
    assert rows["at2 seed 0"][-1] == "0 of 200 |" and rows["at2+mpd seed 0"][4] == "0"
    # the gap does not survive when both recipes are alike
    alike = tmp_path / "alike"
    for seed in (0, 1):
        for recipe in validity.RECIPES:
            _validity_files(validity, alike, seed, recipe, np.random.default_rng(seed), robust=0.5)
    assert "The gap does not survive" in validity.analysis(data=alike, seeds=(0, 1))


def test_the_validity_table_counts_each_attack_as_the_fixed_analysis_does(tables, validity, tmp_path, monkeypatch):
    """The study page's validity table reads the same records as validity.analysis: its worst-case row is
    the analysis's worst case (every attack of the primary jobs), each attack row its own record, and a row
    whose jobs have not landed on every seed names the seeds it has."""
    monkeypatch.setattr(tables, "VALIDITY", tmp_path)
    rng = np.random.default_rng(5)
    for seed in (0, 1):
        _validity_files(validity, tmp_path, seed, "at2", rng, robust=0.35)
        _validity_files(validity, tmp_path, seed, "at2+mpd", rng, robust=0.6)
    rows = {line.split(" | ")[0][2:]: line for line in tables.TABLES["validity"].markdown().splitlines()[2:]}
    assert rows["ASSG, 1,000 it., first 250 images"].endswith("| not run yet | | | |")
    worst = next(v for k, v in rows.items() if k.startswith("**worst case over every attack"))
    assert "(200 images, seeds 0, 1)" in worst
    masks = {r: [validity.model_masks(r, s, tmp_path) for s in (0, 1)] for r in validity.RECIPES}
    expected = tables._pair_row("x", *[[tables.Outcome(m["worst"], True) for m in masks[r]] for r in validity.RECIPES])
    assert worst.split(" | ", 1)[1] == expected.split(" | ", 1)[1]
    today = next(v for k, v in rows.items() if k.startswith(validity.TODAY))
    first = [tables.Outcome(m["today"], True) for m in masks["at2"]]
    assert today.split(" | ")[1] == tables.bootstrap_mean([o.mask for o in first]).percent()
    # the page's verdict is the fixed analysis's own text, on the same files
    verdict = tables.TABLES["validity_analysis"].markdown()
    assert verdict == validity.analysis(data=tmp_path) and "done: 0, 1 (of 0, 1, 2)" in verdict
    # the figure draws the table's rows: each landed seed and the same mean
    points = dict(tables.validity_points())
    worst_points = next(v for k, v in points.items() if k.startswith("worst case over every attack"))
    for side, recipe in enumerate(validity.RECIPES):
        accuracy, interval = worst_points[side]
        assert accuracy == pytest.approx({s: 100 * masks[recipe][s]["worst"].mean() for s in (0, 1)})
        assert interval.percent() == worst.split(" | ")[1 + side]
    assert points["ASSG, 1,000 it., first 250 images"] == [({}, None), ({}, None)]
    assert tables.validity_iterations() == {}  # no ASSG 1,000 job has landed: the panel says "not run yet"
    # ASSG at 1,000 iterations on AT seed 0's first 100 images: the curve's three points, each its own run
    longer = masks["at2"][0]["today"][:100] & (rng.random(100) < 0.5)
    clean = masks["at2"][0]["clean"][:100]
    _eval_file(tmp_path / "at2_seed0" / "assg1000.json", "at2_seed0",
               {"clean": clean, "fgsm": clean, "assg": longer, "all": longer})
    m = validity.model_masks("at2", 0, tmp_path)
    assert tables.validity_iterations() == {("at2", 0): pytest.approx(
        {100: 100 * m["today"][:100].mean(), 300: 100 * m["iterations_250"][300].mean(), 1000: 100 * longer.mean()})}
    assert m["iterations_250"][300].size == 100 and 100 * longer.mean() < 100 * m["today"][:100].mean() - 10
    assert tables.main(["--plot-validity", str(tmp_path / "with_curve.png")]) == 0
    (tmp_path / "at2_seed0" / "assg1000.json").unlink()
    path = tmp_path / "validity.png"
    assert tables.main(["--plot-validity", str(path)]) == 0 and path.read_bytes()[:4] == b"\x89PNG"
    # one job missing on one model: the worst case waits for it, the other rows do not
    (tmp_path / "at2+mpd_seed1" / "square.json").unlink()
    rows = tables.TABLES["validity"].markdown()
    assert "worst case over every attack of the primary jobs** (200 images, seed 0)" in rows
    assert "Square, 5,000 queries (200 images, seed 0)" in rows
    assert "APGD-CE, 7 gradients (200 images, seeds 0, 1)" in rows


def test_data_names_where_results_land_and_are_read(validity, tmp_path, capsys):
    """--data (a worktree's run landing in the main checkout): plan, run and the reports use that folder."""
    assert all(j.result.parent.parent == tmp_path for j in validity.jobs(data=tmp_path))
    assert all(j.result.is_relative_to(validity.DATA) for j in validity.jobs())
    _validity_files(validity, tmp_path, 0, "at2", np.random.default_rng(0), robust=0.4)
    assert validity.main(["plan", "--seeds", "0", "--data", str(tmp_path)]) == 0
    states = {tuple(line.split()[:3]) for line in capsys.readouterr().out.splitlines() if line.startswith("at2")}
    assert ("at2_seed0", "apgd", "done") in states and ("at2+mpd_seed0", "assg100", "to") in states  # "to run"
    assert validity.main(["interim", "--seeds", "0", "--data", str(tmp_path)]) == 0
    assert "| at2_seed0 | square |" in capsys.readouterr().out


def test_the_jobs_run_in_an_order_that_gives_todays_attack_on_every_model_first(validity):
    ordered = validity.order(validity.jobs())
    assert len(ordered) == 42 and {(j.model, j.name) for j in ordered} == {(j.model, j.name) for j in validity.jobs()}
    assert [(j.name, j.model) for j in ordered[:6]] == [("assg100", f"{r}_seed{s}") for s in (0, 1, 2)
                                                         for r in validity.RECIPES]
    rest = [j for j in ordered[6:] if j.name != "assg1000"]
    assert [j.seed for j in rest] == sorted(j.seed for j in rest)  # seed by seed
    assert rest[0].seed == 0 and rest[0].name == rest[1].name and rest[0].recipe != rest[1].recipe  # pairs together
    assert all(j.name == "assg1000" for j in ordered[-6:])


def test_the_interim_report_lists_the_finished_jobs_and_todays_attack_apart(validity, tmp_path):
    assert validity.interim(data=tmp_path) == "No job has finished yet."
    _validity_files(validity, tmp_path, 0, "at2", np.random.default_rng(0), robust=0.4)
    text = validity.interim(data=tmp_path, seeds=(0,))
    assert "| at2_seed0 | assg100 | 200 | assg |" in text and "(first run alone:" in text
    assert "| at2_seed0 | square | 200 | square |" in text and "fgsm" not in text


def test_sigterm_stops_every_running_job(validity, tmp_path, monkeypatch):
    """SIGTERM to the study stops its running jobs (they continue with --resume), not only itself."""
    import os
    import signal
    import threading

    pids = tmp_path / "pids"
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); "
               "time.sleep(60)"]
    monkeypatch.setattr(validity.Job, "command", lambda self, resume=False: sleeper)
    monkeypatch.setattr(validity, "_runnable", lambda job: True)
    monkeypatch.setattr(validity, "DATA", tmp_path / "data")
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert validity.run(validity.jobs(seeds=(0,))[:3], parallel=2) == 130
    finally:
        timer.cancel()
    started = [int(x) for x in pids.read_text().split()]
    assert len(started) == 2  # two at a time
    for pid in started:  # each child has ended (terminated, then reaped by run)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert signal.getsignal(signal.SIGTERM) is not validity._stop  # the handler is put back
    assert not (tmp_path / "data").exists()  # nothing interrupted is landed


def test_a_second_run_beside_the_first_takes_other_jobs(validity, tmp_path, monkeypatch):
    """A job whose folder another run holds is left to it: two runs started side by side never run one job
    twice."""
    from plumbing.lock import folder_lock

    def command(self, resume=False):  # a job that writes its eval.json and ends
        return [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(self.folder)!r}); "
                "p.mkdir(parents=True, exist_ok=True); (p / 'eval.json').write_text('{}')"]

    monkeypatch.setattr(validity.Job, "command", command)
    monkeypatch.setattr(validity, "_runnable", lambda job: True)
    monkeypatch.setattr(validity, "DATA", tmp_path / "data")
    monkeypatch.setattr(validity, "RUNS", tmp_path / "runs")
    first, *rest = validity.order(validity.jobs(seeds=(0,)))[:3]
    with folder_lock(first.folder, "another run", validity.LOCK):
        assert validity.run([first, *rest], parallel=2) == 0
    assert not first.result.exists() and all(job.result.is_file() for job in rest)


@pytest.mark.slow
def test_the_jobs_run_end_to_end_and_land_in_the_data_folder(validity, tmp_path, monkeypatch, capsys):
    """Every kind of job's train.eval command runs (tiny budgets, 6 images, one seed, the MPD-SGR model's
    seven jobs), is copied beside the data, and is skipped when run again."""
    models = tmp_path / "models"
    for recipe, seed in (("at2", 0), ("at2+mpd", 0)):
        tiny_checkpoint(models / f"at2_seed{seed}" / f"{recipe}_seed{seed}" / "model.pt", seed=len(recipe))
    monkeypatch.setattr(validity, "MODELS", models)
    monkeypatch.setattr(validity, "DATA", tmp_path / "data")
    monkeypatch.setattr(validity, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(validity, "SEEDS", (0,))
    jobs = [j for j in validity.jobs(seeds=(0,), images=6, long_images=4, scale=0.01) if j.recipe == "at2+mpd"]
    assert len(jobs) == 7
    torch.set_num_threads(1)
    assert validity.run(jobs, parallel=2) == 0  # two at a time, as the study runs
    for job in jobs:
        saved = json.loads(job.result.read_text())
        assert job.model in saved["models"] and "in_progress" not in saved
    assert validity.run(jobs) == 0 and "starting" not in capsys.readouterr().out.split("done:")[-1]
    assert validity.model_masks("at2+mpd", 0, tmp_path / "data")["n"] == 6


# ---------------------------------------------------------------- landing a sweep's results


def _fake_point(sweep: Path, point: str, run: str, *, trained: bool, evaluated: str | None):
    folder = sweep / "points" / point
    (folder / run).mkdir(parents=True)
    if trained:
        (folder / run / "model.pt").write_bytes(b"weights")
        (folder / run / "report.json").write_text(json.dumps({"provenance": {"date_utc": "2026-12-08T01:02:03+00:00"}}))
    if evaluated:
        (folder / "eval").mkdir()
        saved = {"models": {point: {}}} if evaluated == "done" else {"models": {}, "in_progress": {}}
        (folder / "eval" / "eval.json").write_text(json.dumps(saved))


def test_land_copies_finished_models_and_results_once(tmp_path):
    land = _script("land")
    sweep = tmp_path / "runs" / "pair_seed0"
    _fake_point(sweep, "a_seed=0", "plain", trained=True, evaluated="done")
    _fake_point(sweep, "b_seed=0", "mpd", trained=True, evaluated="running")
    _fake_point(sweep, "c_seed=0", "mpd", trained=False, evaluated=None)
    (sweep / "sweep.json").write_text("{}")
    models, data = tmp_path / "models", tmp_path / "data"
    first = land.land(sweep, models, data)
    day = "2026-12-08"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in first) == sorted([
        f"models/{day}/pair_seed0/a_seed0/model.pt", f"models/{day}/pair_seed0/a_seed0/report.json",
        f"data/{day}/pair_seed0/eval_a_seed0.json",
        f"models/{day}/pair_seed0/b_seed0/model.pt", f"models/{day}/pair_seed0/b_seed0/report.json"])
    assert land.land(sweep, models, data) == []  # nothing new: nothing copied again
    # the rest finishes: the evaluation, the last model, then the sweep's summary
    (sweep / "points" / "b_seed=0" / "eval" / "eval.json").write_text(json.dumps({"models": {"b": {}}}))
    _fake_point(tmp_path / "more", "c_seed=0", "mpd", trained=True, evaluated="done")
    import shutil
    shutil.rmtree(sweep / "points" / "c_seed=0")
    shutil.move(tmp_path / "more" / "points" / "c_seed=0", sweep / "points" / "c_seed=0")
    names = {p.name for p in land.land(sweep, models, data)}
    assert names == {"eval_b_seed0.json", "model.pt", "report.json", "eval_c_seed0.json", "sweep.json"}
    with pytest.raises(SystemExit, match="not a train.sweep folder"):
        land.land(tmp_path / "models", models, data)


def test_the_at2_figure_is_drawn_from_the_committed_files(tables, tmp_path):
    path = tmp_path / "figures" / "at2.png"
    assert tables.main(["--plot-at2", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_four_row_with_models_fills_then_tests(tables, tmp_path, monkeypatch):
    """docs/study/tables.py: the row of the runs with their models lists the seeds landed so far, then, with
    all ten, the means, the count and the one-sided Fisher test."""
    script = _script("at01_ten_seeds")
    monkeypatch.setattr(script, "DATA", tmp_path)

    def write(seed, recipe, worst, apgd):
        date, folder = ("2026-12-07", "at0.1_seed89") if seed >= 8 else ("2026-12-08", f"at0.1_seed{seed}")
        _at01_eval(tmp_path, date, folder, f"{recipe}_seed{seed}", worst, apgd)

    for seed in (0, 8):
        write(seed, "at0.1", 0.40 if seed == 0 else 0.80, 0.70 if seed == 0 else 0.82)
        write(seed, "at0.1+mpd", 0.80, 0.81)
    row = tables.TenSeeds._with_models(script)
    assert "seeds 0, 8 so far | 40.0, 80.0 | 80.0, 80.0 | 1 of 2 against 0 of 2 (no test" in row
    for seed in range(10):
        write(seed, "at0.1", 0.40 if seed < 4 else 0.80, 0.70 if seed < 4 else 0.82)
        write(seed, "at0.1+mpd", 0.80, 0.81)
    row = tables.TenSeeds._with_models(script)
    assert row.startswith("| **0-9 with their models") and "4 of 10 against 0 of 10" in row
    assert f"(p = {script.fisher_one_sided(4, 0, 10):.3f})" in row and "mean 64.0" in row


def _at01_eval(root: Path, date: str, folder: str, name: str, worst: float, apgd: float) -> None:
    """A minimal eval.json of one table-4 run, as at01_ten_seeds.py reads it."""
    f = root / date / folder / f"eval_{name}.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"models": {name: {"worst_case": {KEY: worst}, "n": 250, "accuracy": {"apgd": {KEY: apgd}},
                                               "all_checks_passed": True}}}))


def test_ten_seed_runs_keep_the_first_runs_apart_from_the_runs_trained_again(tmp_path, monkeypatch):
    """docs/study/at01_ten_seeds.py: a seed trained again (a later date's folder at0.1_seedN) never enters the
    count fixed on 2026-12-06, and the runs with models read it, and seeds 8-9's first runs, instead."""
    script = _script("at01_ten_seeds")
    _at01_eval(tmp_path, "2026-12-06", "at0.1_seed34", "at0.1_seed3", 0.40, 0.65)  # the first run: false-robust
    _at01_eval(tmp_path, "2026-12-08", "at0.1_seed3", "at0.1_seed3", 0.80, 0.82)  # trained again: sound
    _at01_eval(tmp_path, "2026-12-07", "at0.1_seed89", "at0.1_seed8", 0.82, 0.84)
    monkeypatch.setattr(script, "DATA", tmp_path)
    first, again = script.verdict("at0.1", 3), script.verdict("at0.1", 3, "models")
    assert first["false_robust"] and first["worst"] == 0.40
    assert not again["false_robust"] and again["worst"] == 0.80 and "2026-12-08" in again["source"]
    assert script.verdict("at0.1", 8, "models") == script.verdict("at0.1", 8)  # seeds 8-9: the first runs
    assert script.verdict("at0.1", 0)["source"] == "table"  # the log's figures stay in the first count
    assert script.verdict("at0.1", 0, "models") is None  # not yet trained again
    assert script.count(range(10), "models")["p"] is None  # no test while a run is missing
    with pytest.raises(ValueError, match="runs must be one of"):
        script.verdict("at0.1", 3, "retrained")
