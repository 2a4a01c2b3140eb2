"""What is particular to the fused CPU kernels (backend="cpu", what "auto" picks for CPU tensors).

What both fused backends must do (every option, multi-tile shapes, thresholds, determinism,
statistics at |mean| >> std, low precision, memory formats, the surrogate parameter tensor) is
tested on both in tests/library/test_kernels.py. Here: many more random examples (the C kernels run
natively), tiles and threads, what is copied, float16/bfloat16 forwards, the build, its cache
and its fallback, a forked child, bad input.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import (
    LAYOUTS,
    assert_close,
    compare_with_reference,
    input_shapes,
    make_input,
    neuron_options,
    poison_kernel_outputs,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import mpd_triton as mt
from mpd_triton.kernels import cpu as cpu_kernels

REASON = mt.cpu_kernels_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the CPU kernels are unavailable here: {REASON}")

TERMS = st.sampled_from([
    ("spikes",), ("stats",), ("overlap",), ("state",), ("spikes", "stats"), ("spikes", "overlap", "state"),
])


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    poison_kernel_outputs(monkeypatch)


@settings(max_examples=150)
@given(shape=input_shapes(), opts=neuron_options(), seed=st.integers(0, 2**31 - 1), terms=TERMS,
       scale=st.floats(0.3, 3.0), offset=st.floats(-1.0, 2.0), channels_innermost=st.booleans(),
       with_v_init=st.booleans())
def test_kernel_matches_reference(shape, opts, seed, terms, scale, offset, channels_innermost, with_v_init):
    x = make_input(shape, seed, scale=scale, offset=offset)
    if channels_innermost:  # the channels-last layout, generalized to any rank (rows of C channels)
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)
    v_init = make_input(shape[1:], seed + 7, scale=0.5, offset=0.0) if with_v_init else None
    compare_with_reference("cpu", x, opts, seed, terms, v_init=v_init)


@given(B=st.integers(1, 3000), C=st.integers(1, 5000), S=st.integers(1, 20000))
def test_tile_shape(B, C, S):
    block_b, block_c = cpu_kernels.tile_shape(B, C, S)
    assert 1 <= block_b <= B and 1 <= block_c <= C
    assert block_b * block_c * S <= max(cpu_kernels.TILE_ELEMENTS, S, cpu_kernels.MIN_TILE_ROWS * block_c)
    if block_b < B:  # a channel's share of a tile is not tiny unless the batch is
        assert block_b * S >= min(cpu_kernels.MIN_TILE_ROWS, S) or block_c == 1


def _forward_backward(x, *, surrogate=mt.Sigmoid()):
    xx = x.clone().requires_grad_(True)
    s, m, v = mt.lif(xx, backend="cpu", return_stats=True, surrogate=surrogate)
    (s.sum() + mt.mpd_overlap(m, v, 1.0).sum()).backward()
    return s, m, v, xx.grad


@pytest.mark.parametrize("C", [1, 3, 16, 100, 129, 300])
@pytest.mark.parametrize("rows", [1, 17, 700, 5000])
def test_statistics_with_channels_innermost_against_float64(C, rows):
    """Channels innermost (S = 1 for the kernels, as channels-last): the statistics are summed in
    chunks of whole rows (lif_cpu.c's STATS_FOLD floats) and folded onto the channels, rows left
    over summed one by one. Row counts below, at and far above a chunk and a tile, channel counts
    that divide the chunk, that do not, and that exceed it: mean and variance as float64 gives them,
    at |mean| >> std too."""
    T = 2
    gen = torch.Generator().manual_seed(C * 7919 + rows)
    for offset in (0.0, 30.0):
        x = torch.randn(T, rows, C, generator=gen) * 0.5 + offset + torch.linspace(-1, 1, C)
        _, mean, var = mt.lif(x, backend="cpu", return_stats=True)
        u = mt.lif(x.double(), backend="torch", return_stats=True)
        assert_close("mean", mean, u[1], atol=1e-5, rtol=1e-6)
        assert_close("var", var, u[2], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("S", [1, 15, 16, 17, 40, 300])
@pytest.mark.parametrize("B,C", [(1, 1), (3, 5), (600, 1), (40, 70)])
def test_statistics_with_positions_innermost_against_float64(S, B, C):
    """Positions innermost (S > 1): with S >= 16 the forward's loop sums each row's whole 16-chunks of a
    channel as it computes u (a double per row and channel in the scratch: up to a tile's rows x
    channels, 512 at S = 16, C = 1) and the statistics add the remainder; below 16 they sum the tile
    themselves. Mean and variance as float64 gives them, at |mean| >> std too, with several tiles."""
    T = 2
    gen = torch.Generator().manual_seed(S * 7919 + B * 31 + C)
    for offset in (0.0, 30.0):
        x = torch.randn(T, B, C, S, generator=gen) * 0.5 + offset + torch.linspace(-1, 1, C)[:, None]
        _, mean, var = mt.lif(x, backend="cpu", return_stats=True)
        u = mt.lif(x.double(), backend="torch", return_stats=True)
        assert_close("mean", mean, u[1], atol=1e-5, rtol=1e-6)
        assert_close("var", var, u[2], atol=1e-5, rtol=1e-4)


def test_bitwise_repeatable_and_independent_of_threads():
    """Deterministic: two calls agree bit for bit, and so do one thread and two (the
    statistics' partials are per tile and merged in tile order, whoever runs a tile)."""
    x = make_input((8, 9, 6, 40, 50), 21)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = _forward_backward(x), _forward_backward(x)
        torch.set_num_threads(1)
        single = _forward_backward(x)
    finally:
        torch.set_num_threads(threads)
    for name, p, q, r in zip(("spikes", "mean", "var", "grad_x"), first, second, single):
        assert torch.equal(p, q), f"{name} differs between two identical calls"
        assert torch.equal(p, r), f"{name} differs between one and two threads"


@pytest.mark.parametrize("threads", [2, 3, 5, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_threads_started_by_the_library_split_any_tile_count(threads, dtype, channels_last, monkeypatch):
    """lif_fwd_mt / lif_bwd_mt: tiles in contiguous ranges over up to `threads` threads of the C
    library (more threads than tiles: one per tile), each with its own scratch row; the same bits
    as one thread, statistics and gradients included."""
    x = make_input((3, 5, 7, 6, 5), 4, dtype=dtype)  # 7 channels x 30 positions: several ragged tiles
    if channels_last:
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)
    monkeypatch.setattr(cpu_kernels, "TILE_ELEMENTS", 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _forward_backward(x)
        monkeypatch.setattr(cpu_kernels, "THREAD_MIN_ELEMENTS", 1)
        torch.set_num_threads(threads)
        split = _forward_backward(x)
    finally:
        torch.set_num_threads(before)
    for name, p, q in zip(("spikes", "mean", "var", "grad_x"), single, split):
        assert torch.equal(p, q), f"{name} differs between one thread and {threads}"


# ---------------------------------------------------------------- layouts


# Read in place: any time stride (0 too), dense samples (channels-last: dense steps). The others are copied once.
IN_PLACE_LAYOUTS = ("contiguous", "expanded_over_T", "batch_major", "channels_last", "channels_last_expanded_over_T")


class _CopyCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func.overloadpacket.__name__ in ("copy_", "clone", "_to_copy")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_what_is_copied(layout):
    """Inputs read in place are not copied (an input expanded over T is never materialized);
    the others are copied once, in the forward."""
    _, x = LAYOUTS[layout](make_input((3, 2, 4, 3, 5), 8))
    params = mt.LIFConfig().kernel_params
    with _CopyCounter() as forward:
        _, u_saved, _, _, _ = cpu_kernels.lif_forward(x.detach(), params, stats=True, save_state=True)
    with _CopyCounter() as backward:
        cpu_kernels.lif_backward(torch.ones_like(u_saved), u_saved, params, grad_v_T=torch.ones_like(u_saved[0]),
                                 need_grad_v0=True)
    assert forward.copies == int(layout not in IN_PLACE_LAYOUTS)
    assert backward.copies == 0


# ---------------------------------------------------------------- errors, availability, build


def test_bad_input():
    x = make_input((3, 2, 4), 0)
    with pytest.raises(TypeError, match="backend='cpu' takes float32, float16 or bfloat16"):
        mt.lif(x.double(), backend="cpu")
    params = mt.LIFConfig().kernel_params
    _, u_saved, _, _, _ = cpu_kernels.lif_forward(x, params)
    with pytest.raises(ValueError, match="unknown surrogate id 7"):
        cpu_kernels.lif_backward(None, u_saved, params._replace(surrogate_kind=7))


def test_double_backward_is_refused():
    x = make_input((3, 2, 4), 0).requires_grad_(True)
    s = mt.lif(x, backend="cpu", surrogate=mt.Sigmoid())
    (g,) = torch.autograd.grad(s.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_auto_picks_cpu_kernels_for_cpu_tensors(monkeypatch):
    calls = []
    real = cpu_kernels.lif_forward
    monkeypatch.setattr(cpu_kernels, "lif_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = make_input((3, 2, 4), 0)
    mt.lif(x)
    assert calls == [1]
    mt.lif(x.double())  # float64: the reference
    assert calls == [1]


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


FALLBACK_PROBE = """
    import warnings, torch, mpd_triton as mt
    x = torch.randn(3, 2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = mt.lif(x)
    assert torch.equal(s, mt.lif(x, backend="torch"))
    print("WARNINGS", [str(w.message) for w in caught])
    try:
        mt.lif(x, backend="cpu")
    except ValueError as e:
        print("ERROR", e)
"""


def test_disabled_falls_back_to_reference_silently():
    done = _python(FALLBACK_PROBE, {cpu_kernels.DISABLE_ENV: "0", "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr
    assert "WARNINGS []" in done.stdout
    assert f"ERROR backend='cpu' is unavailable: disabled by {cpu_kernels.DISABLE_ENV}=0" in done.stdout


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    done = _python(FALLBACK_PROBE, {"CC": "no-such-compiler", "PATH": str(tmp_path), cpu_kernels.CACHE_ENV:
                                    str(tmp_path / "cache"), "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr
    assert "the fused CPU kernels are unavailable (no C compiler found" in done.stdout
    assert "ERROR backend='cpu' is unavailable: no C compiler found" in done.stdout


@pytest.mark.slow
def test_build_is_cached(tmp_path):
    """The first process compiles into the cache; a later one loads the cached library
    (the compiler is only asked for its version)."""
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "cc"
    wrapper.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexec {cpu_kernels._compiler()} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {cpu_kernels.CACHE_ENV: str(tmp_path / "cache"), "CC": str(wrapper), "TRITON_INTERPRET": "0"}
    probe = "import torch, mpd_triton as mt; print('REASON', mt.cpu_kernels_unavailable())"
    first = _python(probe, env)
    assert "REASON None" in first.stdout, first.stdout + first.stderr
    assert len(list((tmp_path / "cache").glob("lif_cpu-*.so"))) == 1
    assert not list((tmp_path / "cache").glob("*.tmp"))
    compiles = [line for line in log.read_text().splitlines() if "lif_cpu.c" in line]
    assert len(compiles) == 1, compiles
    second = _python(probe, env)
    assert "REASON None" in second.stdout, second.stdout + second.stderr
    assert [line for line in log.read_text().splitlines() if "lif_cpu.c" in line] == compiles


NO_OPENMP_PROBE = """
    import torch, mpd_triton as mt
    from mpd_triton.kernels import cpu
    assert mt.cpu_kernels_unavailable() is None
    print("OPENMP", cpu._library().lif_cpu_openmp())
    cpu.THREAD_MIN_ELEMENTS, cpu.TILE_ELEMENTS = 1, 64
    x = torch.randn(4, 3, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    runs = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        xx = x.clone().requires_grad_(True)
        s, m, v = mt.lif(xx, backend="cpu", return_stats=True)
        (s.sum() + mt.mpd_overlap(m, v, 1.0).sum()).backward()
        runs.append((s, m, v, xx.grad))
    print("EQUAL", all(torch.equal(p, q) for p, q in zip(*runs)))
"""


@pytest.mark.slow
def test_a_compiler_without_openmp_builds_kernels_that_start_their_own_threads(tmp_path):
    """A compiler that refuses -fopenmp (Apple's clang): the flag sets without it build the library,
    whose threads, started per call, give the bits of one thread."""
    wrapper = tmp_path / "cc"
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *-fopenmp*) echo "no openmp" >&2; exit 1;; esac\n'
                       f'exec {cpu_kernels._compiler()} "$@"\n')
    wrapper.chmod(0o755)
    done = _python(NO_OPENMP_PROBE, {cpu_kernels.CACHE_ENV: str(tmp_path / "cache"), "CC": str(wrapper),
                                     "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OPENMP 0" in done.stdout and "EQUAL True" in done.stdout, done.stdout


@pytest.mark.slow
def test_an_unwritable_cache_builds_in_a_temporary_folder_with_a_warning(tmp_path):
    """A cache folder that cannot be made (its parent is a file) or written: the kernels still run,
    built for the process in a temporary folder, and one warning names the folder and the cause."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    probe = ("import warnings, torch, mpd_triton as mt\n"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    warnings.simplefilter('always')\n"
             "    print('REASON', mt.cpu_kernels_unavailable())\n"
             "print('WARNINGS', [str(w.message) for w in caught])\n"
             "x = torch.randn(3, 2, 4)\n"
             "assert torch.equal(mt.lif(x, backend='cpu'), mt.lif(x, backend='torch'))\n")
    done = _python(probe, {cpu_kernels.CACHE_ENV: str(blocker / "cache"), "TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "REASON None" in done.stdout
    assert f"cannot write the cache folder {blocker / 'cache'}: not a directory" in done.stdout
    assert "built in" in done.stdout and "for this process only" in done.stdout


# ---------------------------------------------------------------- a surrogate parameter per channel or element


@pytest.mark.parametrize("shape", [(4, 3, 5, 2, 3), (4, 6, 7)], ids=["conv", "linear"])
@pytest.mark.parametrize("surrogate", [mt.Triangle(), mt.Sigmoid(), mt.SuperSpike()], ids=lambda s: s.name)
def test_surrogate_parameter_per_channel_and_per_element(shape, surrogate):
    """Per channel: each channel's gradient equals the scalar path's with that channel's value.
    Per element (broadcast over T, or varying over T): constant per channel gives the same bits."""
    params = mt.LIFConfig(tau=2.0, v_th=0.9, surrogate=surrogate).kernel_params
    x = make_input(shape, 3)
    _, u_saved, _, _, _ = cpu_kernels.lif_forward(x, params)
    grad_spikes = make_input(shape, 4)
    C = shape[2]
    per_channel = torch.linspace(0.5, 2.0, C) * params.surrogate_param
    grad_c, _ = cpu_kernels.lif_backward(grad_spikes, u_saved, params, surrogate_param=per_channel)
    for c in range(C):
        one = params._replace(surrogate_param=float(per_channel[c]))
        grad_one, _ = cpu_kernels.lif_backward(grad_spikes[:, :, c:c + 1].contiguous(),
                                               u_saved[:, :, c:c + 1].contiguous(), one)
        assert torch.equal(grad_c[:, :, c:c + 1], grad_one), c
    view = (1, 1, C) + (1,) * (len(shape) - 3)
    for element in (per_channel.view(view), per_channel.view(view).expand(shape[:2] + shape[2:]).clone(),
                    per_channel.view(view).expand(shape).clone()):
        grad_e, _ = cpu_kernels.lif_backward(grad_spikes, u_saved, params, surrogate_param=element)
        assert torch.equal(grad_e, grad_c)
    varying = per_channel.view(view) * torch.arange(1.0, shape[0] + 1).view((-1,) + (1,) * (len(shape) - 1))
    grad_v, _ = cpu_kernels.lif_backward(grad_spikes, u_saved, params, surrogate_param=varying)
    assert not torch.equal(grad_v, grad_c), "a parameter that varies over T must change the gradient"


@settings(max_examples=60)
@given(shape=input_shapes(max_T=8), opts=neuron_options(), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), channels_innermost=st.booleans())
def test_low_precision_forward_matches_reference(shape, opts, seed, dtype, channels_innermost):
    """float16 / bfloat16 in and out, float32 state: the spikes equal the reference's on the same input
    (it computes in float32 too), the statistics agree to float32 rounding, the final state to one
    rounding in the dtype."""
    if not cpu_kernels.available(dtype):
        pytest.skip(f"this machine's C compiler has no {dtype}")
    x = make_input(shape, seed, dtype=dtype)
    if channels_innermost:
        x = x.movedim(2, -1).contiguous().movedim(-1, 2)
    s, mean, var, v_T = mt.lif(x, **opts, backend="cpu", return_stats=True, return_state=True)
    ref = mt.lif_reference(x, mt.LIFConfig(**opts), return_stats=True)
    assert s.dtype == dtype and v_T.dtype == dtype
    assert torch.equal(s, ref.spikes)
    scale = 1.0 + float(ref.u.abs().max())
    assert_close("mean", mean, ref.mean, atol=2e-6 * scale, rtol=1e-5)
    assert_close("var", var, ref.var, atol=4e-6 * scale * scale, rtol=1e-4)
    assert_close("v_T", v_T, ref.v, atol=0, rtol=2.0 ** -(8 if dtype == torch.bfloat16 else 11))


FORK_PROBE = """
    import multiprocessing, numpy as np, torch, mpd_triton as mt
    # Inputs from numpy and sums in numpy: a parallel torch op before the fork would start OpenMP,
    # which then hangs in the child by itself (libgomp is not fork-safe), whatever the kernels do.
    torch.set_num_threads(2)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 64, 16, 16, 16), dtype=np.float32))

    def count(x):
        torch.set_num_threads(2)
        return float(mt.lif(x, backend="cpu").numpy().sum())

    parent = count(x)  # the parent's kernels have run on threads
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(count, (x,)).get(timeout=120)
    print("COUNTS", parent, child)
"""


def test_forked_child_runs_the_kernels_on_threads():
    """A child forked after the kernels ran on threads runs them on threads too (they start per
    call: a child inherits no thread it could wait on forever)."""
    done = _python(FORK_PROBE, {"TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    parent, child = done.stdout.split("COUNTS")[1].split()
    assert parent == child and float(parent) > 0


# ---------------------------------------------------------------- MPD-SGR's overlap in C


def _overlap_in_torch(mean, var, gamma):
    """Omega through _Overlap's torch operations (the C loops switched off)."""
    from mpd_triton import mpd
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mpd, "_in_c", lambda mean, var: False)
        return mt.mpd_overlap(mean, var, gamma)


def _overlap_case(seed: int, shape, spread: float):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=g) * spread
    var = torch.rand(shape, generator=g) ** 3 * spread ** 2  # down to ~0: sigma = sqrt(eps) too
    if mean.dim():
        mean.view(-1)[0] = 0.0  # sign(0) = 0, as autograd's abs
    return mean, var


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(), (1,), (7,), (8, 128), (3, 5, 4)]),
       spread=st.sampled_from([0.3, 1.0, 4.0, 40.0]), gamma=st.floats(0.1, 3.0),
       upstream=st.sampled_from(["mean", "weighted", "mean only", "var only"]))
def test_overlap_in_c_matches_the_torch_operations_and_float64(seed, shape, spread, gamma, upstream):
    """Float32 CPU statistics take the C loops of kernels/lif_cpu.c (mpd_overlap_fwd / _bwd): Omega
    and both gradients agree with _Overlap's torch operations in float32 and with float64, for an
    expanded upstream gradient (a mean's) and a dense one, and with one input needing no gradient."""
    from mpd_triton.mpd import _in_c
    mean, var = _overlap_case(seed, shape, spread)
    assert _in_c(mean, var)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    results = []
    for path, dtype in (("c", torch.float32), ("torch", torch.float32), ("float64", torch.float64)):
        m = mean.to(dtype, copy=True).requires_grad_(upstream != "var only")
        v = var.to(dtype, copy=True).requires_grad_(upstream != "mean only")
        omega = (_overlap_in_torch(m, v, gamma) if path != "c" else mt.mpd_overlap(m, v, gamma))
        loss = (omega * w.to(dtype)).sum() if upstream == "weighted" else omega.mean()
        loss.backward()
        results.append((omega.detach().double(), None if m.grad is None else m.grad.double(),
                        None if v.grad is None else v.grad.double()))
    (c, torch_ops, exact) = results
    for name, i in (("omega", 0), ("d/dmean", 1), ("d/dvar", 2)):
        if exact[i] is None:
            assert c[i] is None and torch_ops[i] is None, name
            continue
        # Float32 loses digits where Omega is a difference of two close tail probabilities, and a
        # rounding of z moves Phi(z) by about z^2 ulp in the tail (z up to 14 before it underflows):
        # the C loops must be as close to float64 as the torch operations are, or within that.
        error_c, error_torch = (c[i] - exact[i]).abs(), (torch_ops[i] - exact[i]).abs()
        bound = 2 * error_torch + 5e-5 * exact[i].abs() + 1e-7 * float(exact[i].abs().max()) + 1e-30
        worst = int((error_c - bound).argmax()) if error_c.dim() else 0
        assert bool((error_c <= bound).all()), (
            f"{name}: C {c[i].flatten()[worst]:.9g}, torch {torch_ops[i].flatten()[worst]:.9g}, "
            f"float64 {exact[i].flatten()[worst]:.9g}")


def test_overlap_in_c_keeps_the_far_tail_and_the_sign():
    """|mean| >> gamma: Omega ~ 1e-19 (not 1 - 1 = 0) and a gradient that still pushes outwards."""
    mean = torch.tensor([10.0, -10.0, 0.0], requires_grad=True)
    omega = mt.mpd_overlap(mean, torch.ones(3), 1.0)
    far = omega.detach()
    assert 0 < float(far[0]) < 1e-15 and float(far[0]) == float(far[1])
    omega.sum().backward()
    assert mean.grad[0] < 0 < mean.grad[1] and mean.grad[2] == 0


def test_overlap_in_c_is_as_accurate_as_torch_down_to_the_subnormals():
    """The C loops' own exp and erfc (written out so that they vectorize): on a dense grid of |mean| up
    to 15 sigma, Omega and both gradients are as close to float64 as the torch operations, or within
    2e-5 relative, down to the smallest normal float; below it (subnormal Omega) still nonzero."""
    from mpd_triton.mpd import normal_cdf
    mean = torch.linspace(-15.0, 15.0, 6001)
    var = torch.full_like(mean, 1.0)
    got = mt.mpd_overlap(mean, var, 1.0)
    torch_ops = _overlap_in_torch(mean, var, 1.0)
    sigma = (var.double() + 1e-5).sqrt()
    z1, z2 = (1.0 - mean.double().abs()) / sigma, (-1.0 - mean.double().abs()) / sigma
    exact = normal_cdf(z1) - normal_cdf(z2)
    normal = exact >= torch.finfo(torch.float32).tiny
    error_c, error_torch = (got.double() - exact).abs(), (torch_ops.double() - exact).abs()
    assert bool((error_c <= 2 * error_torch + 2e-5 * exact)[normal].all())
    assert bool((got[~normal & (exact > 1e-44)] > 0).all())
    grads = []
    for dtype, overlap in ((torch.float64, mt.mpd_overlap), (torch.float32, mt.mpd_overlap),
                           (torch.float32, _overlap_in_torch)):
        m, v = mean.to(dtype).requires_grad_(), var.to(dtype).requires_grad_()
        overlap(m, v, 1.0).sum().backward()
        grads.append((m.grad.double(), v.grad.double()))
    for i, name in enumerate(("d/dmean", "d/dvar")):
        exact, c, torch_ops = (grads[k][i] for k in range(3))
        # near mean = 0 the gradient is a difference of two close densities: torch's error is the scale
        keep = exact.abs() >= torch.finfo(torch.float32).tiny
        bound = 2 * (torch_ops - exact).abs() + 2e-5 * exact.abs() + 1e-7 * float(exact.abs().max())
        assert bool(((c - exact).abs() <= bound)[keep].all()), name


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 9), C=st.integers(1, 200), count=st.integers(1, 10**6),
       given_grads=st.sampled_from(["both", "mean", "var"]), expanded=st.booleans())
