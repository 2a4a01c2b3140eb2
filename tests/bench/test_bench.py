"""The benchmark harness on the CPU: byte model, providers, records, CLI, outputs (bench/).

These tests check that the harness measures the right thing and writes what it
promises; they time nothing that matters (speed needs a GPU: docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEVICE

import mpd_triton as mt
from bench import kernels, measure, model_step, peers, providers, report
from bench.measure import Timing, minimal_bytes
from bench.providers import PROVIDERS, SpikingJellyProvider

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
SPIKINGJELLY_MISSING = peers.load_spikingjelly()[1]
needs_spikingjelly = pytest.mark.skipif(SPIKINGJELLY_MISSING is not None, reason=str(SPIKINGJELLY_MISSING))
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")


pytestmark = pytest.mark.usefixtures("one_thread")


def cpu_providers() -> dict:
    """Every provider, with spikingjelly allowed its CPU implementation so that its code path runs here."""
    return {**PROVIDERS, "spikingjelly": SpikingJellyProvider(require_triton=False)}


# ------------------------------------------------------------------ byte model (docs/design.md, section 6)

@pytest.mark.parametrize("pass_name, dtype, T, N, C, stats, expected", [
    # 24 bytes per element for forward + backward at b = 4, 12 at b = 2 (docs/design.md, section 6)
    ("both", torch.float32, 8, 1 << 24, 128, False, 24 << 27),
    ("both", torch.bfloat16, 8, 1 << 24, 128, False, 12 << 27),
    ("forward", torch.float32, 4, 1024, 16, False, 4 * 1024 * 12),
    ("backward", torch.bfloat16, 4, 1024, 16, False, 4 * 1024 * 6),
    # statistics: + mean and var [T, C] float32 written (forward), their gradients read (backward)
    ("forward", torch.float32, 4, 1024, 16, True, 4 * 1024 * 12 + 2 * 4 * 16 * 4),
    ("backward", torch.bfloat16, 4, 1024, 16, True, 4 * 1024 * 6 + 2 * 4 * 16 * 4),
    ("both", torch.bfloat16, 16, 1 << 23, 128, True, (12 << 27) + 2 * (2 * 16 * 128 * 4)),
])
def test_minimal_bytes_matches_hand_count(pass_name, dtype, T, N, C, stats, expected):
    got = minimal_bytes(pass_name, T=T, N=N, C=C, elem_bytes=dtype.itemsize, stats=stats)
    assert got == expected, f"{pass_name} {dtype} T={T} N={N} C={C} stats={stats}: {got} bytes, expected {expected}"


def test_minimal_bytes_with_h_saved_in_bfloat16_for_float32_input():
    # x, s, grad_s, grad_x 4 bytes; h 2 bytes: forward 4 + 4 + 2, backward 4 + 2 + 4
    assert minimal_bytes("forward", T=2, N=10, C=1, elem_bytes=4, saved_elem_bytes=2, stats=False) == 20 * 10
    assert minimal_bytes("both", T=2, N=10, C=1, elem_bytes=4, saved_elem_bytes=2, stats=False) == 20 * 20


@pytest.mark.parametrize("kwargs, match", [
    (dict(pass_name="sideways", T=1, N=1, C=1, elem_bytes=4), "pass must be one of"),
    (dict(pass_name="forward", T=0, N=1, C=1, elem_bytes=4), "T must be a positive integer"),
    (dict(pass_name="forward", T=1, N=-3, C=1, elem_bytes=4), "N must be a positive integer"),
])
def test_minimal_bytes_refuses_bad_input(kwargs, match):
    pass_name = kwargs.pop("pass_name")
    with pytest.raises(ValueError, match=match):
        minimal_bytes(pass_name, stats=False, **kwargs)


def test_effective_bandwidth_and_copy_ceiling_count_read_plus_write(monkeypatch):
    assert measure.gb_per_s(3_000_000, 2.0) == pytest.approx(1.5)  # 3 MB in 2 ms
    monkeypatch.setattr(measure, "time_call", lambda *a, **k: Timing(4.0, 3.0, 5.0, "fake"))
    copy = measure.copy_bandwidth(CPU, 1_000_000, warmup_ms=1, rep_ms=1)
    assert copy["bytes_moved"] == 2_000_000
    assert copy["gb_per_s"] == pytest.approx(0.5)  # 2 MB in 4 ms


def test_wall_clock_timer_orders_quantiles_and_clears_grads():
    x = torch.zeros(3, requires_grad=True)
    calls = []

    def fn():
        assert x.grad is None, "grad_to_none must clear x.grad before every run"
        x.grad = torch.ones(3)
        calls.append(1)

    t = measure.time_call(fn, CPU, warmup_ms=1, rep_ms=1, grad_to_none=[x])
    assert t.timer == "wall_clock"
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    assert len(calls) >= 2 + 3  # first call, estimate, then at least three timed runs


def test_peak_memory_off_cuda_is_null_with_reason():
    assert measure.peak_memory(lambda: None, CPU) == (None, measure.NO_CUDA_MEMORY_REASON)


# ------------------------------------------------------------------ shapes and command-line input

@pytest.mark.parametrize("T, elements", [(4, 1 << 27), (16, 1 << 27), (4, 1 << 10), (3, 3 * 1000)])
def test_bench_shape_splits_elements(T, elements):
    shape = kernels.bench_shape(T, elements)
    assert shape[0] == T and math.prod(shape) == elements
    assert shape[2] <= kernels.BENCH_CHANNELS and shape[3] <= kernels.BENCH_POSITIONS


def test_bench_shape_of_the_full_size_is_a_conv_layer():
    assert kernels.bench_shape(8, 1 << 27) == (8, 512, 128, 256)


def test_parse_sizes():
    assert kernels.parse_sizes(["2^27", "2**10", "4096"]) == [1 << 27, 1024, 4096]
    for bad in ("0", "-8", "2^x", "big"):
        with pytest.raises(ValueError, match="--sizes"):
            kernels.parse_sizes([bad])


@pytest.mark.parametrize("argv, message", [
    (["--providers", "cupy"], "invalid choice: 'cupy'"),
    (["--sizes", "0"], "--sizes must be positive"),
    (["--sizes", "1000", "--T", "16"], "not a multiple of T = 16"),
    (["--T", "0"], "--T must be positive"),
    (["--rep-ms", "0"], "--rep-ms must be > 0"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--compile-T", "eight"], "--compile-T takes time steps or 'all'"),
    (["--compile-sizes", "2^x"], "--compile-sizes takes element counts like 2^27 or 'all'"),
])
def test_cli_refuses_bad_input(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        kernels.main(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@cpu_only
def test_cli_refuses_gpu_sizes_without_cuda(capsys, tmp_path):
    with pytest.raises(SystemExit):
        kernels.main(["--sizes", "2^27", "--out", str(tmp_path)])
    assert "without CUDA the sizes are limited" in capsys.readouterr().err


# ------------------------------------------------------------------ providers

def tiny_plan(names, **changes) -> kernels.Plan:
    plan = dict(dtypes=["float32"], Ts=[2], sizes=[1 << 10], providers=list(names), passes=list(measure.PASSES),
                stats_modes=(False, True), warmup_ms=1.0, rep_ms=1.0, strict=True)
    plan.update(changes)
    return kernels.Plan(**plan)


# torch.compile takes seconds per graph on this CPU: statistics on only (the graph with the MPD loss),
# but two sizes: the second compiles a dynamic-shape graph, whose backward once refused retain_graph.
STATS_MODES = {"torch_compile": (True,)}
SIZES = {"torch_compile": [1 << 9, 1 << 10]}


@pytest.mark.parametrize("name", [
    "mpd_triton", "torch_eager",
    pytest.param("torch_compile", marks=pytest.mark.skipif(sys.platform != "linux", reason="inductor needs a compiler")),
    pytest.param("spikingjelly", marks=needs_spikingjelly),
])
def test_every_available_provider_runs_every_pass(name):
    stats_modes = STATS_MODES.get(name, (False, True))
    sizes = SIZES.get(name, [1 << 10])
    plan = tiny_plan([name], stats_modes=stats_modes, sizes=sizes)
    records = kernels.run_sweep(plan, DEVICE, copy_gb_per_s=10.0, progress=False, providers=cpu_providers())
    assert [(r["elements"], r["pass_name"], r["stats"]) for r in records] == [
        (n, p, s) for n in sizes for s in stats_modes for p in measure.PASSES]
    for r in records:
        T, B, C, S = r["shape"]
        assert tuple(r) == kernels.RECORD_FIELDS
        assert r["skipped"] is None, r["skipped"]
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["implementation"]
        assert r["bytes"] == minimal_bytes(r["pass_name"], T=T, N=B * C * S, C=C, elem_bytes=4, stats=r["stats"])
        assert r["gb_per_s"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert r["copy_fraction"] == pytest.approx(r["gb_per_s"] / 10.0)
        if DEVICE.type == "cuda":
            assert r["timer"] == "do_bench" and r["peak_memory_bytes"] > 0 and r["peak_memory_note"] is None
        else:
            assert r["timer"] == "wall_clock" and r["peak_memory_bytes"] is None and r["peak_memory_note"]


class _FakeMeter:
    """A copy meter whose successive timings are 10, 20, 30, ... GB/s."""

    def __init__(self):
        self.calls = 0

    def measure(self, *, warmup_ms, rep_ms):
        self.calls += 1
        return {"gb_per_s": 10.0 * self.calls}


def test_copy_beside_compares_each_measurement_with_the_copies_timed_around_it():
    meter = _FakeMeter()
    plan = tiny_plan(["torch_eager"], stats_modes=(False,), copy="beside")
    records = kernels.run_sweep(plan, DEVICE, copy_gb_per_s=1000.0, progress=False, providers=cpu_providers(),
                                copy_meter=meter)
    assert meter.calls == 2 * len(records)  # one before and one after each measurement
    for i, r in enumerate(records):  # measurement i sits between timings 2i + 1 and 2i + 2
        assert r["copy_gb_per_s"] == pytest.approx(10.0 * (2 * i + 1.5))
        assert r["copy_fraction"] == pytest.approx(r["gb_per_s"] / r["copy_gb_per_s"])


def test_copy_start_compares_every_measurement_with_the_one_copy():
    meter = _FakeMeter()
    plan = tiny_plan(["torch_eager"], stats_modes=(False,), copy="start")
    records = kernels.run_sweep(plan, DEVICE, copy_gb_per_s=10.0, progress=False, providers=cpu_providers(),
                                copy_meter=meter)
    assert meter.calls == 0
    assert all(r["copy_gb_per_s"] == 10.0 for r in records)


def test_copy_beside_needs_a_meter():
    with pytest.raises(ValueError, match="needs a copy_meter"):
        kernels.run_sweep(tiny_plan(["torch_eager"], copy="beside"), DEVICE, copy_gb_per_s=10.0, progress=False)


def test_copy_mode_defaults_to_beside_without_cuda_and_can_be_chosen():
    parse = kernels.build_parser().parse_args
    device = torch.device("cpu")
    assert kernels.make_plan(parse([]), device).copy == "beside"
    assert kernels.make_plan(parse(["--copy", "start"]), device).copy == "start"
    assert kernels.make_plan(parse([]), torch.device("cuda")).copy == "start"


def _run_step(provider, stats, x, grads):
    """Outputs and input gradient of one provider's step on a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_()
    outputs = provider.step(stats)(x)
    torch.autograd.backward(outputs, grads)
    return [o.detach() for o in outputs], x.grad


