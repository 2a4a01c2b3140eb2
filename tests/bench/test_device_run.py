"""bench/device_run.sh, the GPU measurement in one command, rehearsed on the CPU.

Its dry run (no CUDA: tiny sizes, the Triton interpreter, the GPU tests collected only) runs here end to end,
so that a broken script is found in CI and not in the few minutes a GPU is lent; the budgets are read from
the script itself; a stage stopped at its budget must leave what it finished, and the summary must say so.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mpd_triton as mt
from bench import device_summary, kernels, model_step
from bench.report import GPU_TARGETS

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "device_run.sh"
# What the device tool brings back from $OUT.
MAX_FILES, MAX_DEPTH, MAX_FILE_BYTES = 8, 2, 16 << 20
FILE_NAME = re.compile(r"[A-Za-z0-9._-]+")
# One device command runs at most 10 minutes; the default command is planned for 8 and never runs past 9.
PLANNED_SECONDS, GUARD_SECONDS, COMMAND_SECONDS = 480, 540, 600

pytestmark = pytest.mark.usefixtures("one_thread")


def script_budgets() -> dict[str, int]:
    """The defaults of the script's BUDGET_* / GUARD / SUMMARY_LIMIT lines, where they are written once."""
    found = re.findall(r"^(BUDGET_[A-Z]+|GUARD|SUMMARY_LIMIT|KILL_GRACE)=\$\{\1:-(\d+)\}", SCRIPT.read_text(),
                       re.MULTILINE)
    return {name: int(value) for name, value in found}


def run_script(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("BUDGET_", "KERNEL_ARGS", "MODEL_ARGS"))}
    environment.update(OUT=str(out), PYTHON=sys.executable, DEVICE_RUN_DRY="1", **env)
    environment.pop("GUARD", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=600)


def test_budgets_fit_one_device_command():
    budgets = script_budgets()
    stages = [budgets[f"BUDGET_{name.upper()}"] for name in device_summary.STAGES]
    assert len(stages) == 3 and all(b > 0 for b in stages), budgets
    planned = sum(stages) + budgets["BUDGET_SETUP"]
    assert planned <= PLANNED_SECONDS, f"the default command is planned for {planned} s, more than 8 minutes"
    assert budgets["GUARD"] <= GUARD_SECONDS < COMMAND_SECONDS
    # Under the guard every stage gets its whole budget, the summary and the kill grace keeping their share.
    assert sum(stages) + budgets["SUMMARY_LIMIT"] + budgets["KILL_GRACE"] <= budgets["GUARD"]


def _files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file())


def _targets(summary: str) -> dict[str, list[str]]:
    section = summary.split("## Targets")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    statuses: dict[str, list[str]] = {}
    for row in rows[1:]:  # the header first
        statuses.setdefault(row[0].lstrip("| "), []).append(row[-1].rstrip(" |"))
    return statuses


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the device machine runs Linux; the script uses its tools")
def test_dry_run_of_the_whole_command(tmp_path):
    """`bash bench/device_run.sh` as the device tool calls it, dry: every stage ends, at most 8 files come
    back, none nested, summary.md lists every target of docs/benchmarks.md with a status, and the GPU
    subset holds the checks the GPU run is for."""
    out = tmp_path / "out"
    done = run_script(out)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    files = _files(out)
    assert 0 < len(files) <= MAX_FILES, [p.name for p in files]
    for path in files:
        relative = path.relative_to(out)
        assert len(relative.parts) - 1 <= MAX_DEPTH and all(FILE_NAME.fullmatch(part) for part in relative.parts)
        assert path.stat().st_size <= MAX_FILE_BYTES, path
    assert {p.name for p in files} == {"summary.md", "device.log", "pytest.log", "results.json",
                                       "model_results.json", "extras.tar.gz"}

    summary = (out / "summary.md").read_text()
    assert "(dry run)" in summary
    for stage in device_summary.STAGES:
        assert re.search(rf"^\| {stage} \| .* \| 0 \| ok", summary, re.MULTILINE), f"stage {stage} not ok:\n{summary}"
    statuses = _targets(summary)
    assert set(statuses) == set(GPU_TARGETS), statuses
    for name, found in statuses.items():
        assert found and all(s.startswith(device_summary.STATUS_WORDS) for s in found), (name, found)
    assert statuses["training step peak memory vs spikingjelly"] == ["not measured"]  # no CUDA: no peak memory
    assert "not judged (dry run" in statuses["speed-up over the eager reference"][0]

    sweep = json.loads((out / "results.json").read_text())
    assert sweep["complete"] and sweep["settings"]["T"] == [8] and sweep["settings"]["dtypes"] == ["float32", "bfloat16"]
    assert {r["provider"] for r in sweep["measurements"] if r["median_ms"] is not None} >= {"mpd_triton", "torch_eager"}
    model = json.loads((out / "model_results.json").read_text())
    assert model["complete"] and model["settings"]["model"] == "vgg11"

    # The GPU subset (pytest -m gpu, collected in the dry run) covers what the GPU run must check.
    selected = [line for line in (out / "pytest.log").read_text().splitlines() if "::" in line]
    required = {
        "forward, backward, statistics, MPD term, state": "test_kernels.py::test_every_option_combination[",
        "multi-tile statistics": "test_kernels.py::test_kernel_multi_tile_shapes[",
        "per-channel surrogate parameter": "test_kernels.py::test_surrogate_param_tensor_matches_reference[",
        "float16": "test_conv_layer_in_every_dtype_and_layout[channels_last-float16]",
        "bfloat16": "test_conv_layer_in_every_dtype_and_layout[batch_major-bfloat16]",
        "channels-last": "test_memory_formats_match_reference[channels_last-triton]",
        "strided": "test_memory_formats_match_reference[batch_major-triton]",
        "torch.compile(fullgraph=True) with the Triton kernels": "test_compiled_model_matches_eager[triton]",
        "no graph break": "test_model_forward_traces_as_one_graph[triton]",
        "opcheck, forward": "test_opcheck_lif_fwd[",
        "opcheck, backward": "test_opcheck_lif_bwd[triton]",
        "the benchmark's providers agree": "test_providers_compute_what_the_reference_computes[",
    }
    missing = [what for what, node in required.items() if not any(node in line for line in selected)]
    assert not missing, f"the GPU subset lacks: {missing}"
    # The C kernels take CPU tensors only: none of their cases in the GPU subset.
    assert not [line for line in selected if re.search(r"[\[-]cpu[\]-]|_cpu\]", line)]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the device machine runs Linux; the script uses its tools")
