"""Run reports: ``metrics.json``, ``report.md`` and PNG plots in a run directory.

matplotlib is imported lazily (only when plots are written), so ``import instaprune`` stays lean.
"""

from __future__ import annotations

import io as _io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from instaprune.core.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["write_metrics", "write_plots", "write_markdown", "spearman"]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def rank(v: torch.Tensor) -> torch.Tensor:
        v = v.double()
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        # average the ranks of ties
        uniq, inv = torch.unique(v, return_inverse=True)
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
        return (sums / counts)[inv]

    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 0.0


def write_metrics(out_dir: str | Path, metrics: Mapping[str, Any]) -> Path:
    return atomic_write_json(Path(out_dir) / "metrics.json", dict(metrics))


def _save(fig: Any, path: Path) -> None:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def write_plots(
    out_dir: str | Path,
    per_instance: Mapping[str, torch.Tensor] | None = None,
    per_point: Sequence[Mapping[str, Any]] = (),
    cv_table: Sequence[Mapping[str, Any]] = (),
    curves: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
    dense_flops: float | None = None,
    baseline_top1: float | None = None,
) -> list[str]:
    """Write the standard plots that the inputs allow; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    written: list[str] = []

    def finish(fig: Any, name: str) -> None:
        _save(fig, out / name)
        plt.close(fig)
        written.append(name)

    if cv_table:
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(cv_table)), 3.5))
        ax.bar(range(len(cv_table)), [r["cv"] for r in cv_table], color="tab:blue")
        ax.set_xticks(range(len(cv_table)), [r["name"] for r in cv_table], rotation=90, fontsize=7)
        ax.set_ylabel("CV of channel saliency")
        ax.set_title("Coefficient of variation per prune point")
        finish(fig, "cv_per_point.png")
    if per_point:
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(per_point)), 3.5))
        xs = range(len(per_point))
        ax.bar(xs, [r["keep_mean"] for r in per_point], color="tab:green", label="mean keep ratio")
        ax.plot(xs, [r["keep_cv"] for r in per_point], "o", color="tab:red", label="CV of keep ratio over images")
        ax.set_xticks(list(xs), [r["name"] for r in per_point], rotation=90, fontsize=7)
        ax.set_ylim(0, max(1.05, max(r["keep_cv"] for r in per_point) * 1.1))
        ax.legend(fontsize=8)
        ax.set_title("Kept input channels per prune point")
        finish(fig, "keep_ratio_per_point.png")
    if per_instance is not None and "flops" in per_instance and dense_flops:
        rel = (per_instance["flops"].double() / dense_flops).numpy()
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.hist(rel, bins=50, color="tab:purple")
        ax.set_xlabel("per-image FLOPs / dense FLOPs (incl. overhead)")
        ax.set_ylabel("images")
        ax.set_title("Per-image FLOPs")
        finish(fig, "flops_histogram.png")
        conf = per_instance["dense_confidence"].numpy()
        ok = per_instance["correct"].numpy().astype(bool)
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.scatter(conf[ok], rel[ok], s=2, alpha=0.3, label="correct", color="tab:blue")
        ax.scatter(conf[~ok], rel[~ok], s=2, alpha=0.5, label="wrong", color="tab:red")
        ax.set_xlabel("dense model confidence (max softmax)")
        ax.set_ylabel("per-image FLOPs / dense")
        ax.legend(fontsize=8, markerscale=4)
        ax.set_title(f"Cost vs confidence (Spearman {spearman(torch.tensor(conf), torch.tensor(rel)):+.2f})")
        finish(fig, "keep_vs_confidence.png")
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for label, rows in curves.items():
            rows = sorted(rows, key=lambda r: r["flops_reduction"])
            ax.plot([r["flops_reduction"] for r in rows], [r["top1"] for r in rows], "o-", label=label, ms=3)
        if baseline_top1 is not None:
            ax.axhline(baseline_top1, color="gray", ls="--", label="baseline (no decay)")
        ax.set_xlabel("mean FLOPs reduction")
        ax.set_ylabel("top-1")
        ax.legend(fontsize=8)
        ax.set_title("Accuracy vs FLOPs")
        finish(fig, "accuracy_vs_flops.png")
    return written


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_markdown(out_dir: str | Path, title: str, metrics: Mapping[str, Any],
                   per_point: Sequence[Mapping[str, Any]] = (), plots: Sequence[str] = (),
                   notes: Sequence[str] = ()) -> Path:
    lines = [f"# {title}", "", "FLOPs convention: MACs of conv/linear layers, FLOPs = 2 x MACs; reductions include"
             " the saliency/threshold overhead.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if not isinstance(v, (dict, list))]
    if per_point:
        lines += ["", "## Prune points", "", "| point | C | MACs share | CV | tau | keep mean | keep CV |",
                  "|---|---|---|---|---|---|---|"]
        for r in per_point:
            lines.append(f"| {r['name']} | {r['channels']} | {r['macs_share']:.3f} | {_fmt(r.get('cv'))} | "
                         f"{r['tau']:.4f} | {r['keep_mean']:.3f} | {r['keep_cv']:.3f} |")
    if notes:
        lines += ["", *notes]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return atomic_write_text(Path(out_dir) / "report.md", "\n".join(lines) + "\n")
