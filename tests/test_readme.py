"""The README is written for artists first: what the pack does (with a picture), how to install it, the first
workflow, troubleshooting; the developer commands come after. Its tables render and its links resolve."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "example_workflows" / "README.md"]


def headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("## ")]


def tables(text: str) -> list[list[str]]:
    """Each Markdown table as its lines (a table is a run of lines starting with '|')."""
    out, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(current)
            current = []
    return out


def cells(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


def test_artists_first_then_developers():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    order = headings(text)
    for first, later in [("Install", "Your first restoration"), ("Your first restoration", "Troubleshooting"),
                         ("Troubleshooting", "For developers")]:
        assert first in order, order
        assert later in order, order
        assert order.index(first) < order.index(later), order
    developers = text.index("## For developers")
    assert "make demo" not in text[:developers]
    assert "make test" not in text[:developers]
    for route in ("ComfyUI-Manager", "comfy node install comfyui-flowdps", "git clone"):
        assert route in text[:developers], route
    for trouble in ("Out of memory", "Wrong colours", "Slow"):
        assert f"**{trouble}" in text, trouble
    # the picture near the top is one the repository holds
    picture = re.search(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert picture
    assert text.index(picture.group(0)) < text.index("## Install")
    assert (ROOT / unquote(picture.group(1))).is_file()


def test_the_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", READMES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_tables_render(path):
    """Every row has the header's number of cells and the second line is the separator (a blank line or a
    stray row breaks a table on GitHub)."""
    found = tables(path.read_text(encoding="utf-8"))
    assert found
    for table in found:
        assert len(table) >= 3, table
        assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", table[1]), table[:2]
        width = cells(table[0])
        assert all(cells(row) == width for row in table), table[0]


@pytest.mark.parametrize("path", READMES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_local_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+(?:\([^)]*\)[^)\s]*)*)\)", text)
    local = [unquote(link.split("#")[0]) for link in links if "://" not in link and not link.startswith("#")]
    assert local
    missing = [link for link in local if not (path.parent / link).exists()]
    assert not missing, missing
