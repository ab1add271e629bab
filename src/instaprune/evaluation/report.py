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

__all__ = ["write_metrics", "write_plots", "write_markdown", "spearman", "plot_difficulty_vs_flops",
           "POINT_COLUMNS"]


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
        # two quantities with different meanings: each on its own labelled axis
        fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6, 0.25 * len(per_point)), 5.0),
                                          gridspec_kw={"height_ratios": [3, 2]})
        xs = list(range(len(per_point)))
        top.bar(xs, [r["keep_mean"] for r in per_point], color="tab:green")
        top.set_ylim(0, 1.05)
        top.set_ylabel("mean keep ratio\n(kept / C, per image)")
        top.set_title("Kept input channels per prune point (test split)")
        bottom.bar(xs, [r["keep_cv"] for r in per_point], color="tab:red")
        bottom.set_ylabel("keep-ratio CV\nover images")
        bottom.set_xticks(xs, [r["name"] for r in per_point], rotation=90, fontsize=7)
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
        fig, ax = plt.subplots(figsize=(6.0, 4.0))
        # "wrong" underneath, "correct" on top but translucent, and each group's median per confidence bin over
        # both, so neither group hides the other
        groups = [(~ok, "wrong", "tab:red"), (ok, "correct", "tab:blue")]
        for sel, lab, color in groups:
            ax.scatter(conf[sel], rel[sel], s=3, alpha=0.25, color=color, lw=0,
                       label=f"{lab} ({int(sel.sum())} images)")
        edges = torch.linspace(float(conf.min()), float(conf.max()) + 1e-9, 11).numpy()
        for sel, lab, color in groups:
            mids, meds = [], []
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                inb = sel & (conf >= lo) & (conf < hi)
                if inb.sum() >= 5:
                    mids.append((lo + hi) / 2)
                    meds.append(float(torch.tensor(rel[inb]).median()))
            if mids:
                ax.plot(mids, meds, "-o", color=color, ms=4, lw=2, mec="white", label=f"{lab}: median per bin")
        ax.set_xlabel("confidence of the dense run of these weights (max softmax)")
        ax.set_ylabel("per-image FLOPs / dense")
        ax.legend(fontsize=7, markerscale=3, title="judged by the pruned (dynamic) model", title_fontsize=7)
        ax.set_title(f"Cost vs confidence (Spearman {spearman(torch.tensor(conf), torch.tensor(rel)):+.2f})")
        finish(fig, "keep_vs_confidence.png")
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for label, rows in curves.items():
            rows = sorted(rows, key=lambda r: r["flops_reduction"])
            ax.plot([r["flops_reduction"] for r in rows], [r["top1"] for r in rows], "o-", label=label, ms=3)
        if per_instance is not None and "flops" in per_instance and "correct" in per_instance and dense_flops:
            # the run's own measurement: the plan as calibrated, on the evaluated split (flops include overhead)
            red = 1.0 - float(per_instance["flops"].double().mean()) / dense_flops
            top1 = float(per_instance["correct"].double().mean())
            ax.plot([red], [top1], "*", ms=13, color="black", zorder=5,
                    label=f"this evaluation: {top1:.3f} at {red:.3f}")
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


#: what each column of report.md's per-point table means (docs/method.md sections 4, 5 and 9)
POINT_COLUMNS = (
    "Columns: **C** input channels of the point's consumer; **MACs share** the consumer's (for a gate: its "
    "producers' and consumer's) share of the dense MACs; **CV** the coefficient of variation of the channel "
    "saliency over the analysis images (mean over live channels of std/mean: high = the channels in use change from "
    "image to image; empty when the plan has none); **tau** the point's threshold as calibrated (the kept channels "
    "are those with saliency > tau x scale x ref, ref = the image's max or mean saliency, or 1 in absolute mode; for "
    "a top-k gate, its keep fraction); **keep mean** the mean fraction of the point's channels kept per image on this "
    "split; **keep CV** the coefficient of variation of that fraction over the images (0: every image keeps the same "
    "number of channels)."
)


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
        lines += ["", POINT_COLUMNS]
    if notes:
        lines += ["", *notes]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return atomic_write_text(Path(out_dir) / "report.md", "\n".join(lines) + "\n")


def plot_difficulty_vs_flops(out_dir: str | Path, difficulty: torch.Tensor, flops: torch.Tensor, dense_flops: float,
                             correct: torch.Tensor | None = None, name: str = "difficulty_vs_flops.png",
                             difficulty_label: str = "difficulty (known to the data generator)") -> str:
    """The demo's headline: per-image FLOPs (fraction of the dense model's, overhead included) against each image's
    difficulty, with the median per difficulty bin and the Spearman correlation in the title. ``correct`` (the
    pruned model's per-image correctness) colours the points, wrong ones drawn on top. Returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = difficulty.double().flatten()
    rel = flops.double().flatten() / dense_flops
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    if correct is None:
        ax.scatter(d.numpy(), rel.numpy(), s=3, alpha=0.3, lw=0, color="tab:purple")
    else:
        ok = correct.bool().flatten()
        for sel, lab, color in ((ok, "right", "tab:blue"), (~ok, "wrong", "tab:red")):
            ax.scatter(d[sel].numpy(), rel[sel].numpy(), s=3, alpha=0.3, lw=0, color=color,
                       label=f"pruned model {lab} ({int(sel.sum())} images)")
    edges = torch.quantile(d, torch.linspace(0, 1, 11, dtype=torch.float64))
    mids, meds = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inb = (d >= lo) & (d <= hi)
        if int(inb.sum()) > 0:
            mids.append(float(d[inb].median()))
            meds.append(float(rel[inb].median()))
    ax.plot(mids, meds, "-o", color="black", ms=4, lw=2, label="median per difficulty decile")
    ax.set_xlabel(difficulty_label)
    ax.set_ylabel("per-image FLOPs / dense (incl. overhead)")
    ax.set_title(f"Harder images cost more? Spearman {spearman(d, rel):+.2f}")
    ax.legend(fontsize=7, markerscale=3)
    _save(fig, Path(out_dir) / name)
    plt.close(fig)
    return name
