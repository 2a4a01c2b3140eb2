"""summary.md of one ``bash bench/device_run.sh``: where and when it ran, each stage's exit and time against
its budget, the targets of docs/benchmarks.md with the figure measured beside each (met / missed by how
much / not measured), the GPU tests' outcome and the tables of the kernel sweep and the model step.

    python -m bench.device_summary --out OUT --work WORK --mode gpu|dry [--command ...]

It reads what the stages left, even a stage stopped at its budget: OUT/results.json and
OUT/model_results.json (saved by the benchmarks after every size / variant), OUT/pytest.log, and from
WORK (the script's scratch folder, which does not come back) stages.tsv (one line per stage: name,
budget, limit, exit, seconds) and env.txt (the machine's record). It writes OUT/summary.md and
OUT/extras.tar.gz (the kernel plots, drawn again from results.json when the sweep was stopped before
drawing them, the benchmarks' own markdown and the tests' junit XML), prints the summary's head for the
device tool's output tail, and never fails on a missing or broken input: it says what is missing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tarfile
import traceback
from pathlib import Path

from .report import (
    GPU_TARGETS,
    evaluate_targets,
    kernel_table,
    markdown_table,
    model_table,
    skipped_lines,
)

__all__ = ["main", "read_stages", "parse_pytest_log", "target_rows", "STAGES", "STATUS_WORDS"]

STAGES = ("tests", "kernels", "model")
TIMEOUT_EXITS = ("124", "137")  # timeout's exit when it stopped the stage (137: killed after the grace period)
# The words a target's status starts with in summary.md.
STATUS_WORDS = ("met", "missed", "not measured", "not judged")
STAGE_WHAT = {
    "tests": "GPU correctness: pytest -m gpu (compiled kernels against the reference, torch.compile, opcheck)",
    "kernels": "kernel sweep: python -m bench.kernels",
    "model": "model step: python -m bench.model_step (VGG11 with MPD-SGR)",
}


def read_stages(path: Path) -> list[dict]:
    """The stages.tsv the script writes: name, budget s, limit s (the budget clipped by the guard), exit
    ('-' when not run), seconds, note."""
    stages = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 5 or fields[0] not in STAGES:
            continue
        name, budget, limit, rc, seconds = fields[:5]
        note = fields[5] if len(fields) > 5 else ""
        stages.append(dict(name=name, budget=int(budget), limit=int(limit), rc=rc, seconds=int(seconds), note=note))
    return stages


_RESULT = re.compile(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
_NODE = re.compile(r"(tests/\S+::\S+)")


def parse_pytest_log(text: str) -> dict:
    """Counts of a pytest -v run's outcomes (read from each test's own line, so a run stopped at its
    budget is counted too), the failed tests, pytest's closing line, and for a --collect-only run the
    number of tests collected."""
    counts, failed, seen = {}, [], set()
    for line in text.splitlines():
        node, result = _NODE.search(line), _RESULT.search(line)
        if not node or not result or line.startswith(("FAILED ", "ERROR ", "SKIPPED ")):
            continue  # the short summary repeats failures: counted once, from the test's own line
        key = (node.group(1), result.group(1))
        if key in seen:
            continue
        seen.add(key)
        counts[result.group(1).lower()] = counts.get(result.group(1).lower(), 0) + 1
        if result.group(1) in ("FAILED", "ERROR"):
            failed.append(node.group(1))
    closing = next((line.strip("= ").strip() for line in reversed(text.splitlines())
                    if re.search(r"\d+ (passed|failed|error|skipped|deselected|tests? collected)|no tests ran", line)),
                   None)
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", text)
    return {"counts": counts, "failed": failed, "closing": closing,
            "collected": int(collected.group(1)) if collected else None}


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _goal(name: str) -> str:
    threshold, higher, kind = GPU_TARGETS[name]
    sign = ">=" if higher else "<="
    if name == "statistics overhead":
        return f"{sign} +{_percent(threshold)}"
    return f"{sign} {_percent(threshold)}" if kind == "share" else f"{sign} {threshold:g}x"


def _figure(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if name == "statistics overhead":
        return f"{'+' if value >= 0 else ''}{_percent(value)}"
    return _percent(value) if GPU_TARGETS[name][2] == "share" else f"{value:.3g}x"


def _status(target: dict, judged: bool) -> str:
    name, value = target["target"], target["value"]
    if value is None:
        return "not measured"
    if not judged:
        return "not judged (dry run: CPU, tiny sizes)"
    threshold, higher, kind = GPU_TARGETS[name]
    met = value >= threshold if higher else value <= threshold
    if met:
        return "met"
    gap = (f"{100 * abs(value - threshold):.1f} points" if kind == "share"
           else f"{100 * abs(value / threshold - 1):.0f}%")
    return f"missed by {gap}"


def target_rows(records: list[dict], model_records: list[dict], *, judged: bool) -> list[list[str]]:
    """A row per target of docs/benchmarks.md and case measured, in the docs' order: every target
    appears, 'not measured' where nothing was measured for it."""
    targets = evaluate_targets(records, model_records, on_gpu=True)
    # The kernel cases in the sweep's own order (float32 and T = 8 first there), not alphabetical.
    cases = list(dict.fromkeys(f"{r['dtype']}, T={r['T']}," for r in records))

    def in_sweep_order(target: dict) -> int:
        return next((i for i, case in enumerate(cases) if target["case"].startswith(case)), len(cases))

    rows = []
    for name in GPU_TARGETS:
        mine = sorted((t for t in targets if t["target"] == name), key=in_sweep_order)
        if not mine:
            rows.append([name, "-", "-", _goal(name), "not measured"])
        for t in mine:
            rows.append([name, t["case"], _figure(name, t["value"]), _goal(name), _status(t, judged)])
    return rows


def _read_json(path: Path, problems: list[str]) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        problems.append(f"{path.name} could not be read: {error}")
        return None


def _stage_status(stage: dict, detail: str) -> str:
    if stage["rc"] == "-":
        return f"not run: {stage['note'] or 'no time left under the guard'}"
    if stage["rc"] in TIMEOUT_EXITS:
        status = f"stopped at budget ({stage['limit']} s)"
    elif stage["rc"] == "0":
        status = "ok"
    else:
        status = f"failed (exit {stage['rc']})"
    return f"{status}: {detail}" if detail else status


def _tests_detail(tests: dict | None, dry: bool) -> str:
    if tests is None:
        return "no pytest.log"
    if dry:
        return (f"{tests['collected']} GPU tests collected, none run (the suite runs them under the interpreter)"
                if tests["collected"] is not None else (tests["closing"] or ""))
    counts = ", ".join(f"{n} {word}" for word, n in sorted(tests["counts"].items())) or "no test finished"
    return counts


def _kernel_detail(kernels: dict | None) -> str:
    if kernels is None:
        return "no results.json"
    records = kernels.get("measurements", [])
    measured = sum(r["median_ms"] is not None for r in records)
    planned = kernels.get("settings", {})
    total = None
    try:
        total = (len(planned["dtypes"]) * len(planned["T"]) * len(planned["sizes"]) * len(planned["providers"])
                 * len(planned["stats"]) * len(planned["passes"]))
    except (KeyError, TypeError):
        pass
    done = f"{len(records)} of {total}" if total else f"{len(records)}"
    return f"{done} measurements saved ({measured} timed, the rest skipped with a reason)" + (
        "" if kernels.get("complete") else "; the sweep did not finish")


def _model_detail(model: dict | None) -> str:
    if model is None:
        return "no model_results.json"
    records = model.get("measurements", [])
    timed = [r["provider"] for r in records if r["median_ms"] is not None]
    return f"{len(timed)} of {len(records)} variants timed ({', '.join(timed) or 'none'})" + (
        "" if model.get("complete") else "; stopped before the remaining variants")


def _pack_extras(out: Path, work: Path, kernels: dict | None, problems: list[str]) -> list[str]:
    """OUT/extras.tar.gz: plots (drawn again if the sweep stopped before drawing them), the benchmarks'
    markdown, the tests' junit XML. Returns the names packed."""
    kernel_dir = work / "kernels"
    plots = sorted(kernel_dir.glob("*.png"))
    if not plots and kernels and kernels.get("measurements"):
        try:
            from .report import plot_kernels

            kernel_dir.mkdir(parents=True, exist_ok=True)
            plots = plot_kernels(kernels["measurements"], kernels.get("copy_bandwidth", {}).get("gb_per_s"),
                                 kernel_dir)
        except Exception as error:  # a plot is a convenience: say so and go on
            problems.append(f"the kernel plots could not be drawn: {type(error).__name__}: {error}")
    members = [*plots, kernel_dir / "results.md", work / "model" / "model_results.md", work / "junit.xml"]
    members = [m for m in members if m.exists()]
    if not members:
        return []
    with tarfile.open(out / "extras.tar.gz", "w:gz") as tar:
        for member in members:
            tar.add(member, arcname=member.name)
    return [m.name for m in members]


