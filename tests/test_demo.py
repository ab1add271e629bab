"""The embedded demo end to end (fixed seed, looser bounds than the documented goals)."""
from __future__ import annotations

import json

import pytest

from instaprune.cli.main import main


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gates", "posthoc"])
def test_demo_end_to_end(tmp_path, capsys, method):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), "--seed", "0", "--method", method]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("baseline_top1", "dense_top1", "top1", "flops_reduction", "seconds"):
        assert key in m
    assert m["method"] == method
    assert 0.80 <= m["baseline_top1"] <= 0.95
    assert abs(m["flops_reduction"] - 0.42) <= 0.03
    files = ["report.md", "plan.json", "config.yaml", "keep_ratio_per_point.png", "flops_histogram.png",
             "accuracy_vs_flops.png", "keep_vs_confidence.png", "difficulty_vs_flops.png"]
    if method == "gates":
        # The demo's goal: top-1 within 1 point of the baseline branch at >= 40% FLOPs reduction. Measured
        # (results/demo_variants, gates_static75_thr_lr01 = the default: three quarters static, threshold gates,
        # lr 0.1): drop 0.80 (seed 0, 2 threads, as here), 0.96 (seed 0, 1 thread), 0.86 (seed 1) at 0.418-0.421,
        # p90/p10 1.07-1.12; the trajectory depends on the thread count and the CPU's floating-point order.
        assert m["baseline_top1"] - m["top1"] <= 0.01
        assert m["flops_reduction"] >= 0.40
        assert m["per_image_flops_p90_over_p10"] > 1.0  # per-image budgets (threshold gates)
        assert -1.0 <= m["spearman_difficulty_flops"] <= 1.0
        assert len(m["train_top1_under_masks"]) == 8  # the baseline branch's epochs, trained under the masks
    else:
        # Measured (seed 0, 2 threads, quiet): baseline 0.902, dense 0.867, top1 0.856 at a test reduction of
        # 0.419, p90/p10 1.26, Spearman(difficulty, FLOPs) +0.49, 140 s; results vary by a few points with the
        # thread count (1 thread: drop 0.029, p90/p10 1.30). The drop goal (<= 0.01 at >= 0.40) is NOT met.
        assert m["baseline_top1"] - m["top1"] <= 0.07
        assert m["per_image_flops_p90_over_p10"] > 1.15
        assert 0.1 < m["spearman_difficulty_flops"] <= 1.0  # harder images keep more channels
        files.append("cv_per_point.png")
    for f in files:
        assert (out / f).is_file(), f
    printed = capsys.readouterr().out
    assert "flops_reduction" in printed


@pytest.mark.parametrize("bad", [{"static_share": 1.0}, {"static_share": -0.1}, {"epochs": 0}, {"distill": 1.5}])
def test_demo_gates_options_are_validated(bad):
    from instaprune.core.errors import ConfigError
    from instaprune.demo.gated import DemoGates

    assert DemoGates().static_share == 0.75  # the shipped demo slims three quarters of its FLOPs target statically
    with pytest.raises(ConfigError):
        DemoGates(**bad)
