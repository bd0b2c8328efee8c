"""The repository explains itself: no pointer leaves it, and every relative Markdown link resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["README.md", "BENCHMARKS.md", "Makefile", "pyproject.toml", "docs", "pipeline", "jobs", "tests", "cluster"]
OUTSIDE = [re.compile(r"\.\./shared"), re.compile("DESIGN" + r"(\.md)?\s*§"), re.compile("DESIGN" + r"\.md")]


def _files():
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from (p for p in path.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".yml", ".toml"))


def test_no_pointer_leaves_the_repository():
    hits = []
    for path in _files():
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if any(rx.search(line) for rx in OUTSIDE):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:90]}")
    assert not hits, "pointers outside the repository (use docs/method.md §…):\n" + "\n".join(hits)


def test_markdown_links_resolve_inside_the_repository():
    bad = []
    for md in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")]:
        if not md.is_file():
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text(encoding="utf-8")):
            if target.startswith(("#", "http://", "https://", "mailto:")):
                continue
            resolved = (md.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                bad.append(f"{md.relative_to(ROOT)} → {target}")
    assert not bad, "broken or outside links:\n" + "\n".join(bad)


def test_method_doc_covers_what_the_code_points_to():
    method = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\d+)\. ", method, flags=re.MULTILINE))
    cited = set()
    for path in _files():
        cited.update(re.findall(r"docs/method\.md §(\d+)", path.read_text(encoding="utf-8", errors="replace")))
    assert cited and cited <= sections, f"docs/method.md has no sections {sorted(cited - sections)}"
