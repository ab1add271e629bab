"""Results of the CIFAR-10 study (``cifar10_study.py report``): rows, paired-bootstrap intervals, RESULTS.md, plot.

A row is (method, target): the test-split evaluation of the plan calibrated on the holdout for that target.
"Matched" when the test reduction is within 1.5 points of the target; otherwise the accuracy at the target is
interpolated linearly between the two measured neighbours of the same method and the row says ``interpolated``.
``ci95`` is a paired bootstrap (10,000 resamples of the 10,000 test images, seed 0) of ``top1 - baseline_top1``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (0.3, 0.45, 0.6, 0.7)
MATCH = 0.015
#: published figures (their papers, original CIFAR-10 test set, their own baselines): error increase in points
PEERS = {
    "resnet56": [("FBS (Gao et al. 2019), dynamic", 0.536, 0.18), ("ManiDP (Tang et al. 2021), dynamic", 0.624, 0.06),
                 ("HRank (Lin et al. 2020), static", 0.50, 0.53)],
}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a) - mean(b) over images resampled with replacement (a, b: per-image 0/1)."""
    rng = np.random.default_rng(seed)
    d = a.astype(np.float64) - b.astype(np.float64)
    if d.shape != (d.size,) or b.shape != a.shape:
        raise ValueError(f"paired arrays must be 1-D and of equal length, got {a.shape} and {b.shape}")
    means = np.concatenate([d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
                            for k in [500] * (n // 500) + ([n % 500] if n % 500 else [])])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def method_rows(work: Path, method: str, cfg: str, base_correct: np.ndarray | None,
                baseline_top1: float | None) -> list[dict[str, Any]]:
    measured = []
    for t in TARGETS:
        ev = work / f"ev_{cfg}_{t}"
        m = _load(ev / "metrics.json")
        if m is None:
            continue
        per = np.load(ev / "per_image.npz") if (ev / "per_image.npz").is_file() else None
        measured.append((t, m, per))
    rows = []
    pts = sorted((m["flops_reduction"], m["top1"]) for _, m, _ in measured)
    for t, m, per in measured:
        row = {"method": method, "setting": cfg, "target": t, "flops_reduction": m["flops_reduction"],
               "top1": m["top1"], "dense_top1": m["dense_top1"], "baseline_top1": baseline_top1,
               "flops_reduction_p10": m.get("flops_reduction_p10"), "flops_reduction_p90": m.get("flops_reduction_p90"),
               "interpolated": False, "ci95": None}
        if abs(m["flops_reduction"] - t) > MATCH:
            lo = [p for p in pts if p[0] <= t]
            hi = [p for p in pts if p[0] >= t]
            if lo and hi and hi[0][0] > lo[-1][0]:
                (x0, y0), (x1, y1) = lo[-1], hi[0]
                row.update(top1=y0 + (y1 - y0) * (t - x0) / (x1 - x0), flops_reduction=t, interpolated=True,
                           measured_flops_reduction=m["flops_reduction"], measured_top1=m["top1"])
            else:
                row["unmatched"] = True  # outside the measured range: reported as measured, not at the target
        if per is not None and base_correct is not None and not row["interpolated"]:
            lo_, hi_ = paired_bootstrap(per["correct"], base_correct)
            row["ci95"] = [lo_, hi_]
        rows.append(row)
    return rows


def write_report(model: str, work_root: Path, plan: list, chosen: str | None) -> Path:
    from instaprune.io import atomic_write_json, atomic_write_text

    work = work_root / model
    dense = _load(work / "ev_dense" / "metrics.json")
    unadapted = _load(work / "ev_unadapted" / "metrics.json")
    base_per = np.load(work / "ev_dense" / "per_image.npz") if (work / "ev_dense" / "per_image.npz").is_file() \
        else None
    base_correct = base_per["dense_correct"] if base_per is not None else None
    baseline = dense["dense_top1"] if dense else None
    rows: list[dict[str, Any]] = []
    if dense:
        rows.append({"method": "dense adapted baseline", "target": 0.0, "flops_reduction": 0.0, "top1": baseline,
                     "baseline_top1": baseline, "ci95": [0.0, 0.0], "interpolated": False,
                     "unadapted_top1": unadapted["dense_top1"] if unadapted else None})
    if chosen:
        rows += method_rows(work, "feature decay + calibrated dynamic thresholds", chosen, base_correct, baseline)
    rows += method_rows(work, "ablation: no feature decay", "control", base_correct, baseline)
    grid = []
    for s in plan:
        if s.name.startswith("cal_") and s.name.endswith("_0.6") and s.done():
            c = json.loads((s.out / "plan.json").read_text())["calibration"]
            r = c["results"][c["chosen"]]
            grid.append({"setting": s.name[4:-4], "holdout_top1_at_0.6": r["top1"], "search": c["chosen"],
                         "holdout_flops_reduction": r.get("flops_reduction")})
    costs = [{"stage": s.name, "done": s.done(), "seconds": _cost(s)} for s in plan]
    meta = {"command": f"python benchmarks/cifar10_study.py report --model {model}",
            "commit": _git("rev-parse", "HEAD"),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": _torch(), "cores": os.cpu_count(), "chosen_setting": chosen}
    out = ROOT / "results" / f"cifar10_{model}.json"
    atomic_write_json(out, {"meta": meta, "rows": rows, "choice_grid": grid, "costs": costs})
    atomic_write_text(ROOT / "results" / f"cifar10_{model}.md", _markdown(model, meta, rows, grid, costs))
    _plot(rows, ROOT / "results" / f"cifar10_{model}_accuracy_vs_flops.png", model)
    return out


def _markdown(model: str, meta: dict, rows: list[dict], grid: list[dict], costs: list[dict]) -> str:
    f = (lambda v, nd=4: "" if v is None else f"{v:.{nd}f}")  # noqa: E731
    lines = [f"# CIFAR-10 study: {model}", "", "```", json.dumps(meta), "```", "",
             "| method | target | FLOPs reduction (test) | top-1 | baseline top-1 | diff (points) | 95% CI | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = None if r.get("baseline_top1") is None else 100 * (r["top1"] - r["baseline_top1"])
        ci = "" if not r.get("ci95") else f"[{100 * r['ci95'][0]:+.2f}, {100 * r['ci95'][1]:+.2f}]"
        note = "interpolated" if r.get("interpolated") else ("outside measured range" if r.get("unmatched") else "")
        lines.append(f"| {r['method']} | {r['target']:.2f} | {f(r['flops_reduction'], 3)} | {f(r['top1'])} | "
                     f"{f(r.get('baseline_top1'))} | {'' if diff is None else f'{diff:+.2f}'} | {ci} | {note} |")
    if PEERS.get(model):
        lines += ["", "Published figures (theirs: original CIFAR-10 test set, their baselines, not reproduced here):",
                  "", "| method | FLOPs reduction | top-1 error increase (points) |", "|---|---|---|"]
        lines += [f"| {n} | {r:.3f} | {e:+.2f} |" for n, r, e in PEERS[model]]
    if grid:
        lines += ["", "Choice grid (holdout split, calibrated to 60% FLOPs reduction):", "",
                  "| setting | holdout top-1 | search | holdout reduction |", "|---|---|---|---|"]
        lines += [f"| {g['setting']} | {f(g['holdout_top1_at_0.6'])} | {g['search']} | "
                  f"{f(g['holdout_flops_reduction'], 3)} |" for g in grid]
    total = sum(c["seconds"] or 0 for c in costs)
    lines += ["", f"Cost per stage (wall seconds, 1 thread unless noted; total so far {total / 3600:.2f} h):", "",
              "| stage | done | seconds |", "|---|---|---|"]
    lines += [f"| {c['stage']} | {'yes' if c['done'] else 'no'} | {f(c['seconds'], 0)} |" for c in costs]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], png: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["flops_reduction"], r["top1"]) for r in rows if r["method"] == method)
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=method)
    ax.set_xlabel("mean FLOPs reduction on the test split (%)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"CIFAR-10 {model}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png)


def _cost(s) -> float | None:
    for f in (s.out / "cost.json", s.out / "metrics.json"):
        m = _load(f)
        if m and m.get("seconds") is not None:
            return float(m["seconds"])
    return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _torch() -> str:
    import torch

    return torch.__version__
