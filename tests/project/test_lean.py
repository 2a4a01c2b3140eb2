"""The installed library is lean: it imports and runs where triton is missing (macOS, Windows,
some CI images), and importing it pulls in none of the tools' dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_library_works_without_triton_and_refuses_its_backend_in_one_line():
    done = _run("""
        import sys
        sys.modules["triton"] = None  # import triton fails, as where it is not installed
        import torch
        from torch import nn
        import mpd_triton as mt
        from mpd_triton.kernels import runtime
        assert runtime.TRITON_MISSING and not mt.triton_interpreted()
        x = torch.randn(4, 2, 3, 5, 5)
        assert torch.equal(mt.lif(x), mt.lif(x, backend="torch"))  # auto: the C kernels (or the reference)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Unflatten(0, (4, 2)), mt.LIF())
        reg = mt.MPDSGR(model, eta=1.0)
        out = model(x.flatten(0, 1))
        (out.mean() + reg()).backward()  # a training step with MPD-SGR
        assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()
        try:
            mt.lif(x, backend="triton")
        except ValueError as e:
            print(e)
        """)
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert "\n" not in message
    assert message.startswith("backend='triton' is unavailable: triton is not installed here")
    assert "backend='auto' runs the C kernels on the CPU" in message


def test_import_pulls_in_no_tool_dependency():
    done = _run("""
        import sys
        import torch
        tools = ("matplotlib", "tqdm", "einops", "torchvision", "tensorboard")
        before = {m for m in tools if m in sys.modules}  # torch.hub, for one, imports tqdm where it is installed
        import mpd_triton
        print(",".join(m for m in tools if m in sys.modules and m not in before))
        """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_library_leaves_the_tools_files_and_the_allocator_to_the_tools():
    """Writing the tools' files (plumbing/files.py) and tuning the process's allocator (plumbing/memory.py)
    are the repository's, not the installed library's."""
    import importlib.util

    import mpd_triton.kernels.cpu as cpu

    assert importlib.util.find_spec("mpd_triton.files") is None
    assert not hasattr(cpu, "keep_freed_memory")
    from plumbing.files import write_json  # noqa: F401
    from plumbing.memory import keep_freed_memory  # noqa: F401
