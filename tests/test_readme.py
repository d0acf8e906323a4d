"""README and ARCHITECTURE against the repository: the versions they state are the ones pyproject.toml declares,
every file they name is in the checkout, and no path points outside it (issue 28, item 7: the README said
torch >= 2.4 while pyproject declared 2.7, and sent readers to ../shared/gpu/README.md)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "ARCHITECTURE.md")
# Files the README names as what a command writes, not yet written in this checkout.
WRITTEN_LATER = {"scripts/results/gpu.md"}


def _minimums() -> dict[str, str]:
    """package -> the minimum version pyproject.toml declares ("python" from requires-python)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = {"python": re.fullmatch(r">=\s*([0-9.]+)", project["requires-python"].strip()).group(1)}
    for requirement in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+).*", requirement)
        if m:
            found[m.group(1).lower()] = m.group(2)
    return found


def test_the_readme_states_the_declared_minimum_versions():
    readme, minimum = (REPO / "README.md").read_text(), _minimums()
    for package in ("torch", "python"):
        stated = re.findall(rf"\b{package}\s*(?:>=|≥)\s*([0-9][0-9.]*[0-9])", readme, flags=re.IGNORECASE)
        assert stated, f"the README states no minimum {package}"
        assert set(stated) == {minimum[package]}, (package, stated, minimum[package])
    oldest = re.search(r"oldest \(`([^`]*)`\)", readme)  # the version matrix's oldest configuration
    assert oldest, "the version table has no oldest row"
    for package, version in re.findall(r"([A-Za-z0-9_-]+)==([0-9.]+)", oldest.group(1)):
        assert version == minimum[package.lower()], (package, version, minimum[package.lower()])


def _named_paths(text: str) -> set[str]:
    """Repository paths a document names: in backticks (scripts/, tests/, ...) and as link targets."""
    quoted = re.findall(r"`((?:scripts|tests|engines|export|hgdeploy)/[A-Za-z0-9_./*-]+)`", text)
    linked = [t for t in re.findall(r"\]\(([^)#\s]+)\)", text) if not re.match(r"[a-z]+://", t)]
    return set(quoted) | set(linked)


def test_every_file_the_docs_name_is_in_the_checkout_and_none_lies_outside_it():
    for doc in DOCS:
        text = (REPO / doc).read_text()
        outside = re.findall(r"(?<![\w.])\.\./[\w./-]+|(?<![\w.])/(?:work|home|Users|root)/[\w./-]+", text)
        assert not outside, (doc, outside)
        named = _named_paths(text)
        assert named, doc
        missing = sorted(p for p in named - WRITTEN_LATER
                         if not (any(REPO.glob(p)) if "*" in p else (REPO / p).exists()))
        assert not missing, (doc, missing)
