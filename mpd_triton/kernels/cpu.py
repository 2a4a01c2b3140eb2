"""The fused CPU kernels: ``lif_cpu.c`` built on first use, loaded with ctypes, run on threads.

What ``backend="cpu"`` (and ``"auto"`` for CPU tensors) runs. The kernels do what the
Triton kernels do (kernels/lif.py), with the same inputs and outputs: the whole time
loop in one pass per tile with the state in float32, the per-(t, c) statistics of u
reduced in the same pass (per-tile partials merged in a fixed order with Chan's
formula: deterministic), u saved in the input dtype with the spike in its sign bit, and
one reverse pass for the backward with the MPD-SGR term a + b u added in it.

Differences from the Triton launchers:

* Layout: the outputs are in x's memory format, contiguous or channels-last, as the
  Triton launchers make them (``kernels.layout.forward_buffers``). x and grad_spikes are read
  in place through any time stride (0 too: an input expanded over T is never
  materialized) when each sample is dense in that format (any batch stride in the
  contiguous format); anything else is copied once. A channels-last step [B, S, C] is
  handed to the kernels as B * S rows of C channels.
* Parallelism: the tiles (block_b samples x block_c channels x all positions) are split
  over ``torch.get_num_threads()`` threads in contiguous ranges (``lif_fwd_mt`` /
  ``lif_bwd_mt``). Built with ``-fopenmp`` (the first flag sets), the library needs
  ``libgomp.so.1``, which the loader finds already loaded by torch: the ranges run on
  torch's own OpenMP threads (a second pool beside them lost to their spinning,
  docs/benchmarks_log.md, 2026-12-05). Without OpenMP, and in a child forked after the threads started,
  the library starts threads of its own for the call. ctypes releases the GIL for the
  call. Small tensors run on the calling thread.

Build: the C source is compiled with the system C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into a cache folder (``$MPD_TRITON_CACHE_DIR``, else
``$XDG_CACHE_HOME/mpd_triton`` or ``~/.cache/mpd_triton``), once per source, compiler
and machine (a few seconds); later processes load the cached library. Floating-point
contraction is off (``-ffp-contract=off``), so float32 spikes equal the reference's bit
for bit. Without a compiler, or with ``MPD_TRITON_CPU_KERNELS=0``, ``available()``
says why and ``backend="auto"`` uses the PyTorch reference instead.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..neuron import KernelParams
from ..oserrors import describe_os_error
from ..surrogates import SURROGATE_KINDS, check_surrogate_kind

# The layouts and the output buffers are the Triton launchers' (the same outputs, the same fake
# implementation for torch.compile).
from . import runtime as _runtime
from .layout import (
    StepLayout,
    backward_buffers,
    dense_in,
    empty_in,
    forward_buffers,
    step_layout,
)

__all__ = ["available", "unavailable_reason", "lif_forward", "lif_backward", "overlap_forward",
           "overlap_backward", "mpd_terms", "takes_float32", "forward_buffers", "backward_buffers",
           "tile_shape", "library_path", "DISABLE_ENV", "CACHE_ENV", "TILE_ELEMENTS"]

DISABLE_ENV = "MPD_TRITON_CPU_KERNELS"  # "0": do not build or use the CPU kernels
CACHE_ENV = "MPD_TRITON_CACHE_DIR"
ABI_VERSION = 9  # lif_cpu_abi_version() of the C source this module calls
SOURCES = ("lif_cpu.c", "lif_cpu_body.h")
SOURCE_DIR = Path(__file__).resolve().parent

# A tile's state and u stay in scratch (2 x 32 KiB in float32): the L1/L2 of one core.
TILE_ELEMENTS = 8192
# Elements of one channel in one tile at least (when the batch allows): fewer statistics partials.
MIN_TILE_ROWS = 64
# Floats of lif_cpu.c's tile_stats chunk when channels are innermost (its STATS_FOLD): scratch room.
STATS_FOLD = 256
# Float lanes of lif_cpu.c's row sums (its LANES): with S >= LANES positions the forward sums each row's
# whole LANES-chunks itself and keeps a double per row and channel in the scratch.
LANES = 16
# Below this many elements (T * N) a call runs on the calling thread.
THREAD_MIN_ELEMENTS = 1 << 16

_DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_FWD_ARGTYPES = [_P, _I64, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _F32, _F32, _I32, _I32,
                 _I64, _I64, _P]
_BWD_ARGTYPES = [_P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _F32, _F32, _F32, _F32, _I32,
                 _I32, _I32, _I32, _I64, _I64, _P]
_MERGE_ARGTYPES = [_P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64]
# lif_{fwd,bwd}_mt: (tile_begin, tile_end, scratch) -> (n_tiles, scratch, scratch_stride, workers)
_FWD_MT_ARGTYPES = _FWD_ARGTYPES[:-3] + [_I64, _P, _I64, _I32]
_BWD_MT_ARGTYPES = _BWD_ARGTYPES[:-3] + [_I64, _P, _I64, _I32]

_lock = threading.Lock()
_state: dict = {}  # "lib" or "reason", once decided
_kernels: dict = {}  # (direction, dtype) -> the loaded library's function, once found
_workspace = threading.local()  # per calling thread: scratch and statistics partials, grown as needed


# ---------------------------------------------------------------- build and load


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mpd_triton"


def _compiler() -> str | None:
    for name in ([os.environ["CC"]] if os.environ.get("CC") else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try in order: tuned for this machine with OpenMP first, then portable, then
    the same without OpenMP (a compiler without it, e.g. Apple's clang)."""
    common = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-pthread"]
    native = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
    return [common + [native, "-fopenmp"], common + ["-fopenmp"], common + [native], common]


