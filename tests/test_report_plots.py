"""Run reports (issue 25, item 7): plots that say what they show, report.md explains its columns, points name
their source."""

from __future__ import annotations

import torch

from instaprune import build_model, find_prune_points
from instaprune.evaluation.report import POINT_COLUMNS, plot_difficulty_vs_flops, write_markdown, write_plots


def _per_instance(n: int = 400) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    macs = 50 + 30 * torch.rand(n, generator=g)
    return {"flops": 2 * macs, "correct": torch.rand(n, generator=g) < 0.8,
            "confidence": torch.rand(n, generator=g), "dense_confidence": torch.rand(n, generator=g),
            "dense_correct": torch.rand(n, generator=g) < 0.9}


def test_plots_include_the_measured_point_and_separate_axes(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = _per_instance()
    rows = [{"name": f"p{i}", "channels": 8, "macs_share": 0.1, "cv": 0.3, "tau": 0.2, "keep_mean": 0.5,
             "keep_cv": 1.4} for i in range(3)]
    curve = [{"scale": s, "flops_reduction": r, "top1": t} for s, r, t in ((0.5, 0.1, 0.9), (1.0, 0.4, 0.8))]
    drawn = []
    orig = plt.Figure.savefig

    def spy(fig, *a, **k):
        drawn.append(fig)
        return orig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        names = write_plots(tmp_path, per, rows, [], {"calibration split": curve}, dense_flops=200.0,
                            baseline_top1=0.9)
    finally:
        plt.Figure.savefig = orig
    assert {"keep_ratio_per_point.png", "keep_vs_confidence.png", "accuracy_vs_flops.png"} <= set(names)
    by_name = dict(zip(names, drawn, strict=True))
    keep_axes = by_name["keep_ratio_per_point.png"].axes
    assert len(keep_axes) == 2 and all(ax.get_ylabel() for ax in keep_axes)  # keep ratio and CV apart
    acc = by_name["accuracy_vs_flops.png"].axes[0]
    labels = [line.get_label() for line in acc.get_lines()]
    red = 1 - float(per["flops"].double().mean()) / 200.0
    top1 = float(per["correct"].double().mean())
    assert any(lab.startswith("this evaluation") for lab in labels)
    star = next(line for line in acc.get_lines() if line.get_label().startswith("this evaluation"))
    assert abs(star.get_xdata()[0] - red) < 1e-9 and abs(star.get_ydata()[0] - top1) < 1e-9
    conf = by_name["keep_vs_confidence.png"].axes[0]
    assert "pruned" in conf.get_legend().get_title().get_text()  # which model judged right / wrong
    assert "dense" in conf.get_xlabel()


def test_markdown_explains_its_columns(tmp_path):
    rows = [{"name": "a", "channels": 8, "macs_share": 0.1, "cv": 0.3, "tau": 0.2, "keep_mean": 0.5, "keep_cv": 0.1}]
    text = write_markdown(tmp_path, "t", {"top1": 0.5}, rows).read_text()
    assert POINT_COLUMNS in text
    for col in ("**CV**", "**tau**", "**keep CV**"):
        assert col in POINT_COLUMNS


def test_difficulty_plot(tmp_path):
    d = torch.rand(300, generator=torch.Generator().manual_seed(1))
    name = plot_difficulty_vs_flops(tmp_path, d, 100 * (0.5 + 0.3 * d), 100.0, d > 0.1)
    assert (tmp_path / name).is_file()


def test_points_name_the_module_before_a_functional_op():
    pts = find_prune_points(build_model("resnet20"), torch.zeros(1, 3, 32, 32)).by_name()
    assert pts["layer1.0.conv2"].source == "functional op after layer1.0.bn1"  # relu(bn1(...))
    assert all("<functional>" not in p.source for p in pts.values())
