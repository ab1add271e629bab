"""README's result tables are rendered from the committed results files, never typed by hand."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]


def _block(text: str, head: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(head)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[start:end]


def test_readme_gate_engine_table_matches_results():
    report = bench_module("engine_latency_report")
    rows = json.loads((ROOT / "results" / "engine_latency.json").read_text())["rows"]
    table = report.readme_gate_table(rows)
    assert len(table) > 2 + 30  # every gate row: 224x224 and CIFAR models, batches 1 and 32, 1 and 2 threads
    assert {(r.split("|")[2].strip(), r.split("|")[3].strip()) for r in table[2:]} >= {("1", "1"), ("32", "2")}
    assert _block((ROOT / "README.md").read_text(), report.README_GATE_HEAD) == table


def test_update_readme_rewrites_only_the_gate_table(tmp_path):
    report = bench_module("engine_latency_report")
    rows = json.loads((ROOT / "results" / "engine_latency.json").read_text())["rows"]
    table = report.readme_gate_table(rows)
    readme = tmp_path / "README.md"
    readme.write_text("\n".join(["# title", "", table[0], table[1], "| stale | row |", "", "after", ""]))
    assert report.update_readme(readme, rows)
    text = readme.read_text()
    assert _block(text, report.README_GATE_HEAD) == table
    assert text.startswith("# title\n\n") and text.endswith("\n\nafter\n")
    assert not report.update_readme(readme, rows)  # current: nothing written
    other = tmp_path / "OTHER.md"
    other.write_text("no table\n")
    assert not report.update_readme(other, rows) and other.read_text() == "no table\n"
