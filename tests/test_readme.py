"""The README's Python examples run as written (on the CPU when there is no GPU)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if not torch.cuda.is_available():
        code = code.replace('device="cuda"', 'device="cpu"')
    exec(compile(code, f"README.md example {index}", "exec"), {})


def test_readme_has_examples():
    assert BLOCKS
