"""The documentation's numbers come from the committed result files (scripts/render_tables.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import render_tables  # noqa: E402


def test_readme_headline_table_is_the_study_summary() -> None:
    """README's headline table is what summary.json says (and every docs table still renders)."""
    assert render_tables.main(["--check"]) == 0
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(render_tables.HEADLINE_START, 1)[1].split(render_tables.HEADLINE_END, 1)[0]
    assert block.strip() == render_tables.headline(render_tables._study()).strip()
    assert "<!-- branch-results -->" in readme  # the spot kept for the branch-nodes rows


def test_stale_readme_table_is_caught(tmp_path: Path, monkeypatch) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stale = readme.replace("88.47 ± 0.28", "88.99 ± 0.28", 1)
    assert stale != readme
    fake = tmp_path / "README.md"
    fake.write_text(stale, encoding="utf-8")
    monkeypatch.setattr(render_tables, "ROOT", tmp_path)
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    for name in ("bench", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    assert render_tables.main(["--check"]) == 1


def test_pages_include_only_rendered_tables_and_figures() -> None:
    pages = sorted((ROOT / "docs").rglob("*.md"))
    snippets = {
        m for p in pages for m in re.findall(r'--8<-- "docs/_generated/([^"]+)"', p.read_text(encoding="utf-8"))
    }
    figures = {m for p in pages for m in re.findall(r"_generated/img/([\w.-]+\.png)", p.read_text(encoding="utf-8"))}
    assert snippets and snippets <= set(render_tables.SNIPPETS), snippets - set(render_tables.SNIPPETS)
    assert figures and figures <= set(render_tables.FIGURES), figures - set(render_tables.FIGURES)
    for src in render_tables.FIGURES.values():
        assert (ROOT / src).is_file(), src