def build_summary(out: Path, work: Path, *, mode: str, command: str, budget_total: int, guard: int,
                  elapsed: int | None) -> tuple[str, str]:
    """(the whole summary.md, its head: machine, stages and targets, for printing)."""
    dry = mode == "dry"
    problems: list[str] = []
    kernels = _read_json(out / "results.json", problems)
    model = _read_json(out / "model_results.json", problems)
    tests = parse_pytest_log((out / "pytest.log").read_text(errors="replace")) if (out / "pytest.log").exists() else None
    stages = read_stages(work / "stages.tsv") if (work / "stages.tsv").exists() else []
    env = (work / "env.txt").read_text(errors="replace").strip() if (work / "env.txt").exists() else ""
    records = kernels.get("measurements", []) if kernels else []
    model_records = model.get("measurements", []) if model else []
    packed = _pack_extras(out, work, kernels, problems)

    machine = (kernels or model or {}).get("machine", {})
    where = machine.get("gpu") or (f"CPU ({machine.get('cpu')}, {machine.get('cpu_count')} cores)" if machine
                                   else "see the environment below")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = [
        f"# Device run: {where}" + (" (dry run)" if dry else ""),
        "",
    ]
    if dry:
        head += ["**Dry run** (no CUDA here, or DEVICE_RUN_DRY=1): every stage ran at tiny sizes; without CUDA the "
                 "Triton kernels ran in the interpreter and the peers on their CPU paths. It checks the script, not "
                 "the kernels: no figure below is a speed, and no target is judged.", ""]
    head += [
        f"- date (UTC): {now}; command: `{command}`",
        f"- {line}" if (line := _env_line(env, "commit")) else "- commit: unknown",
        f"- versions: {_env_line(env, 'versions') or 'unknown'}",
        f"- total: {elapsed if elapsed is not None else '?'} s; the stages' budgets add up to "
        f"{sum(s['budget'] for s in stages)} s of a planned {budget_total} s; guard {guard} s",
        "",
        "## Stages",
        "",
    ]
    details = {"tests": _tests_detail(tests, dry), "kernels": _kernel_detail(kernels), "model": _model_detail(model)}
    head.append(markdown_table(
        ("stage", "what", "budget s", "ran s", "exit", "status"),
        [[s["name"], STAGE_WHAT[s["name"]], str(s["budget"]), str(s["seconds"]), s["rc"],
          _stage_status(s, details[s["name"]])] for s in stages]))
    head += ["", "## Targets (docs/benchmarks.md)", ""]
    try:
        head.append(markdown_table(("target", "case", "measured", "goal", "status"),
                                   target_rows(records, model_records, judged=not dry)))
    except Exception as error:
        problems.append(f"the targets could not be evaluated: {type(error).__name__}: {error}")
        head.append("(not evaluated: see the problems below)")
    if model_records and any(r["batch"] != 128 for r in model_records):
        head += ["", f"The model step ran at batch {model_records[0]['batch']} (docs/benchmarks.md's target names "
                     "batch 128; `python -m bench.model_step --model vgg11` measures that)."]

    body = ["", "## GPU tests" if not dry else "## GPU tests (collected only)", ""]
    if tests is None:
        body.append("No pytest.log.")
    else:
        body.append(f"- pytest: {tests['closing'] or 'no closing line (stopped before the end?)'}")
        body.append(f"- outcomes counted from each test's line: {_tests_detail(tests, dry)}")
        body += [f"- failed: `{node}`" for node in tests["failed"][:40]]
        if len(tests["failed"]) > 40:
            body.append(f"- ... and {len(tests['failed']) - 40} more failures (pytest.log)")
    body += ["", "## Kernel sweep", ""]
    if kernels is None:
        body.append("No results.json: the kernel stage did not save a size.")
    else:
        copy = kernels.get("copy_bandwidth") or {}
        if copy.get("gb_per_s"):
            body.append(f"- copy ceiling: {copy['gb_per_s']:.1f} GB/s ({copy['bytes_copied'] / 2**20:.0f} MiB, "
                        "bytes read + written), timed at the start")
        body.append(f"- command: `{kernels.get('command')}`; complete: {kernels.get('complete')}")
        body.append("- each cell: median time, effective GB/s (share of the copy ceiling), peak memory")
        body.append("")
        headers, rows, skipped = kernel_table(records)
        body.append(markdown_table(headers, rows))
        body += [""] + [f"- {line}" for line in skipped_lines(skipped)]
    body += ["", "## Model step", ""]
    if model is None:
        body.append("No model_results.json: the model stage did not finish a variant.")
    else:
        settings = model.get("settings", {})
        body.append(f"- command: `{model.get('command')}`; complete: {model.get('complete')}")
        body.append(f"- step: {settings.get('model')}, T = {settings.get('T')}, batch {settings.get('batch')}, "
                    f"{settings.get('image_size')} x {settings.get('image_size')} random images, SGD + "
                    f"cross-entropy + {settings.get('eta')} L_MPD")
        body.append("")
        body.append(markdown_table(*model_table(model_records)))
    body += ["", "## Environment", "", "```", env or "(no record)", "```", "", "## Files", ""]
    names = sorted({p.name for p in out.iterdir() if p.is_file()} | {"summary.md"})
    body += [f"- {name}" + (f": {', '.join(packed)}" if name == "extras.tar.gz" else
                            " (everything printed)" if name == "device.log" else "") for name in names]
    if problems:
        body += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    head_text = "\n".join(head) + "\n"
    return head_text + "\n".join(body) + "\n", head_text


def _env_line(env: str, key: str) -> str | None:
    for line in env.splitlines():
        if line.startswith(f"{key}:"):
            return line if key == "commit" else line.split(":", 1)[1].strip()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--mode", choices=("gpu", "dry"), required=True)
    parser.add_argument("--command", default="bash bench/device_run.sh")
    parser.add_argument("--budget-total", type=int, default=0)
    parser.add_argument("--guard", type=int, default=0)
    parser.add_argument("--elapsed", type=int)
    args = parser.parse_args(argv)
    try:
        text, head = build_summary(args.out, args.work, mode=args.mode, command=args.command,
                                   budget_total=args.budget_total, guard=args.guard, elapsed=args.elapsed)
    except Exception:  # the script then writes its own short summary
        traceback.print_exc()
        return 1
    (args.out / "summary.md").write_text(text)
    print(head)
    print(f"wrote {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