def test_a_stage_past_its_budget_is_stopped_and_reported(tmp_path):
    out = tmp_path / "out"
    done = run_script(out, "model", BUDGET_MODEL="2")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert re.search(r"^\| model \| .* \| 2 \| (\d+) \| 124 \| stopped at budget \(2 s\)", summary, re.MULTILINE), summary
    assert "| tests |" not in summary and "| kernels |" not in summary
    assert len(_files(out)) <= MAX_FILES


def _plan(mode: str) -> dict[str, list[str]]:
    done = subprocess.run(["bash", str(SCRIPT), "--plan", mode], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    commands = {}
    for line in done.stdout.splitlines():
        stage, command = line.split(":", 1)
        commands[stage] = shlex.split(command)
    assert list(commands) == list(device_summary.STAGES)
    return commands


def _module_args(command: list[str], module: str) -> list[str]:
    assert command[:3] == [sys.executable, "-m", module], command
    return command[3:]


def test_the_gpu_commands_are_what_the_gpu_run_needs():
    """The GPU branch of the script never runs in CI: its commands are parsed here by the tools' own parsers
    (a typo there would otherwise be found on the GPU, in its few minutes)."""
    gpu = _plan("gpu")
    tests = _module_args(gpu["tests"], "pytest")
    assert tests[:2] == ["-m", "gpu"] and "tests" in tests and "--co" not in tests
    assert any(a.startswith("--junitxml=") for a in tests) and "-v" in tests
    plan = kernels.make_plan(kernels.build_parser().parse_args(_module_args(gpu["kernels"], "bench.kernels")),
                             torch.device("cuda"))
    assert (plan.dtypes, plan.Ts, plan.sizes) == (["float32", "bfloat16"], [8, 4], [1 << 27, 1 << 24])
    assert plan.providers == ["mpd_triton", "spikingjelly", "torch_eager", "torch_compile"]
    assert plan.passes == ["forward", "backward", "both"] and plan.stats_modes == (False, True)
    assert (plan.compile_Ts, plan.compile_sizes, plan.copy) == ([8], [1 << 27], "start")
    assert plan.count() == 192
    step = model_step.build_parser().parse_args(_module_args(gpu["model"], "bench.model_step"))
    assert (step.model, step.T, step.batch, step.image_size, step.width) == ("vgg11", 8, 64, 32, None)
    assert step.providers == ["mpd_triton", "spikingjelly", "torch_eager", "mpd_triton_compile", "torch_compile"]
    dry = _plan("dry")
    assert "--co" in _module_args(dry["tests"], "pytest")
    dry_plan = kernels.make_plan(kernels.build_parser().parse_args(_module_args(dry["kernels"], "bench.kernels")),
                                 torch.device("cpu"))
    assert dry_plan.Ts == [8] and dry_plan.providers == plan.providers and dry_plan.compile_sizes == [1 << 27]


def test_script_refuses_an_unknown_stage(tmp_path):
    done = run_script(tmp_path / "out", "everything")
    assert done.returncode == 2 and "unknown argument 'everything'" in done.stderr
    assert not (tmp_path / "out").exists()
    done = run_script(tmp_path / "out", "--plan", "h100")
    assert done.returncode == 2 and "--plan takes gpu or dry" in done.stderr


# ------------------------------------------------------------------ what a stopped stage leaves

def test_a_stopped_sweep_keeps_the_sizes_it_measured(tmp_path, monkeypatch):
    """bench.kernels saves results.json after every size: stopped in the second size, the first stays,
    marked incomplete; the summary shows its table and says the stage was stopped."""
    work = tmp_path / "work"
    measure = kernels._measure
    calls = []

    def stop_in_the_second_size(step, x, *args):
        calls.append(x.numel())
        if x.numel() == 1 << 10:
            raise KeyboardInterrupt  # what a stop does to the sweep: it ends inside a measurement
        return measure(step, x, *args)

    monkeypatch.setattr(kernels, "_measure", stop_in_the_second_size)
    argv = ["--providers", "torch_eager", "--T", "2", "--sizes", "2^8", "2^10", "--dtype", "float32",
            "--warmup-ms", "1", "--rep-ms", "1", "--no-progress", "--copy", "start", "--out", str(work / "kernels")]
    assert kernels.main(argv) == 130
    saved = json.loads((work / "kernels" / "results.json").read_text())
    assert saved["complete"] is False
    assert {r["elements"] for r in saved["measurements"]} == {1 << 8} and len(saved["measurements"]) == 6

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(saved))
    (work / "stages.tsv").write_text("kernels\t180\t180\t124\t180\tstopped at budget\n")
    text, _ = device_summary.build_summary(out, work, mode="gpu", command="bash bench/device_run.sh kernels",
                                           budget_total=480, guard=540, elapsed=200)
    assert re.search(r"\| kernels \| .* \| 124 \| stopped at budget \(180 s\): 6 of 12 measurements saved .*"
                     r"the sweep did not finish", text), text
    assert "| float32 | 2 | 2^8 | forward | off |" in text
    assert "| float32 | 2 | 2^10 |" not in text


