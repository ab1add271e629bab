"""The package cites docs/method.md by section: every cited section exists, and nothing in the package refers to
files outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "method.md"
SRC = ROOT / "src" / "instaprune"

#: "docs/method.md section 7", "docs/method.md, sections 2 and 4", "(docs/method.md section 9-10)", "section 6.1"
CITE = re.compile(r"docs/method\.md,?\s+sections?\s+((?:\d+(?:\.\d+)?)(?:(?:\s*(?:,|and|-)\s*)\d+(?:\.\d+)?)*)")


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "egg-info" not in p.parts)


def _sections() -> set[str]:
    heads = re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", DOC.read_text(), flags=re.M)
    return set(heads)


def _cited() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in _sources():
        text = " ".join(p.read_text().split())  # citations may wrap across lines
        for m in CITE.finditer(text):
            spec = m.group(1)
            nums = re.findall(r"\d+(?:\.\d+)?", spec)
            if "-" in spec and len(nums) == 2 and "." not in spec:  # a range "9-10"
                nums = [str(i) for i in range(int(nums[0]), int(nums[1]) + 1)]
            for n in nums:
                out.setdefault(n, []).append(str(p.relative_to(ROOT)))
    return out


def test_method_doc_has_numbered_sections():
    secs = _sections()
    assert {str(i) for i in range(1, 11)} <= secs, sorted(secs)


def test_every_cited_section_exists():
    cited = _cited()
    assert cited, "the package cites docs/method.md nowhere"
    missing = {n: files for n, files in cited.items() if n not in _sections()}
    assert not missing, f"cited sections missing from docs/method.md: {missing}"


def test_citation_pattern_reads_ranges_and_lists():
    text = "see docs/method.md, sections 2, 4 and 7 and (docs/method.md section 9-10) and docs/method.md section 6.1"
    found = [m.group(1) for m in CITE.finditer(text)]
    assert found == ["2, 4 and 7", "9-10", "6.1"]


def test_package_refers_to_no_file_outside_the_repository():
    bad = []
    for p in _sources():
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "METHOD.md" in line or "../shared" in line or "/work/" in line:
                bad.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