def library_path(compiler: str, flags: list[str]) -> Path:
    """Where the library built from these sources with this compiler and flags is cached."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    for part in (compiler, version, " ".join(flags), platform.machine(), platform.platform(), str(ABI_VERSION)):
        digest.update(part.encode())
    return _cache_dir() / f"lif_cpu-{digest.hexdigest()[:20]}{'.dll' if os.name == 'nt' else '.so'}"


class _CacheUnwritable(Exception):
    """The cache folder cannot hold the library (missing and not creatable, read-only, full)."""


def _build(compiler: str, flags: list[str], target: Path) -> str | None:
    """Compile into target (atomically: a temporary file renamed); None, or why it failed.
    Raises _CacheUnwritable when target's folder cannot be written."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
        os.close(fd)
    except OSError as error:
        raise _CacheUnwritable(f"cannot write the cache folder {target.parent}: {describe_os_error(error)}") from None
    try:
        cmd = [compiler, *flags, "-o", tmp, str(SOURCE_DIR / SOURCES[0]), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()[:500]}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as error:
        return f"compiling {SOURCES[0]} failed: {error}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_in_temporary_folder(compiler: str, flags: list[str], path: Path, why: str) -> tuple[Path, str | None]:
    """The cache cannot be written: build for this process in a temporary folder (removed at exit), with
    a warning that says so; -> (the library's path, None or why that failed too)."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="mpd_triton-"))
    except OSError as error:
        return path, f"{why}; and no temporary folder for it either: {describe_os_error(error)}"
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    warnings.warn(f"mpd_triton: {why}; the fused CPU kernels are built in {folder} for this process only (set "
                  f"{CACHE_ENV} to a writable folder to build them once)", RuntimeWarning, stacklevel=2)
    target = folder / path.name
    try:
        return target, _build(compiler, flags, target)
    except _CacheUnwritable as unwritable:
        return target, str(unwritable)


def _load(path: Path):
    lib = ctypes.CDLL(str(path))  # CDLL (not PyDLL): calls release the GIL
    if lib.lif_cpu_abi_version() != ABI_VERSION:
        raise OSError(f"{path} has ABI version {lib.lif_cpu_abi_version()}, expected {ABI_VERSION}")
    for suffix in _DTYPE_SUFFIX.values():
        if suffix == "f16" and not lib.lif_cpu_has_float16():
            continue
        for name, argtypes in (("fwd", _FWD_ARGTYPES), ("bwd", _BWD_ARGTYPES), ("fwd_mt", _FWD_MT_ARGTYPES),
                               ("bwd_mt", _BWD_MT_ARGTYPES)):
            getattr(lib, f"lif_{name}_{suffix}").argtypes = argtypes
            getattr(lib, f"lif_{name}_{suffix}").restype = None
    lib.lif_stats_merge.argtypes = _MERGE_ARGTYPES
    lib.lif_stats_merge.restype = None
    lib.mpd_overlap_fwd.argtypes = [_P, _P, _P, _I64, _F32, _F32]
    lib.mpd_overlap_fwd.restype = None
    lib.mpd_overlap_bwd.argtypes = [_P, _P, _P, _I64, _P, _P, _I64, _F32, _F32]
    lib.mpd_overlap_bwd.restype = None
    lib.mpd_terms.argtypes = [_P, _P, _P, _P, _P, _I64, _I64]
    lib.mpd_terms.restype = None
    lib.lif_cpu_surrogate_count.restype = ctypes.c_int64
    return lib


def _decide():
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None, f"disabled by {DISABLE_ENV}=0"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    errors = []
    for flags in _flag_sets():
        path = library_path(compiler, flags)
        if not path.is_file():
            try:
                error = _build(compiler, flags, path)
            except _CacheUnwritable as unwritable:
                path, error = _build_in_temporary_folder(compiler, flags, path, str(unwritable))
            if error:
                errors.append(error)
                continue
        try:
            lib = _load(path)
        except (OSError, AttributeError) as error:
            errors.append(f"loading {path} failed: {error}")
            continue
        if lib.lif_cpu_surrogate_count() != len(SURROGATE_KINDS):
            return None, (f"{path} knows {lib.lif_cpu_surrogate_count()} surrogates, mpd_triton "
                          f"{len(SURROGATE_KINDS)}: a stale build (delete it)")
        return lib, None
    return None, "; ".join(errors)


def _library():
    if "decided" not in _state:
        with _lock:
            if "decided" not in _state:
                lib, reason = _decide()
                _state.update(decided=True, lib=lib, reason=reason)
    return _state["lib"]


def unavailable_reason() -> str | None:
    """Why the CPU kernels cannot be used here (building them on the first call), or None."""
    _library()
    return _state["reason"]


def available(dtype: torch.dtype | None = None) -> bool:
    """The CPU kernels are built and loaded (and take this dtype, if given)."""
    lib = _library()
    if lib is None:
        return False
    if dtype is None:
        return True
    if dtype not in _DTYPE_SUFFIX:
        return False
    return dtype != torch.float16 or bool(lib.lif_cpu_has_float16())


# ---------------------------------------------------------------- layout and tiles


def tile_shape(B: int, C: int, S: int) -> tuple[int, int]:
    """(block_b, block_c): about TILE_ELEMENTS elements (all S positions of block_c channels
    of block_b samples), with at least MIN_TILE_ROWS elements per channel when B allows."""
    if S >= TILE_ELEMENTS:
        return 1, 1
    block_c = min(C, max(1, TILE_ELEMENTS // S))
    block_b = min(B, max(1, TILE_ELEMENTS // (block_c * S)))
    if block_b * S < MIN_TILE_ROWS and block_b < B:
        block_b = min(B, -(-MIN_TILE_ROWS // S))
        block_c = min(C, max(1, TILE_ELEMENTS // (block_b * S)))
    return block_b, block_c


def _scratch_floats(block_b: int, block_c: int, S: int) -> int:
    """Floats of scratch one thread needs (the C kernels' layout of it): forward: a tile's state and u,
    then block_c doubles and 2 STATS_FOLD floats for the statistics (and, positions innermost with S >= LANES,
    a double per row and channel of the forward's sums: lif_cpu.c's stats_rowsum); backward: a tile's
    dL/dv, a tile of zeros, a row of block_c x S parameters."""
    tile = block_b * block_c * S
    rowsums = 2 * block_b * block_c if S >= LANES else 0
    return max(2 * tile + 4 * block_c + 2 + max(2 * STATS_FOLD, rowsums), 2 * tile + block_c * S)


def _buffer(name: str, numel: int, dtype: torch.dtype) -> int:
    """The address of a reusable flat buffer of at least ``numel`` elements of the calling thread (no
    allocation per call: on Linux a fresh multi-megabyte allocation costs a page fault per 4 KiB, more
    than the kernel itself)."""
    buf = getattr(_workspace, name, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1024), dtype=dtype)
        setattr(_workspace, name, buf)
    return buf.data_ptr()


def _float32_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _run_tiles(fn, fn_mt, args, n_tiles: int, elements: int, scratch_floats: int) -> None:
    """fn(*args, 0, n_tiles, scratch) on the calling thread, or fn_mt(*args, n_tiles, scratch,
    scratch_floats, workers): the tiles split over threads the C library starts."""
    workers = max(1, min(torch.get_num_threads(), n_tiles, elements // THREAD_MIN_ELEMENTS))
    scratch = _buffer("scratch", workers * scratch_floats, torch.float32)
    if workers == 1:
        fn(*args, 0, n_tiles, scratch)
    else:
        fn_mt(*args, n_tiles, scratch, scratch_floats, workers)


# ---------------------------------------------------------------- launchers


def _kernel(direction: str, dtype: torch.dtype):
    fn = _kernels.get((direction, dtype))
    return fn if fn is not None else _find_kernel(direction, dtype)


def _find_kernel(direction: str, dtype: torch.dtype):
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the mpd_triton CPU kernels are not available: {_state['reason']}")
    if not available(dtype):
        raise TypeError(f"the CPU kernels take float32, bfloat16 or float16 (where the C compiler has _Float16), "
                        f"got {dtype}")
    fn = _kernels[(direction, dtype)] = getattr(lib, f"lif_{direction}_{_DTYPE_SUFFIX[dtype]}")
    return fn


def _kernel_view(t: torch.Tensor, channels_last: bool, layout: StepLayout | None = None):
    """(t or a copy of it, (T, B, C, S), (time stride, batch stride)): how the kernels address
    t. Contiguous layout: [T, B, C, S], each sample dense [C, S], any time and batch strides.
    Channels-last: every step is [B * S, C] rows of C channels (S = 1 for the kernels: a
    position is a row, as in a linear layer), any time stride. layout: t's, if known."""
    layout = layout or step_layout(t)
    T, B, C, S = layout.T, layout.B, layout.C, layout.S
    st, sb, sc, ss = layout.strides if layout.strides is not None else (None,) * 4
    if not channels_last:
        if layout.strides is None or not (C == 1 or sc == S) or not (S == 1 or ss == 1):
            t = t.contiguous()
            st, sb = t.stride(0), t.stride(1)
        return t, (T, B, C, S), (st if T > 1 else 0, sb if B > 1 else 0)
    if not (sc == 1 and ss == C and (B == 1 or sb == S * C)):
        t = empty_in(t.shape, True, dtype=t.dtype, device=t.device, channel_dim=2).copy_(t)
        st = t.stride(0)
    return t, (T, B * S, C, 1), (st if T > 1 else 0, C)


def lif_forward(x: torch.Tensor, params: KernelParams, *, v_init: torch.Tensor | None = None, stats: bool = False,
                save_state: bool = False, save_u: bool = True):
    """Forward over x [T, B, C, *spatial] (or [T, B, F]) on the CPU; returns (spikes, u_saved,
    mean, var, v_T) as made by ``forward_buffers`` (see ``kernels.lif.lif_forward``): in x's
    memory format, contiguous or channels-last."""
    fn, fn_mt = _kernel("fwd", x.dtype), _kernel("fwd_mt", x.dtype)
    layout = step_layout(x)
    if layout.strides is None:  # spatial dims that do not merge: one copy
        x = x.contiguous()
        layout = step_layout(x)
    channels_last = layout.channels_last
    spikes, u_saved, mean, var, v_T = forward_buffers(x, stats=stats, save_state=save_state, save_u=save_u,
                                                      layout=layout)
    x, (T, B, C, S), x_strides = _kernel_view(x, channels_last, layout)
    v0 = (dense_in(v_init.to(torch.float32), channels_last, channel_dim=1) if v_init is not None else None)
    block_b, block_c = tile_shape(B, C, S)
    P, n_ctiles = -(-B // block_b), -(-C // block_c)
    pmean = _buffer("partials", 2 * T * P * C, torch.float64) if stats else None  # then pm2, T * P * C doubles on
    pm2 = pmean + 8 * T * P * C if stats else None
    _run_tiles(fn, fn_mt, (x.data_ptr(), *x_strides, spikes.data_ptr(), _ptr(u_saved), _ptr(v0), _ptr(v_T), pmean,
                    pm2, T, B, C, S, block_b, block_c, params.inv_tau, params.v_th, params.v_rest,
                    int(params.decay_input), int(params.hard_reset)),
               P * n_ctiles, T * B * C * S, _scratch_floats(block_b, block_c, S))
    if stats:
        _library().lif_stats_merge(pmean, pm2, mean.data_ptr(), var.data_ptr(), T, P, C, B, S,
                                   block_b)
    return spikes, u_saved, mean, var, v_T


def _surrogate_param_operands(surrogate_param: torch.Tensor | None, u_saved: torch.Tensor, channels_last: bool):
    """(per-channel [C] tensor or None, per-element tensor or None, its time stride): the C
    kernels' surrogate parameter. Per element, it is made dense per step in u_saved's format,
    with time stride 0 when it does not vary over T (no copy of the T steps)."""
    if surrogate_param is None:
        return None, None, 0
    p = surrogate_param.to(torch.float32)
    if p.dim() == 1:
        return p.contiguous(), None, 0
    shape = (p.shape[0],) + tuple(u_saved.shape[1:]) if p.shape[0] == 1 else tuple(u_saved.shape)
    p = dense_in(p.expand(shape), channels_last, channel_dim=2)
    return None, p, (p.stride(0) if p.shape[0] > 1 else 0)


def lif_backward(grad_spikes: torch.Tensor | None, u_saved: torch.Tensor, params: KernelParams, *,
                 mpd_a: torch.Tensor | None = None, mpd_b: torch.Tensor | None = None,
                 grad_v_T: torch.Tensor | None = None, need_grad_v0: bool = False,
                 surrogate_param: torch.Tensor | None = None):
    """Reverse time loop over u_saved (as written by ``lif_forward``) on the CPU; returns
    (grad_x in u_saved's dtype and memory format, grad_v0 float32 or None). surrogate_param:
    None (the scalar params.surrogate_param), a [C] tensor (per channel), or a tensor of
    u_saved's rank whose dims are 1 or u_saved's (per element, broadcast)."""
    check_surrogate_kind(params.surrogate_kind)
    fn, fn_mt = _kernel("bwd", u_saved.dtype), _kernel("bwd_mt", u_saved.dtype)
    layout = step_layout(u_saved)
    channels_last = layout.channels_last
    if not layout.is_dense():  # u_saved as lif_forward wrote it is dense: no copy
        u_saved = dense_in(u_saved, channels_last, channel_dim=2)
        layout = step_layout(u_saved)
    _, (T, B, C, S), _ = _kernel_view(u_saved, channels_last, layout)
    gs_strides = (0, 0)
    if grad_spikes is not None:
        if grad_spikes.dtype != u_saved.dtype:
            grad_spikes = grad_spikes.to(u_saved.dtype)
        gs_layout = step_layout(grad_spikes)
        if gs_layout.strides is None or gs_layout.channels_last != channels_last:
            grad_spikes = dense_in(grad_spikes, channels_last, channel_dim=2)
            gs_layout = step_layout(grad_spikes)
        grad_spikes, _, gs_strides = _kernel_view(grad_spikes, channels_last, gs_layout)
    gvT = dense_in(grad_v_T.to(torch.float32), channels_last, channel_dim=1) if grad_v_T is not None else None
    mpd_a = _float32_contiguous(mpd_a)
    mpd_b = _float32_contiguous(mpd_b)
    sgp_channel, sgp_element, sgp_stride_t = _surrogate_param_operands(surrogate_param, u_saved, channels_last)
    grad_x, grad_v0 = backward_buffers(u_saved, need_grad_v0=need_grad_v0)
    block_b, block_c = tile_shape(B, C, S)
    n_tiles = -(-B // block_b) * -(-C // block_c)
    _run_tiles(fn, fn_mt, (_ptr(grad_spikes), *gs_strides, u_saved.data_ptr(), _ptr(mpd_a), _ptr(mpd_b),
                    _ptr(sgp_channel), _ptr(sgp_element), sgp_stride_t, _ptr(gvT), grad_x.data_ptr(), _ptr(grad_v0), T, B, C, S, block_b, block_c,
                    params.inv_tau, params.v_th, params.v_rest, params.surrogate_param, params.surrogate_kind,
                    int(params.decay_input), int(params.hard_reset), int(params.detach_reset)),
               n_tiles, T * B * C * S, _scratch_floats(block_b, block_c, S))
    return grad_x, grad_v0


# ---------------------------------------------------------------- MPD-SGR's overlap


def takes_float32(*tensors: torch.Tensor | None) -> bool:
    """These small [T, C] tensors (None skipped) go through the C loops below (``overlap_forward``,
    ``overlap_backward``, ``mpd_terms``): float32 on the CPU, computed on rather than traced
    (``runtime.traced``), and the library is built."""
    present = [t for t in tensors if t is not None]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in present)
            and not _runtime.traced(*present) and available())


def overlap_forward(mean: torch.Tensor, var: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """Omega of float32 CPU statistics in one C loop (``mpd_overlap_fwd``): what ``mpd._Overlap``
    computes with a dozen torch operations, in the same order in float32 (erfc and exp written out in
    C so that the loop vectorizes: as accurate as torch's erfc, not bit for bit the same)."""
    mean, var = mean.contiguous(), var.contiguous()
    omega = torch.empty_like(mean)
    _library().mpd_overlap_fwd(mean.data_ptr(), var.data_ptr(), omega.data_ptr(), mean.numel(), gamma, eps)
    return omega


def overlap_backward(mean: torch.Tensor, var: torch.Tensor, grad: torch.Tensor, gamma: float, eps: float,
                     need_mean: bool = True, need_var: bool = True):
    """(dL/dmean or None, dL/dvar or None) of ``overlap_forward`` for dL/dOmega = grad (float32, Omega's
    shape; an expanded scalar, the gradient of a mean, is read in place)."""
    mean, var = mean.contiguous(), var.contiguous()
    grad = grad.to(torch.float32)
    if grad.numel() and all(s == 0 for s in grad.stride()):
        grad_stride = 0
    else:
        grad, grad_stride = grad.contiguous(), 1
    grad_mean = torch.empty_like(mean) if need_mean else None
    grad_var = torch.empty_like(var) if need_var else None
    _library().mpd_overlap_bwd(mean.data_ptr(), var.data_ptr(), grad.data_ptr(), grad_stride, _ptr(grad_mean),
                               _ptr(grad_var), mean.numel(), gamma, eps)
    return grad_mean, grad_var


def mpd_terms(mean: torch.Tensor, grad_mean: torch.Tensor | None, grad_var: torch.Tensor | None,
              count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), float32 like ``mean``, of MPD-SGR's term dL/du = a + b u in the backward, from the
    gradients of the statistics (either may be None), ``count`` elements per statistic: one C loop
    (``mpd_terms``) with the float32 operations of ``ops._mpd_terms`` in its order, so the same bits,
    instead of five torch operations."""
    mean = _float32_contiguous(mean)
    grad_mean, grad_var = _float32_contiguous(grad_mean), _float32_contiguous(grad_var)
    a, b = torch.empty_like(mean), torch.empty_like(mean)
    _library().mpd_terms(mean.data_ptr(), _ptr(grad_mean), _ptr(grad_var), a.data_ptr(), b.data_ptr(), mean.numel(),
                         count)
    return a, b
