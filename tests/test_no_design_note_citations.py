"""The repository cites only what it contains: no code, tooltip, NODES.md or README line points a reader at the
development set-up's design notes (they are not shipped, so every such reference is a dead end for a user)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"\b(?:afdps|flowdps|comfyui|style|ecosystem)\.md\b|\.\./shared\b|shared/(?:docs|reference)\b",
                      re.IGNORECASE)
SKIP = {Path(__file__).resolve().relative_to(ROOT).as_posix(), ".ci/run"}  # the CI entry point runs in that set-up
TEXT = {".py", ".md", ".mjs", ".js", ".json", ".toml", ".txt", ".yml", ".yaml", ".cfg", ".sh", ""}


def shipped_files() -> list[Path]:
    """Tracked and new (not ignored) files, as git sees them."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [ROOT / p for p in out.split("\0") if p and p not in SKIP and (ROOT / p).is_file()
            and (ROOT / p).suffix in TEXT]


def citations(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if CITATION.search(line)]


def test_the_pattern_catches_the_ways_the_notes_were_cited():
    for line in ["(afdps.md §2.5)", "see flowdps.md", "style.md §3.3.6", "`../shared/docs`", "ecosystem.md §4.1",
                 "docs/afdps.md", "shared/docs/comfyui.md"]:
        assert citations(line), line
    assert not citations("the FlowDPS paper (arXiv 2503.08136), NODES.md, README.md, docs/workflow_superres.png")


def test_no_file_cites_the_design_notes():
    files = shipped_files()
    assert any(p.name == "README.md" for p in files)
    assert any(p.name == "NODES.md" for p in files)
    found = {p.relative_to(ROOT).as_posix(): hits for p in files
             if (hits := citations(p.read_text(encoding="utf-8", errors="replace")))}
    assert not found, found
