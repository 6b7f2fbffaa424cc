"""Every citation of the project's docs resolves: ``docs/<file>.md §N`` names a file and a numbered heading that
exist, no ``§`` stands without its file (outside the docs themselves), and every relative Markdown link points
to an existing file and heading."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh", ""}
SECTION = r"\d+(?:\.\d+)*"
# "docs/numerics.md §3", "docs/numerics.md §3–4", "docs/x.md §3-§4", "docs/x.md §2, §5" or a bare "docs/x.md".
DOC_CITATION = re.compile(
    rf"(docs/[\w.-]+\.md)((?:\s*§\s*{SECTION}(?:\s*[–-]\s*§?\s*{SECTION})?(?:\s*,\s*§\s*{SECTION})*)?)")
BARE_SECTION = re.compile(rf"§\s*({SECTION})(?:\s*[–-]\s*§?\s*({SECTION}))?")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$", re.MULTILINE)
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


# The team's notes beside the checkout (the reference file and the shared folder) are not part of bitlaw: no file
# may cite them. Spelled in parts so that this guard is not itself such a citation.
OUTSIDE_THE_PROJECT = ("REFERENCE" + ".md", ".." + "/shared")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    files = [ROOT / name for name in names]
    return [f for f in files if f.is_file() and f.suffix in TEXT_SUFFIXES and f.name != Path(__file__).name]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(doc: Path) -> tuple[set[str], set[str]]:
    """(section numbers such as "3" or "3.1", anchors) of a Markdown file."""
    numbers, anchors = set(), set()
    for _, text in HEADING.findall(doc.read_text(encoding="utf-8")):
        anchors.add(slug(text))
        match = re.match(rf"({SECTION})\.?\s", text)
        if match:
            numbers.add(match.group(1))
    return numbers, anchors


def cited_sections(tail: str) -> list[str]:
    found = []
    for first, last in BARE_SECTION.findall(tail):
        found.append(first)
        if last:
            found.append(last)
    return found


def test_docs_exist_with_numbered_sections():
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert {d.name for d in docs} >= {"README.md", "numerics.md", "training.md", "scaling-laws.md"}
    for doc in docs:
        if doc.name != "README.md":
            assert "1" in headings(doc)[0], f"{doc} has no numbered sections"


def test_every_doc_citation_and_section_sign_resolves():
    problems = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT)
        covered: list[tuple[int, int]] = []
        for match in DOC_CITATION.finditer(text):
            doc = ROOT / match.group(1)
            covered.append(match.span())
            if not doc.is_file():
                problems.append(f"{rel}: cites {match.group(1)}, which does not exist")
                continue
            numbers = headings(doc)[0]
            for section in cited_sections(match.group(2)):
                if section not in numbers:
                    problems.append(f"{rel}: cites {match.group(1)} §{section}, which has no such heading")
        in_docs = rel.parts[0] == "docs"
        own = headings(path)[0] if in_docs and path.suffix == ".md" else set()
        for match in BARE_SECTION.finditer(text):
            if any(start <= match.start() < end for start, end in covered):
                continue
            if not in_docs:
                problems.append(f"{rel}: '{match.group(0)}' does not say which file it cites (write docs/<file>.md §N)")
                continue
            for section in (s for s in match.groups() if s):
                if section not in own:
                    problems.append(f"{rel}: §{section} is not a numbered heading of this file")
        cited = [name for name in OUTSIDE_THE_PROJECT if name in text]
        assert not cited, f"{rel} cites {cited}, which users do not have: explain it in docs/ instead"
    assert not problems, "\n".join(problems)


def test_relative_markdown_links_resolve():
    problems = []
    for path in tracked_text_files():
        if path.suffix != ".md":
            continue
        for target in MD_LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: checked by people, not offline tests
            file_part, _, anchor = target.partition("#")
            doc = (path.parent / file_part).resolve() if file_part else path
            if not doc.exists():
                problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such file")
            elif anchor and doc.suffix == ".md" and anchor not in headings(doc)[1]:
                problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such heading")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text, expected", [("docs/numerics.md §3–4", ["3", "4"]), ("docs/a.md §2, §5", ["2", "5"]),
                                            ("docs/a.md §3-§4", ["3", "4"]), ("docs/a.md §6.1", ["6.1"])])
def test_citation_parser(text, expected):
    match = DOC_CITATION.search(text)
    assert match and cited_sections(match.group(2)) == expected
