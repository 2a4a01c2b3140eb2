"""The process's allocator, tuned for the tools' steady-state work (train.run, train.eval, the benchmarks):
not the library's business (a library does not change its user's allocator)."""

from __future__ import annotations

import ctypes

__all__ = ["keep_freed_memory"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the OS (Linux only).

    By default glibc serves a multi-megabyte allocation with a fresh mmap, or trims the heap
    when a large block is freed; either way the next tensor of that size faults its pages in
    again, one 4 KiB page at a time, which on this project's machines costs more than the LIF
    kernels themselves (a [4, 64, 16, 28, 28] float32 forward: 2 ms with reused pages, up to
    17 ms with fresh ones). Raising the trim and mmap thresholds to 1 GiB makes repeated
    allocations reuse pages. The process's memory then does not shrink after a peak. Called
    by train.run, train.eval and the benchmarks at start-up; a library does not change its
    user's allocator on its own. Returns True if the allocator took the settings.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
