"""The README and docs/*.md: every relative link and image resolves to a file, and the README stays short."""

from __future__ import annotations

import re
from pathlib import Path

MAX_README_LINES = 300

# [text](target) and ![alt](target), with an optional "title"; the target may be wrapped in <...>.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
# [label]: target (a reference definition, at the start of a line).
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
INLINE_CODE = re.compile(r"(`+).*?\1")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, ftp:, //host


def repo_root() -> Path:
    """The directory holding README.md and pyproject.toml, wherever under tests/ this file lives."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "README.md").is_file() and (parent / "pyproject.toml").is_file():
            return parent
    raise AssertionError(f"no README.md with a pyproject.toml above {__file__}")


def markdown_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code blocks and code spans."""
    found = []
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        text = INLINE_CODE.sub("", line)
        found += [(number, m.group(1)) for m in INLINE_LINK.finditer(text)]
        definition = REFERENCE_DEF.match(text)
        if definition:
            found.append((number, definition.group(1)))
    return found


def broken_links(root: Path) -> list[str]:
    broken = []
    for path in markdown_files(root):
        for number, target in links(path):
            if not target or target.startswith("#") or EXTERNAL.match(target):
                continue
            local = target.split("#", 1)[0].split("?", 1)[0]
            resolved = (root / local.lstrip("/")) if local.startswith("/") else (path.parent / local)
            if not resolved.exists():
                broken.append(f"{path.relative_to(root)}:{number}: link {target!r} -> {local} does not exist")
    return broken


def test_relative_links_resolve():
    root = repo_root()
    assert (root / "docs").is_dir(), "docs/ is missing"
    broken = broken_links(root)
    assert not broken, "broken links in the docs:\n" + "\n".join(broken)


def test_readme_is_short():
    readme = repo_root() / "README.md"
    lines = len(readme.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md: {lines} lines, at most {MAX_README_LINES}: move the detail into a docs/ page"
    )


def test_the_checker_finds_a_broken_link(tmp_path):
    """The checker itself: a bad link and a bad image are reported with file and line; the rest pass."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "real.md").write_text("# real\n")
    (tmp_path / "docs" / "real.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "[ok](docs/real.md#a-section) ![ok](docs/real.png) [web](https://example.org) [top](#top)\n"
        "[mail](mailto:a@example.org)\n"
        "```\n[in a code block](nowhere.md)\n```\n"
        "`[in a code span](nowhere.md)`\n"
        "[bad](docs/missing.md#x)\n"
        "![bad image](docs/missing.png)\n"
    )
    (tmp_path / "docs" / "page.md").write_text("[up](../README.md) [bad](other.md)\n")
    assert broken_links(tmp_path) == [
        "README.md:7: link 'docs/missing.md#x' -> docs/missing.md does not exist",
        "README.md:8: link 'docs/missing.png' -> docs/missing.png does not exist",
        "docs/page.md:1: link 'other.md' -> other.md does not exist",
    ]
