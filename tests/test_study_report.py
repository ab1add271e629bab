"""The CIFAR-10 study's result logic: paired bootstrap intervals and matched/interpolated rows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cifar10_report import method_rows, paired_bootstrap  # noqa: E402


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(1)
    base = rng.random(4000) < 0.8
    assert paired_bootstrap(base, base, n=1000) == (0.0, 0.0)  # identical predictions: no difference at all
    worse = base.copy()
    worse[np.flatnonzero(base)[:200]] = False  # exactly 5 points worse
    lo, hi = paired_bootstrap(worse, base, n=2000)
    assert lo < -0.05 < hi and hi - lo < 0.02  # paired: the interval is narrow around the true difference
    assert paired_bootstrap(worse, base, n=2000) == (lo, hi)  # seeded


def test_rows_matched_and_interpolated(tmp_path):
    measured = {0.3: (0.305, 0.90), 0.45: (0.47, 0.88), 0.6: (0.57, 0.85)}  # 0.6 misses by 3 points
    for t, (red, top1) in measured.items():
        d = tmp_path / f"ev_m_{t}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"flops_reduction": red, "top1": top1, "dense_top1": 0.91}))
        n = 1000
        np.savez(d / "per_image.npz", correct=np.arange(n) < top1 * n)
    base = np.arange(1000) < 910
    rows = {r["target"]: r for r in method_rows(tmp_path, "m", "m", base, 0.91)}
    assert not rows[0.3]["interpolated"] and rows[0.3]["top1"] == 0.90 and rows[0.3]["ci95"] is not None
    r = rows[0.45]  # 0.47 is 2 points off: interpolated between (0.305, 0.90) and (0.47, 0.88)
    assert r["interpolated"] and r["flops_reduction"] == 0.45
    assert abs(r["top1"] - (0.90 + (0.88 - 0.90) * (0.45 - 0.305) / (0.47 - 0.305))) < 1e-12
    assert rows[0.6].get("unmatched") and rows[0.6]["top1"] == 0.85  # beyond the measured range: as measured