def test_mpd_terms_in_c_are_the_torch_operations_bit_for_bit(seed, T, C, count, given_grads, expanded):
    """The backward's a + b u coefficients: kernels.cpu.mpd_terms (one C loop) returns the bits of
    ops._mpd_terms' torch operations (what a compiled graph runs), for dense and expanded gradients."""
    from mpd_triton import ops
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(T, C, generator=g) * 3
    def grad():
        return torch.randn((), generator=g).expand(T, C) if expanded else torch.randn(T, C, generator=g)
    grad_mean = grad() if given_grads != "var" else None
    grad_var = grad() if given_grads != "mean" else None
    a, b = cpu_kernels.mpd_terms(mean, grad_mean, grad_var, count)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernels, "available", lambda dtype=None: False)
        u_saved = torch.empty(T, 1, C, 1).expand(T, count, C, 1)  # only its shape is read: M = count
        ref_a, ref_b = ops._mpd_terms(u_saved, mean, grad_mean, grad_var)
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)
    assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overlap_double_backward_is_the_formulas(dtype):
    """A backward that builds a graph (create_graph=True) recomputes z from mean and var with torch
    operations, on the C path (float32) and on the torch path (float64) alike: the second derivative
    is autograd's through the formula (a tensor gamma takes that route)."""
    mean, var = _overlap_case(3, (4, 6), 1.0)
    mean, var = mean.to(dtype), var.to(dtype) + 0.05
    seconds = []
    for gamma in (0.7, torch.tensor(0.7, dtype=dtype)):
        m, v = mean.clone().requires_grad_(), var.clone().requires_grad_()
        grad_m, grad_v = torch.autograd.grad(mt.mpd_overlap(m, v, gamma).sum(), (m, v), create_graph=True)
        seconds.append(torch.autograd.grad((grad_m.square() + grad_v).sum(), (m, v)))
    for got, expected in zip(*seconds):
        assert_close("second derivative", got, expected, atol=1e-5, rtol=1e-4)


