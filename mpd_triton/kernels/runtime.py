"""Where the kernels run: the launch device, whether Triton is there at all, and whether it runs
the kernels in its interpreter.

``TRITON_MISSING`` is None where triton imports, else the one line that says why the Triton
backend cannot run (triton is installed on Linux only: macOS, Windows and some CI images lack it);
the rest of the library (the C kernels, the PyTorch reference, MPD-SGR) needs no triton.

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

try:
    import triton
except ImportError as _error:  # the C and PyTorch backends work without it
    triton = None
    TRITON_MISSING = (f"triton is not installed here ({_error}); it installs on Linux with 'pip install triton' "
                      "(and comes with torch's CUDA wheels)")
else:
    TRITON_MISSING = None

__all__ = ["device_guard", "traced", "INTERPRETED", "INTERPRETER_PROBLEM", "interpreter_numpy_problem",
           "TRITON_MISSING", "jit"]


def device_guard(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()



_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def traced(*tensors) -> bool:
    """True when these tensors are traced rather than computed on: under torch.compile, under a
    Python dispatch mode (``make_fx``, ``FakeTensorMode``, functionalization), or as tensor
    subclasses or functorch wrappers (a FakeTensor, vmap's batched tensors). The launchers hand raw
    data pointers to the kernels, which such tensors do not have (a FakeTensor's is 0) and a tracer
    would not record: there the custom operators (with their fake implementations) or plain torch
    operations run instead. None entries are skipped."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(t is not None and (type(t) not in _PLAIN_TENSORS or _functorch_wrapped(t)) for t in tensors)


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


def jit(fn):
    """``triton.jit``, or the function left as it is where triton is missing (its kernels then never run:
    the launchers refuse first, with TRITON_MISSING)."""
    return triton.jit(fn) if triton is not None else fn


@jit
def _probe():
    pass


INTERPRETED = triton is not None and _is_interpreted(_probe)
# Known at import; said once here, since the interpreter's own error names neither cause nor fix.
INTERPRETER_PROBLEM = interpreter_numpy_problem(triton.__version__, np.__version__) if INTERPRETED else None
if INTERPRETER_PROBLEM:
    warnings.warn(f"mpd_triton: {INTERPRETER_PROBLEM}", RuntimeWarning, stacklevel=2)
