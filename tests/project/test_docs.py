"""The documents hold together: every relative link of README.md and docs/ resolves, and the license and
citation files say what pyproject.toml and the package say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import mpd_triton

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "tests" / "README.md"]
# The raw result files of the study (the .md that train.eval and train.sweep wrote beside their .json) name
# plots that were not kept (docs/study/data/README.md says so): they are data, not documents. So are the
# report.md files that train.run wrote beside the study's models.
DATA = (REPO / "docs" / "study" / "data", REPO / "docs" / "study" / "models")
DOCUMENTS = [d for d in DOCUMENTS if d.is_file() and not (any(f in d.parents for f in DATA) and d.name != "README.md")]
# [text](target) and ![alt](target), not inside code spans; the target up to a space or ')'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # code blocks are not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(document):
    broken = []
    for target in _links(document):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # a URL, or an anchor here
            continue
        path = target.split("#", 1)[0]
        if not (document.parent / path).exists():
            broken.append(target)
    assert not broken, f"{document.relative_to(REPO)}: links to nothing: {', '.join(broken)}"


def _github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, each space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _mkdocs_slug(heading: str) -> str:
    """The docs site's (Python-Markdown's toc): the same, with runs of spaces and '-' made one '-'."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())


def _anchors(path: Path, slug) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M):
        s = slug(heading)
        anchors.add(s if s not in seen else f"{s}-{seen[s]}")  # a repeated heading gets -1, -2, ...
        seen[s] = seen.get(s, 0) + 1
    return anchors


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_to_a_heading_find_it_on_github_and_on_the_site(document):
    broken = []
    for target in _links(document):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or "#" not in target:
            continue
        path, anchor = target.split("#", 1)
        page = document if not path else document.parent / path
        if page.suffix != ".md" or not page.is_file():
            continue
        if anchor not in _anchors(page, _github_slug) or anchor not in _anchors(page, _mkdocs_slug):
            broken.append(target)
    assert not broken, f"{document.relative_to(REPO)}: links to no heading: {', '.join(broken)}"


def test_license_and_citation_match_the_package():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'license = "MIT"' in pyproject
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "mpd-triton" in license_text
    citation = (REPO / "CITATION.cff").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert version == mpd_triton.__version__
    assert re.search(rf"^version: {re.escape(version)}$", citation, re.M)
    assert re.search(r"^license: MIT$", citation, re.M) and "arXiv:2511.12199" in citation


def test_the_site_and_its_api_reference_build_without_a_warning(tmp_path):
    """mkdocs.yml: the docs and the API reference generated from the docstrings (mkdocstrings); --strict
    turns every warning (a docstring griffe cannot read, a page missing from the site) into a failure."""
    pytest.importorskip("mkdocs", reason="the site needs the [docs] extra (make test installs it)")
    pytest.importorskip("mkdocstrings", reason="the API reference needs the [docs] extra (make test installs it)")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("mpd_triton.lif", "mpd_triton.MPDSGR", "mpd_triton.MPDOptions", "mpd_triton.attacks.evaluate",
                 "mpd_triton.models.load", "mpd_triton.attacks.methods.assg"):
        assert name in api, name