def test_overlap_takes_the_torch_operations_where_c_does_not_apply(monkeypatch):
    from mpd_triton import mpd
    mean, var = _overlap_case(4, (5,), 1.0)
    assert not mpd._in_c(mean.double(), var.double())
    assert not mpd._in_c(mean.to(torch.bfloat16), var.to(torch.bfloat16))
    monkeypatch.setattr(cpu_kernels, "available", lambda dtype=None: False)
    assert not mpd._in_c(mean, var)
    assert torch.isfinite(mt.mpd_overlap(mean, var, 1.0)).all()


def test_tracing_never_hands_tracer_tensors_to_the_c_code():
    """make_fx (real, fake, symbolic) and FakeTensorMode (runtime.traced): mt.lif goes through the custom
    operator and Omega through torch operations, so the trace replays what eager computes, and a
    FakeTensor (data pointer 0) never reaches the C code."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def layer(x):
        spikes, mean, var = mt.lif(x, backend="cpu", return_stats=True)
        return spikes, mt.mpd_overlap(mean, var, 0.7)

    x = make_input((4, 2, 3, 5), 0, scale=1.5, offset=0.5)
    other = make_input((4, 2, 3, 5), 1, scale=1.5, offset=0.5)
    for mode in ("real", "fake", "symbolic"):
        replay = make_fx(layer, tracing_mode=mode)(x)
        for got, expected in zip(replay(other), layer(other)):
            assert_close(f"make_fx {mode}", got, expected, atol=1e-6, rtol=1e-6)
    with FakeTensorMode() as fake:
        spikes, omega = layer(fake.from_tensor(x))
    assert spikes.shape == x.shape and omega.shape == (4, 3)
