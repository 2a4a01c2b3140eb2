"""The Python examples of the README and of the docs run as written, here in the checkout
(tests/project/test_installed.py runs the README's again with the installed wheel from a folder outside it)."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Pages whose Python blocks are fragments, not programs, and why; every other page's blocks run.
FRAGMENTS = {"docs/compile.md": "a recipe for a CUDA model and the user's own data loader"}
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
EXAMPLES = [(page.relative_to(REPO).as_posix(), i, code) for page in PAGES
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
            if page.relative_to(REPO).as_posix() not in FRAGMENTS]


@pytest.mark.slow
@pytest.mark.parametrize("page,index,code", EXAMPLES, ids=[f"{p}:{i}" for p, i, _ in EXAMPLES])
def test_example_runs(page, index, code):
    if "spikingjelly" in code:
        pytest.importorskip("spikingjelly", reason="the SpikingJelly example needs it (make test installs it)")
    exec(compile(code, f"{page} example {index}", "exec"), {})


def test_the_readme_and_the_docs_have_examples_and_every_fragment_is_named():
    pages = {p for p, _, _ in EXAMPLES}
    assert {"README.md", "docs/spikingjelly.md", "docs/evaluation.md"} <= pages
    for page in FRAGMENTS:
        assert "```python" in (REPO / page).read_text(), f"{page} has no Python block: drop it from FRAGMENTS"
