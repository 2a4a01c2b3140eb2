"""Test set-up: run the real Triton kernels on the CPU when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported; torch does not
import triton, so checking for CUDA here is early enough.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


def interpreter_numpy_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why this triton + numpy pair cannot run the interpreter tests, or None.

    Triton < 3.7's interpreter turns a scalar kernel argument into an int with
    int(one-element array), which NumPy >= 2.4 rejects ("only 0-dimensional arrays
    can be converted to Python scalars"): every kernel test would fail with it.
    """

    def major_minor(v: str) -> tuple[int, int]:
        parts = v.split("+")[0].split(".")
        return int(parts[0]), int(parts[1])

    if major_minor(triton_version) < (3, 7) and major_minor(numpy_version) >= (2, 4):
        return (f"the Triton interpreter of triton {triton_version} does not work with numpy {numpy_version} "
                "(it needs numpy < 2.4; triton >= 3.7 works with any): pip install 'numpy<2.4'")
    return None


if os.environ.get("TRITON_INTERPRET") == "1":
    import numpy
    import triton

    _problem = interpreter_numpy_problem(triton.__version__, numpy.__version__)
    if _problem:
        pytest.exit(_problem, returncode=4)

# "ci" (default): reproducible examples, sized for the interpreter on a 2-core CPU.
# "dev": more, random examples: HYPOTHESIS_PROFILE=dev make test
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