@pytest.mark.gpu
@pytest.mark.parametrize("name", [
    "mpd_triton",
    pytest.param("spikingjelly", marks=needs_spikingjelly),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_providers_compute_what_the_reference_computes(name, dtype):
    """A harness that timed different work would be wrong: spikes, MPD loss and dL/dx agree with torch_eager."""
    x = providers.make_input(kernels.bench_shape(4, 1 << 11), dtype, DEVICE)
    provider = cpu_providers()[name]
    for stats in (False, True):
        grads = providers.make_output_grads(x, stats)
        (got, got_grad), (ref, ref_grad) = (_run_step(p, stats, x, grads) for p in (provider, PROVIDERS["torch_eager"]))
        assert torch.equal(got[0], ref[0]), f"{name} {dtype} stats={stats}: spikes differ from the reference"
        if stats:
            assert got[1].item() == pytest.approx(ref[1].item(), rel=1e-4, abs=1e-6), f"{name}: MPD loss"
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        scale = ref_grad.float().abs().max().item()
        err = (got_grad.float() - ref_grad.float()).abs().max().item()
        assert err <= tolerance * scale, f"{name} {dtype} stats={stats}: max |dL/dx - reference| = {err:.3g}"


@needs_spikingjelly
def test_spikingjelly_statistics_use_the_pre_spike_potential():
    """The peer's statistics must be of h - V_th (before reset), not of spikingjelly's post-reset v_seq."""
    x = providers.make_input((3, 4, 8, 5), torch.float32, DEVICE).detach().mul(3)  # many spikes: reset matters
    layer = peers.SpikingJellyLIF(record_mpd=True)
    layer(x)
    mean, var = layer.mpd_records[-1]
    ref_mean, ref_var = mt.lif(x, backend="torch", return_stats=True)[1:]
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)


@needs_spikingjelly
def test_spikingjelly_refuses_a_surrogate_it_does_not_have():
    with pytest.raises(ValueError, match="no spikingjelly surrogate"):
        peers.SpikingJellyLIF(surrogate=mt.SuperSpike(10.0))


def test_skipped_providers_carry_a_reason(monkeypatch):
    monkeypatch.setattr(providers.mt, "triton_interpreted", lambda: False)
    monkeypatch.setattr(providers, "load_spikingjelly", lambda: (None, "spikingjelly is not importable (test)"))
    records = kernels.run_sweep(tiny_plan(["mpd_triton", "spikingjelly"]), CPU, 10.0, progress=False)
    reasons = {r["provider"]: r["skipped"] for r in records}
    assert "TRITON_INTERPRET" in reasons["mpd_triton"]
    assert reasons["spikingjelly"] == "spikingjelly is not importable (test)"
    assert all(r["median_ms"] is None and r["implementation"] is None for r in records)


def test_torch_compile_runs_only_at_the_planned_T_and_partial_results_are_reported():
    sizes_done = []
    plan = tiny_plan(["torch_compile"], Ts=[2], sizes=[1 << 8, 1 << 10], compile_Ts=[8])
    records = kernels.run_sweep(plan, CPU, 10.0, progress=False, on_size_done=lambda r: sizes_done.append(len(r)))
    assert {r["skipped"] for r in records} == {"torch_compile is measured only at T in [8] (--compile-T)"}
    assert sizes_done == [6, 12], "on_size_done gets the records so far after each size"


def test_torch_compile_runs_only_at_the_planned_sizes():
    plan = tiny_plan(["torch_compile"], Ts=[2], sizes=[1 << 8], compile_sizes=[1 << 10])
    records = kernels.run_sweep(plan, CPU, 10.0, progress=False)
    assert {r["skipped"] for r in records} == {"torch_compile is measured only at T*N in [2^10] (--compile-sizes)"}
    parse = kernels.build_parser().parse_args
    assert kernels.make_plan(parse(["--compile-sizes", "2^27", "1000"]), CPU).compile_sizes == [1 << 27, 1000]
    assert kernels.make_plan(parse([]), CPU).compile_sizes is None  # default: every size


@needs_spikingjelly
@cpu_only
def test_spikingjelly_runs_its_pytorch_path_on_the_cpu():
    """On the CPU the peer is SpikingJelly's own CPU implementation, what its CPU users run."""
    assert PROVIDERS["spikingjelly"].unavailable(CPU, torch.float32) is None
    assert PROVIDERS["spikingjelly"].implementation(CPU) == "spikingjelly cpu"


def test_fused_cpu_provider_runs_on_the_cpu_only():
    provider = PROVIDERS["mpd_triton_cpu"]
    assert provider.unavailable(CPU, torch.float32) == (None if mt.cpu_kernels_unavailable() is None else
                                                         f"the CPU kernels are unavailable: {mt.cpu_kernels_unavailable()}")
    assert "run on the CPU" in provider.unavailable(torch.device("cuda"), torch.float32)


def test_a_failing_provider_is_recorded_or_raised_with_strict():
    class Broken(providers.Provider):
        name, description = "broken", "raises"

        def implementation(self, device):
            return "nothing"

        def step(self, stats):
            def step(x):
                raise RuntimeError("kernel exploded")
            return step

    plan = tiny_plan(["broken"], strict=False, stats_modes=(False,))
    records = kernels.run_sweep(plan, CPU, 10.0, progress=False, providers={"broken": Broken()})
    assert [r["skipped"] for r in records] == ["failed: RuntimeError: kernel exploded"] * 3
    with pytest.raises(RuntimeError, match="kernel exploded"):
        kernels.run_sweep(tiny_plan(["broken"], stats_modes=(False,)), CPU, 10.0, progress=False,
                          providers={"broken": Broken()})


# ------------------------------------------------------------------ targets

def _fake(provider, pass_name, stats, ms, copy_fraction=None, dtype="float32", T=8, elements=1 << 27):
    return dict(provider=provider, pass_name=pass_name, stats=stats, dtype=dtype, T=T, elements=elements,
                median_ms=ms, copy_fraction=copy_fraction)


def test_targets_are_computed_from_the_largest_size():
    records = [
        _fake("mpd_triton", "forward", False, 1.0, copy_fraction=0.9),
        _fake("mpd_triton", "backward", False, 1.0, copy_fraction=0.7),
        _fake("mpd_triton", "both", False, 2.0),
        _fake("mpd_triton", "both", True, 2.1),
        _fake("spikingjelly", "both", True, 4.2),
        _fake("spikingjelly", "both", False, 2.0),
        _fake("torch_eager", "both", True, 30.0),
        _fake("mpd_triton", "forward", False, 1.0, copy_fraction=0.1, elements=1 << 20),  # smaller: ignored
    ]
    targets = {t["target"]: t for t in report.evaluate_targets(records, on_gpu=True)}
    expected = {
        "forward share of copy bandwidth": (0.9, True),
        "backward share of copy bandwidth": (0.7, False),
        "statistics overhead": (0.05, True),
        "speed-up over spikingjelly + PyTorch statistics": (2.0, True),
        "speed-up over plain spikingjelly": (2.0 / 2.1, False),
        "speed-up over the eager reference": (30.0 / 2.1, True),
    }
    for name, (value, met) in expected.items():
        assert targets[name]["value"] == pytest.approx(value), name
        assert targets[name]["met"] is met, name
    cpu_targets = report.evaluate_targets(records, on_gpu=False)
    assert not {t["target"] for t in cpu_targets} & set(expected), "the GPU targets are judged on a GPU only"


def test_cpu_targets():
    records = [
        _fake("mpd_triton_cpu", "both", True, 1.0, copy_fraction=0.5, elements=1 << 20),
        _fake("spikingjelly", "both", True, 2.5, elements=1 << 20),
        _fake("mpd_triton_cpu", "both", True, 1.0, copy_fraction=0.1, elements=1 << 18),  # smaller: ignored
        _fake("mpd_triton_cpu", "both", True, 1.0, copy_fraction=0.1, T=4, elements=1 << 22),  # T = 4: ignored
    ]
    rec = lambda p, ms: dict(provider=p, model="small", T=4, batch=64, median_ms=ms)  # noqa: E731
    model = [rec("torch_eager", 90.0), rec("mpd_triton_cpu", 40.0), rec("mpd_triton_cpu_compile", 30.0)]
    targets = {t["target"]: t for t in report.evaluate_targets(records, model, on_gpu=False)}
    share = targets["CPU: fwd+bwd with statistics, share of copy bandwidth"]
    assert (share["value"], share["met"], share["case"]) == (0.5, True, "float32, T=8, T*N=2^20")
    speedup = targets["CPU: speed-up over spikingjelly + PyTorch statistics"]
    assert (speedup["value"], speedup["met"]) == (pytest.approx(2.5), False)
    step = targets["CPU: training step speed-up over the eager reference"]
    assert (step["value"], step["met"]) == (pytest.approx(3.0), True)
    assert "best: mpd_triton_cpu_compile" in step["case"]
    assert not any(t["target"].startswith("CPU") for t in report.evaluate_targets(records, model, on_gpu=True))


def test_bench_small_model_defaults_are_the_quick_preset():
    from train.config import PRESETS, RunConfig

    quick = {**RunConfig().to_dict(), **PRESETS["quick"]}
    assert model_step.QUICK_MODEL["T"] == quick["T"] and model_step.QUICK_MODEL["batch"] == quick["batch_size"]
    assert quick["data"] == "fmnist-subset" and quick["model"] == "small"
    assert (model_step.QUICK_MODEL["image_size"], model_step.QUICK_MODEL["in_channels"]) == (28, 1)  # Fashion-MNIST
    assert model_step.QUICK_MODEL["model_options"] == {"classifier_bn": True}  # BatchNorm before every LIF
    model, _, _ = model_step.build_variant("torch_eager", "small", T=2, image_size=28, device=torch.device("cpu"),
                                           in_channels=1, model_options=model_step.QUICK_MODEL["model_options"])
    modules = list(model.modules())
    lif_inputs = [type(modules[i - 1]).__name__ for i, m in enumerate(modules) if isinstance(m, mt.LIF)]
    assert lif_inputs and all(name.startswith("BatchNorm") for name in lif_inputs), lif_inputs


def test_model_targets_compare_time_and_peak_memory():
    rec = lambda p, ms, peak: dict(provider=p, model="vgg11", T=8, batch=128, median_ms=ms,  # noqa: E731
                                   peak_memory_bytes=peak)
    targets = report.evaluate_targets([], [rec("mpd_triton", 100.0, 900), rec("spikingjelly", 110.0, 1000)],
                                      on_gpu=True)
    assert [(t["value"], t["met"]) for t in targets] == [(pytest.approx(1.1), False), (pytest.approx(0.9), True)]


# ------------------------------------------------------------------ command line, end to end

def test_quick_cli_writes_json_markdown_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(kernels.PROVIDERS, "spikingjelly", SpikingJellyProvider(require_triton=False))
    names = ["mpd_triton", "torch_eager"] + ([] if SPIKINGJELLY_MISSING else ["spikingjelly"])
    argv = ["--quick", "--dtype", "float32", "--out", str(tmp_path), "--providers", *names, "--rep-ms", "1",
            "--warmup-ms", "1", "--no-progress", "--strict", "--T", "4", "--sizes", "2^12"]  # small: the interpreter
    assert kernels.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("No CUDA" if not torch.cuda.is_available() else "mpd-triton")
    payload = json.loads((tmp_path / "results.json").read_text())
    for key in ("command", "machine", "settings", "providers", "copy_bandwidth", "measurements", "targets"):
        assert key in payload, key
    assert payload["copy_bandwidth"]["gb_per_s"] > 0
    measurements = payload["measurements"]
    assert len(measurements) == len(names) * 2 * len(measure.PASSES)  # one dtype, T, size
    for r in measurements:
        assert tuple(r) == kernels.RECORD_FIELDS
        assert r["skipped"] is None and r["median_ms"] > 0
        assert r["copy_gb_per_s"] > 0 and r["copy_fraction"] == pytest.approx(r["gb_per_s"] / r["copy_gb_per_s"])
    assert payload["settings"]["copy"] == ("start" if torch.cuda.is_available() else "beside")
    markdown = (tmp_path / "results.md").read_text()
    assert "| dtype | T | T*N | pass | stats | mpd_triton | torch_eager |" in markdown
    assert "## Targets" in markdown
    plot = tmp_path / "kernels_float32_T4.png"
    assert plot.stat().st_size > 10_000 and f"]({plot.name})" in markdown


@pytest.mark.slow
@cpu_only
def test_cli_without_the_interpreter_says_so_and_skips_the_kernels(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [sys.executable, "-m", "bench.kernels", "--quick", "--providers", "mpd_triton", "torch_eager",
            "--passes", "forward", "--stats", "off", "--dtype", "float32", "--rep-ms", "1", "--warmup-ms", "1",
            "--no-progress", "--out", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("No CUDA") and "skipped" in first, first
    by_provider = {r["provider"]: r for r in json.loads((tmp_path / "results.json").read_text())["measurements"]}
    assert "TRITON_INTERPRET" in by_provider["mpd_triton"]["skipped"]
    assert by_provider["torch_eager"]["median_ms"] > 0


def test_model_step_runs_every_variant_on_the_same_model(tmp_path, monkeypatch):
    variants = {"mpd_triton": PROVIDERS["mpd_triton"], "torch_eager": PROVIDERS["torch_eager"]}
    if not SPIKINGJELLY_MISSING:
        variants["spikingjelly"] = SpikingJellyProvider(require_triton=False)
    if DEVICE.type == "cpu" and mt.cpu_kernels_unavailable() is None:  # the fused C kernels, eager and compiled
        variants["mpd_triton_cpu"] = PROVIDERS["mpd_triton_cpu"]
        variants["mpd_triton_cpu_compile"] = PROVIDERS["mpd_triton_cpu"]
    records = model_step.run_variants(variants, "small", T=2, batch=2, image_size=8, device=DEVICE, warmup_ms=1,
                                      rep_ms=1, strict=True)
    assert [r["provider"] for r in records] == list(variants)
    for r in records:
        assert tuple(r) == model_step.MODEL_RECORD_FIELDS
        assert r["skipped"] is None and r["median_ms"] > 0 and r["first_step_ms"] > 0
        assert ("torch.compile" in r["implementation"]) == r["provider"].endswith("_compile")
    # Same initial weights and data: every variant starts from the same loss (task loss + eta * L_MPD).
    first = records[0]["loss_first"]
    assert all(r["loss_first"] == pytest.approx(first, rel=1e-5) for r in records), [r["loss_first"] for r in records]


def test_spikingjelly_variant_replaces_every_lif_layer():
    if SPIKINGJELLY_MISSING:
        pytest.skip(SPIKINGJELLY_MISSING)
    model, reg, forward = model_step.build_variant("spikingjelly", "vgg11", T=2, image_size=32, device=CPU)
    assert forward is model
    lif_layers = [m for m in model.modules() if isinstance(m, mt.LIF)]
    assert len(lif_layers) == 10 and all(isinstance(m, peers.SpikingJellyLIF) for m in lif_layers)
    assert len(reg.layers) == 10


def test_model_cli_via_bench_kernels(tmp_path, capsys):
    argv = ["--model", "small", "--image-size", "8", "--batch", "2", "--T", "2", "--providers", "torch_eager",
            "--rep-ms", "1", "--warmup-ms", "1", "--out", str(tmp_path), "--strict"]
    assert kernels.main(argv) == 0
    payload = json.loads((tmp_path / "model_results.json").read_text())
    assert payload["settings"]["model"] == "small" and len(payload["measurements"]) == 1
    assert "| variant | model |" in (tmp_path / "model_results.md").read_text()
    assert "training-step benchmark" in capsys.readouterr().out.splitlines()[0]


# ---------------------------------------------------------------- bench.aot: compiling for a GPU that is not here

def _has_nvidia_tools() -> bool:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()


needs_nvidia_tools = pytest.mark.skipif(not _has_nvidia_tools(), reason="triton's bundled ptxas / cuobjdump missing")


def test_occupancy_model():
    from bench.aot import occupancy

    # 80 registers: 2560 per warp, 4-warp blocks: 65536 // 10240 = 6 blocks, 24 warps.
    assert occupancy(80, 4) == {"blocks_per_sm": 6, "warps_per_sm": 24, "occupancy": 24 / 64}
    # 255 registers round up to 8192 per warp: 4 two-warp blocks.
    assert occupancy(255, 2)["warps_per_sm"] == 8
    # Few registers: the 64-warp limit binds.
    assert occupancy(32, 4)["warps_per_sm"] == 64 and occupancy(16, 1)["blocks_per_sm"] == 32


@needs_nvidia_tools
def test_aot_compiles_the_hot_path_for_h100(tmp_path):
    """The real kernels compile for sm_90 with their launches' own arguments, without a GPU: no
    spills, and the float32 hot path moves data in 128-bit loads and stores."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench.aot", "--quick", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("mpd-triton bench.aot: compiling for sm_90")
    payload = json.loads((tmp_path / "aot.json").read_text())
    assert payload["failures"] == [] and payload["arch"] == "90"
    by = {(r["case"], r["kernel"]): r for r in payload["records"]}
    assert set(by) == {
        ("fwd f32 + stats (training)", "lif_fwd_kernel"), ("fwd f32 + stats (training)", "stats_merge_kernel"),
        ("fwd bf16 + stats (training)", "lif_fwd_kernel"), ("fwd bf16 + stats (training)", "stats_merge_kernel"),
        ("bwd f32 triangle + MPD (training)", "lif_bwd_kernel"), ("bwd bf16 triangle + MPD (training)", "lif_bwd_kernel"),
    }
    for r in payload["records"]:
        assert 0 < r["registers"] <= 255 and r["local_bytes"] == 0, r
        assert 0 < r["warps_per_sm"] <= 64
    fwd = by[("fwd f32 + stats (training)", "lif_fwd_kernel")]
    assert fwd["ld_v4"] > 0 and fwd["ld_scalar"] == 0 and fwd["st_v4"] > 0
    bwd = by[("bwd f32 triangle + MPD (training)", "lif_bwd_kernel")]
    assert bwd["ld_v4"] > 0 and bwd["st_v4"] > 0 and bwd["st_scalar"] == 0
    assert "| case | kernel |" in (tmp_path / "aot.md").read_text()


def test_aot_refuses_interpreter_and_bad_options(tmp_path, capsys):
    from bench import aot

    # This process runs the kernels in the interpreter (conftest), so they cannot compile.
    if mt.triton_interpreted():
        assert aot.main(["--quick", "--out", str(tmp_path)]) == 2
        assert "TRITON_INTERPRET=1 is set" in capsys.readouterr().err
    for bad, message in ((["--arch", "75"], "--arch must be one of"), (["--tiles", "300"], "powers of two"),
                         (["--warps", "3"], "--warps take")):
        with pytest.raises(SystemExit):
            aot.main(bad)
        assert message in capsys.readouterr().err
