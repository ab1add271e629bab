"""The embedded demo end to end (fixed seed, looser bounds than the documented goals)."""
from __future__ import annotations

import json

import pytest

from instaprune.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--seed", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("baseline_top1", "dense_top1", "top1", "flops_reduction", "seconds"):
        assert key in m
    # Measured once (seed 0, busy machine): baseline 0.813, dense 0.741, top1 0.713 at a test reduction of 0.501,
    # p90/p10 1.27. The goals (drop <= 0.01 at >= 0.40, spread >= 1.3) are NOT met yet; these bounds check
    # that the pipeline works end to end and that the calibrated target transfers to the test split.
    assert 0.75 <= m["baseline_top1"] <= 0.95
    assert abs(m["flops_reduction"] - 0.5) <= 0.05
    assert m["top1"] >= 0.5 and m["dense_top1"] >= 0.5  # chance is 0.1
    assert m["per_image_flops_p90_over_p10"] > 1.0
    assert -1.0 <= m["spearman_difficulty_flops"] <= 1.0
    for f in ("report.md", "plan.json", "config.yaml", "cv_per_point.png", "keep_ratio_per_point.png",
              "flops_histogram.png", "accuracy_vs_flops.png", "keep_vs_confidence.png"):
        assert (out / f).is_file(), f
    printed = capsys.readouterr().out
    assert "flops_reduction" in printed
