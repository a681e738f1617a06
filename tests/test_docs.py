"""The README and the pages under docs/: links resolve, measured tables are current.

The README is a landing page (at most ``README_MAX_LINES`` lines); everything else lives
under docs/. Measured figures appear there only as tables that
``ragdec.bench.results_table`` generates from the committed ``bench/results/*.json``,
between ``<!-- results:NAME -->`` markers: a table that differs from what the results
say now fails here (``python -m ragdec.bench.results_table --write`` refreshes them).
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from ragdec.bench import results_table

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def _prose(text: str) -> str:
    """``text`` without code blocks and code spans, where brackets are not links."""
    return _CODE.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Every link target in a markdown text, outside code.

    >>> links("see [a](docs/a.md#b), ![x](x.png) and `[c](not/a/link)`\\n[r]: ref.md")
    ['docs/a.md#b', 'x.png', 'ref.md']
    """
    prose = _prose(text)
    return [m.group(1) for m in _LINK.finditer(prose)] + [m.group(1) for m in _REFERENCE.finditer(prose)]


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a markdown text's headings.

    >>> sorted(anchors("# Why int4 is the default, and the 1.5B\\n## Answering (`--engine openai`)\\n## A\\n## A"))
    ['a', 'a-1', 'answering---engine-openai', 'why-int4-is-the-default-and-the-15b']
    """
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(page: Path) -> list[str]:
    """``target: why`` for each relative link of ``page`` that does not resolve."""
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(broken_links(page))


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the detail into a page"
        " under docs/ and link to it"
    )
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make test" in text and "make demo" in text  # CI runs `make test` (.ci/run)
    assert [name for name, _ in results_table.blocks(text)] == ["headline"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_results_tables_are_current(page):
    stale = [
        name
        for name, body in results_table.blocks(page.read_text(encoding="utf-8"))
        if body != results_table.render(name)
    ]
    assert not stale, (
        f"{page.relative_to(ROOT)}: the results tables {stale} differ from bench/results/;"
        " run: python -m ragdec.bench.results_table --write"
    )


def test_every_results_table_is_shown_somewhere():
    shown = {name for page in PAGES for name, _ in results_table.blocks(page.read_text(encoding="utf-8"))}
    assert shown == set(results_table.TABLES)


def test_a_stale_table_and_a_broken_link_are_caught(tmp_path):
    """The checks above can fail: an edited figure and a link to nothing."""
    current = results_table.render("headline")
    stale = current.replace("2.62x", "9.99x")
    assert stale != current
    text = f"<!-- results:headline -->\n{stale}<!-- /results:headline -->\n"
    assert [body == results_table.render(name) for name, body in results_table.blocks(text)] == [False]
    assert results_table.rewrite(text) == f"<!-- results:headline -->\n{current}<!-- /results:headline -->\n"
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [gone](missing.md) [bad anchor](#nowhere) `[code](x.md)`\n")
    assert broken_links(page) == [
        "missing.md: no file " + str(tmp_path / "missing.md"),
        "#nowhere: no heading with anchor #nowhere in page.md",
    ]


def test_docstring_examples():
    import doctest
    import sys

    assert doctest.testmod(sys.modules[__name__]).failed == 0