def test_a_stopped_model_step_keeps_the_variants_it_timed(tmp_path, monkeypatch):
    """bench.model_step saves model_results.json after every variant."""
    time_call = model_step.time_call
    variants = []

    def stop_at_the_second_variant(step, device, **kwargs):
        variants.append(step)
        if len(variants) == 2:
            raise KeyboardInterrupt
        return time_call(step, device, **kwargs)

    monkeypatch.setattr(model_step, "time_call", stop_at_the_second_variant)
    argv = ["--model", "small", "--T", "2", "--batch", "1", "--image-size", "8", "--width", "2", "--rep-ms", "1",
            "--warmup-ms", "1", "--providers", "torch_eager", "mpd_triton", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        model_step.main(argv)
    saved = json.loads((tmp_path / "model_results.json").read_text())
    assert saved["complete"] is False and saved["settings"]["model_options"]["width"] == 2
    assert [r["provider"] for r in saved["measurements"]] == ["torch_eager"]
    assert saved["measurements"][0]["median_ms"] > 0


# ------------------------------------------------------------------ the summary's parts

def _kernel(provider, pass_name, stats, ms, copy_fraction=None, dtype="float32", T=8, elements=1 << 27):
    return dict(provider=provider, pass_name=pass_name, stats=stats, dtype=dtype, T=T, elements=elements,
                median_ms=ms, copy_fraction=copy_fraction)


def test_target_rows_say_met_missed_by_how_much_or_not_measured():
    records = [
        _kernel("mpd_triton", "forward", False, 1.0, copy_fraction=0.87),
        _kernel("mpd_triton", "backward", False, 1.0, copy_fraction=0.755),
        _kernel("mpd_triton", "both", False, 2.0),
        _kernel("mpd_triton", "both", True, 2.3),
        _kernel("torch_eager", "both", True, 46.0),
    ]
    model = [dict(provider="mpd_triton", model="vgg11", T=8, batch=64, median_ms=100.0, peak_memory_bytes=90),
             dict(provider="spikingjelly", model="vgg11", T=8, batch=64, median_ms=108.0, peak_memory_bytes=100)]
    rows = {row[0]: row for row in device_summary.target_rows(records, model, judged=True)}
    assert list(rows) == list(GPU_TARGETS)  # every target, in the docs' order
    assert rows["forward share of copy bandwidth"][2:] == ["87.0%", ">= 85.0%", "met"]
    assert rows["backward share of copy bandwidth"][2:] == ["75.5%", ">= 80.0%", "missed by 4.5 points"]
    assert rows["statistics overhead"][2:] == ["+15.0%", "<= +10.0%", "missed by 5.0 points"]
    assert rows["speed-up over the eager reference"][2:] == ["20x", ">= 10x", "met"]
    assert rows["speed-up over plain spikingjelly"][2:] == ["-", ">= 1x", "not measured"]
    assert rows["training step speed-up over spikingjelly"][2:] == ["1.08x", ">= 1.2x", "missed by 10%"]
    assert rows["training step peak memory vs spikingjelly"][2:] == ["0.9x", "<= 1x", "met"]
    assert rows["forward share of copy bandwidth"][1] == "float32, T=8, T*N=2^27"
    # Cases in the sweep's order: float32 before bfloat16, T = 8 before T = 4.
    more = records + [_kernel("mpd_triton", "forward", False, 1.0, copy_fraction=0.9, dtype=d, T=T)
                      for d, T in (("float32", 4), ("bfloat16", 8))]
    cases = [row[1] for row in device_summary.target_rows(more, [], judged=True)
             if row[0] == "forward share of copy bandwidth"]
    assert cases == ["float32, T=8, T*N=2^27", "float32, T=4, T*N=2^27", "bfloat16, T=8, T*N=2^27"]
    unjudged = device_summary.target_rows(records, model, judged=False)
    assert {row[-1] for row in unjudged} == {"not judged (dry run: CPU, tiny sizes)", "not measured"}
    nothing = device_summary.target_rows([], [], judged=True)
    assert [row[0] for row in nothing] == list(GPU_TARGETS) and {row[-1] for row in nothing} == {"not measured"}


def test_pytest_log_counts_each_test_once_even_when_stopped():
    serial = "\n".join([
        "tests/library/test_kernels.py::test_a[triton] PASSED                [  1%]",
        "tests/library/test_kernels.py::test_b[triton] FAILED                [  2%]",
        "tests/library/test_compile.py::test_c[triton] SKIPPED (no trace_autograd_ops) [  3%]",
        "____ test_b[triton] ____",
        "tests/library/test_kernels.py:12: in test_b",
        "FAILED tests/library/test_kernels.py::test_b[triton] - AssertionError: spikes",
        "=========== 1 failed, 1 passed, 1 skipped in 12.3s ===========",
    ])
    parsed = device_summary.parse_pytest_log(serial)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert parsed["failed"] == ["tests/library/test_kernels.py::test_b[triton]"]
    assert parsed["closing"] == "1 failed, 1 passed, 1 skipped in 12.3s"
    workers = ("[gw0] [ 50%] PASSED tests/library/test_kernels.py::test_a[triton]\n"
               "[gw1] [100%] ERROR tests/test_x.py::test_d")
    stopped = device_summary.parse_pytest_log(workers)  # stopped at its budget: no closing line
    assert stopped["counts"] == {"passed": 1, "error": 1} and stopped["closing"] is None
    assert device_summary.parse_pytest_log("206/1214 tests collected (1008 deselected) in 7.70s")["collected"] == 206


def test_summary_of_a_run_that_left_nothing_still_lists_every_target(tmp_path):
    (tmp_path / "stages.tsv").write_text("tests\t150\t150\t1\t3\t\nkernels\t180\t2\t-\t0\tno time left under the 540 s guard\n")
    text, head = device_summary.build_summary(tmp_path, tmp_path, mode="gpu", command="bash bench/device_run.sh",
                                              budget_total=480, guard=540, elapsed=530)
    assert "| tests |" in head and "failed (exit 1): no pytest.log" in head
    assert "not run: no time left under the 540 s guard" in head
    assert set(_targets(text)) == set(GPU_TARGETS)
    assert "No results.json" in text and "No model_results.json" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the variant's construction without a GPU")
def test_the_compiled_triton_variant_is_the_model_under_torch_compile():
    model, _, forward = model_step.build_variant("mpd_triton_compile", "small", T=2, image_size=8,
                                                 device=torch.device("cpu"), model_options={"width": 2})
    assert forward is not model and getattr(forward, "_orig_mod", None) is model
    layers = [layer for layer in model.modules() if isinstance(layer, mt.LIF)]
    assert layers and all(layer.backend == "triton" for layer in layers)
