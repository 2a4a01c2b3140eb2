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

if os.environ.get("TRITON_INTERPRET") == "1":
    from mpd_triton.kernels.runtime import INTERPRETER_PROBLEM

    if INTERPRETER_PROBLEM:  # every kernel test would fail with the interpreter's cryptic error
        pytest.exit(INTERPRETER_PROBLEM, returncode=4)

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


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the CI machine's 2 cores are shared with other work, and
    the small tensors of these tests run faster on one thread (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch as _torch

    before = _torch.get_num_threads()
    _torch.set_num_threads(1)
    yield
    _torch.set_num_threads(before)
