"""The embedded demo end to end (fixed seed, looser bounds than the documented goals)."""
from __future__ import annotations

import json

import pytest

from instaprune.cli.main import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--seed", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("baseline_top1", "dense_top1", "top1", "flops_reduction", "seconds"):
        assert key in m
    # Measured (seed 0, 2 threads, quiet): baseline 0.902, dense 0.867, top1 0.856 at a test reduction of 0.419,
    # p90/p10 1.26, Spearman(difficulty, FLOPs) +0.49, 140 s. Results vary by a few points with the thread count
    # (1 thread: drop 0.029, p90/p10 1.30). The accuracy goal (drop <= 0.01 at >= 0.40) is NOT met; these
    # bounds check the pipeline end to end: the calibrated target transfers to the test split, the drop stays
    # within what was measured, and per-image FLOPs vary with the image.
    assert 0.80 <= m["baseline_top1"] <= 0.95
    assert abs(m["flops_reduction"] - 0.42) <= 0.03
    assert m["baseline_top1"] - m["top1"] <= 0.07
    assert m["per_image_flops_p90_over_p10"] > 1.15
    assert m["spearman_difficulty_flops"] > 0.1  # harder images keep more channels
    assert -1.0 <= m["spearman_difficulty_flops"] <= 1.0
    for f in ("report.md", "plan.json", "config.yaml", "cv_per_point.png", "keep_ratio_per_point.png",
              "flops_histogram.png", "accuracy_vs_flops.png", "keep_vs_confidence.png"):
        assert (out / f).is_file(), f
    printed = capsys.readouterr().out
    assert "flops_reduction" in printed
