"""Where the kernels run: the launch device, and whether Triton runs them in its interpreter.

``INTERPRETED`` is True when triton was imported with ``TRITON_INTERPRET=1`` (the kernels then
run on CPU tensors, slowly, which is how the tests run them without a GPU). Triton < 3.7's
interpreter does not work with NumPy >= 2.4: that is known at import and said once, here, in a
warning naming the fix (the interpreter's own error names neither cause nor fix).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
import triton

__all__ = ["device_guard", "INTERPRETED", "INTERPRETER_PROBLEM", "interpreter_numpy_problem"]


def device_guard(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()



def _is_interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(fn, InterpretedFunction)


def interpreter_numpy_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why this triton + numpy pair cannot run the kernels in the interpreter, or None.

    Triton < 3.7's interpreter turns a scalar kernel argument into an int with
    int(one-element array), which NumPy >= 2.4 rejects ("only 0-dimensional arrays
    can be converted to Python scalars"): every launch would fail with it.
    """

    def major_minor(v: str) -> tuple[int, int]:
        parts = v.split("+")[0].split(".")
        return int(parts[0]), int(parts[1])

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} does not work with numpy {numpy_version} "
                "(it needs numpy < 2.4; triton >= 3.7 works with any): pip install 'numpy<2.4'")
    return None


@triton.jit
def _probe():
    pass


INTERPRETED = _is_interpreted(_probe)
# Known at import; said once here, since the interpreter's own error names neither cause nor fix.
INTERPRETER_PROBLEM = interpreter_numpy_problem(triton.__version__, np.__version__) if INTERPRETED else None
if INTERPRETER_PROBLEM:
    warnings.warn(f"mpd_triton: {INTERPRETER_PROBLEM}", RuntimeWarning, stacklevel=2)
