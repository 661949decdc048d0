"""The method description lives in the repository (docs/method.md), and citations of it resolve.

Pure text checks over the git working tree: no file names the old out-of-repo method file, and
every "docs/method.md section N" (also "sections N and M", "sections N-M", across a line break
or a comment's "#") names a section that is a "## N. ..." heading of docs/method.md.
"""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = "docs/method.md"
OLD_NAME = "SPRM" + ".md"  # split so that this file does not name it itself
HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)
GAP = r"(?:\s|#)+"  # whitespace, or a line break into the next comment line
SEP = r"(?:\s|#)*(?:-|–|,|and|to)(?:\s|#)*"  # between two section numbers
CITATION = re.compile(r"docs/method\.md" + GAP + r"sections?" + GAP + rf"(\d+(?:{SEP}\d+)*)")


def repo_files() -> list[str]:
    """Tracked files, plus untracked ones that git does not ignore (files about to be added)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names = sorted({n for n in out.decode().split("\0") if n})
    return [n for n in names if os.path.isfile(os.path.join(ROOT, n))]


def read_text(name: str) -> str | None:
    with open(os.path.join(ROOT, name), "rb") as f:
        data = f.read()
    if b"\0" in data:  # binary (images)
        return None
    return data.decode("utf-8", errors="replace")


def doc_sections() -> set[int]:
    with open(os.path.join(ROOT, DOC), encoding="utf-8") as f:
        return {int(n) for n in HEADING.findall(f.read())}


def cited_sections(spec: str) -> list[int]:
    """'3' -> [3]; '2 and 5' -> [2, 5]; '3-4' -> [3, 4] (a comment's '#' counts as space)."""
    out: list[int] = []
    for part in re.split(r"\s*(?:,|and)\s*", spec.replace("#", " ").strip()):
        ends = [int(x) for x in re.split(r"\s*(?:-|–|to)\s*", part.strip())]
        out.extend(range(ends[0], ends[-1] + 1) if len(ends) == 2 else ends)
    return out


def test_doc_sections_are_numbered_in_order():
    with open(os.path.join(ROOT, DOC), encoding="utf-8") as f:
        numbers = [int(n) for n in HEADING.findall(f.read())]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    assert len(numbers) >= 8


def test_no_file_names_the_old_method_file():
    hits = []
    for name in repo_files():
        text = read_text(name)
        if text is None:
            continue
        hits += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if OLD_NAME in line]
    assert not hits, f"cite {DOC} instead of {OLD_NAME}: {hits}"


def test_citations_name_existing_sections():
    sections = doc_sections()
    found, bad = 0, []
    for name in repo_files():
        text = read_text(name)
        if text is None:
            continue
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            for n in cited_sections(m.group(1)):
                found += 1
                if n not in sections:
                    bad.append(f"{name}:{line}: section {n}")
    assert not bad, f"{DOC} has sections {sorted(sections)}; citations of others: {bad}"
    assert found >= 20, f"only {found} citations of {DOC} found: is the pattern still right?"


@pytest.mark.parametrize(
    "spec, expected",
    [("3", [3]), ("2 and 5", [2, 5]), ("3-4", [3, 4]), ("1, 2 and 6", [1, 2, 6])],
)
def test_cited_sections_parses_lists_and_ranges(spec, expected):
    assert cited_sections(spec) == expected


def test_citation_pattern_spans_line_breaks():
    text = "see docs/method.md\n    # sections 3 and\n    # 4 for it"
    (spec,) = [m.group(1) for m in CITATION.finditer(text)]
    assert cited_sections(spec) == [3, 4]
