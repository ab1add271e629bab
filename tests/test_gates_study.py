"""Study 2's plan (benchmarks/cifar10_gates.py): which rows it runs, chosen on the holdout, never twice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import bench_module

common = bench_module("_common")
bench_module("cifar10_study")  # report() imports its paired bootstrap as a sibling
g = bench_module("cifar10_gates")


def _holdout(work: Path, model: str, variant: str, top1: float, gated: bool = True,
             target: float = g.CHOICE_TARGET) -> None:
    d = work / model / g.tag(variant, target, "short")
    d.mkdir(parents=True)
    m = {"calibration": {"top1": top1}} if gated else {"val_top1": top1}
    (d / "metrics.json").write_text(json.dumps(m))


def test_choose_takes_the_best_holdout_row_and_falls_back_to_the_first(tmp_path: Path):
    assert g.choose(tmp_path) == "gates"  # nothing measured: the pilot's setting
    assert g.choose(tmp_path, "resnet56", ("gates_value", "static_gates")) == "gates_value"
    _holdout(tmp_path, "resnet20", "gates", 0.861)
    _holdout(tmp_path, "resnet20", "gates_value", 0.870)
    _holdout(tmp_path, "resnet20", "static", 0.95, gated=False)  # static rows are never the gated choice
    assert g.choose(tmp_path) == "gates_value"
    _holdout(tmp_path, "resnet56", "gates_value", 0.9076)
    _holdout(tmp_path, "resnet56", "static_gates", 0.9114)
    assert g.choose(tmp_path, "resnet56", ("gates_value", "static_gates")) == "static_gates"


@pytest.mark.parametrize("r56_best", ["gates_value", "static_gates"])
def test_resnet56_rows_follow_its_own_holdout_and_are_unique(tmp_path: Path, r56_best: str):
    _holdout(tmp_path, "resnet20", "gates_value", 0.870)
    _holdout(tmp_path, "resnet56", "gates_value", 0.91 if r56_best == "gates_value" else 0.90)
    _holdout(tmp_path, "resnet56", "static_gates", 0.91 if r56_best == "static_gates" else 0.90)
    rows = g.rows("resnet56", tmp_path)
    assert len(rows) == len(set(rows))
    assert rows[:3] == [("gates_value", 0.6, "short"), ("static", 0.6, "short"), ("static_gates", 0.6, "short")]
    for target in (0.3, 0.45, 0.7, 0.8):  # every other target: ResNet-56's holdout choice beside static
        assert {v for v, t, b in rows if t == target} == {r56_best, "static"}
    assert {v for v, t, b in rows if b == "long"} == {"gates_value", "static", "static_gates"}
    # the defaults' row (half static + value gates at 60%) comes right after the 70 and 80% pairs; three quarters
    # static only if ResNet-20's holdout ranks it above half
    assert rows[3:8] == [(r56_best, 0.7, "short"), ("static", 0.7, "short"), (r56_best, 0.8, "short"),
                         ("static", 0.8, "short"), ("static_gates_value", 0.6, "short")]
    assert ("static3q_gates_value", 0.6, "short") not in rows
    _holdout(tmp_path, "resnet20", "static_gates_value", 0.8698)
    _holdout(tmp_path, "resnet20", "static3q_gates_value", 0.8626)
    assert g.rows("resnet56", tmp_path) == rows
    (tmp_path / "resnet20" / g.tag("static3q_gates_value", 0.6, "short") / "metrics.json").write_text(
        json.dumps({"calibration": {"top1": 0.8720}}))
    assert g.rows("resnet56", tmp_path)[8] == ("static3q_gates_value", 0.6, "short")
    # at 80% ResNet-20's best row joins only where it beats static L1 on ResNet-20's holdout, before the long rows
    _holdout(tmp_path, "resnet20", "gates_value", 0.79, target=0.8)
    _holdout(tmp_path, "resnet20", "static", 0.80, gated=False, target=0.8)
    assert ("gates_value", 0.8, "short") not in g.rows("resnet56", tmp_path) or r56_best == "gates_value"
    (tmp_path / "resnet20" / g.tag("gates_value", 0.8, "short") / "metrics.json").write_text(
        json.dumps({"calibration": {"top1": 0.81}}))
    now = g.rows("resnet56", tmp_path)
    assert ("gates_value", 0.8, "short") in now and len(now) == len(set(now))
    assert now.index(("gates_value", 0.8, "short")) < min(i for i, r in enumerate(now) if r[2] == "long")
    names = [s.name for s in g.stages("resnet56", tmp_path)]
    assert len(names) == len(set(names))
    # every gated trained row has its slim-off row and both are evaluated
    for v, t, b in rows:
        name = g.tag(v, t, b)
        assert f"ev_{name}" in names
        assert (f"slimoff_{name}" in names) == (v not in g.STATIC)


def test_resnet20_rows_are_unique_and_long_rows_use_the_choice(tmp_path: Path):
    _holdout(tmp_path, "resnet20", "gates_value", 0.870)
    _holdout(tmp_path, "resnet20", "gates", 0.861)
    rows = g.rows("resnet20", tmp_path)
    assert len(rows) == len(set(rows))
    assert {v for v, t, b in rows if b == "long"} == {"gates_value", "static", "static_gates"}
    assert {v for v, t, b in rows if t == 0.7} == {"gates_value", "static"}
    # the static-share sweep runs on ResNet-20 at 60% (short) but never becomes the options' choice
    assert ("static3q_gates_value", 0.6, "short") in rows
    _holdout(tmp_path, "resnet20", "static3q_gates_value", 0.99)
    assert g.choose(tmp_path) == "gates_value" and g.rows("resnet20", tmp_path) == rows
    # 60% at both budgets before the other targets
    first_other = min(i for i, (v, t, b) in enumerate(rows) if t != 0.6)
    assert max(i for i, (v, t, b) in enumerate(rows) if b == "long") < first_other


@pytest.mark.parametrize(("variant", "static"), [("static_gates", "0.3"), ("static3q_gates_value", "0.45"),
                                                 ("static", "0.6"), ("gates_value", "0")])
def test_static_share_words_become_that_share_of_the_target(variant: str, static: str | None):
    args = g.train_args("resnet20", variant, 0.6, "short")
    assert (args[args.index("--static-target") + 1] if "--static-target" in args else None) == static
    assert ("--target" in args) == (variant not in g.STATIC)


@pytest.mark.parametrize(("variant", "trained"), [("gates", True), ("static_gates_value", True),
                                                  ("static", False), ("static_nodistill", False),
                                                  ("gates_value+slimoff", False), ("static_gates+slimoff", False)])
def test_trained_gated_rows_are_neither_static_l1_nor_slim_off(variant: str, trained: bool):
    assert g.trained_gated(variant) is trained
    assert (variant in g.VARIANTS or variant.removesuffix("+slimoff") in g.VARIANTS)  # real variant names


def _row(variant: str, target: float, budget: str, top1: float, red: float, diff: float | None = None) -> dict:
    return {"variant": variant, "target": target, "budget": budget, "top1": top1, "flops_reduction": red,
            "per_image_flops_p90_over_p10": None if variant == "static" else 1.0,
            "minus_static": None if diff is None else {"diff": diff, "ci95": [diff - 0.005, diff + 0.005]}}


def test_goals_judge_planned_rows_and_add_up_the_recorded_cost(tmp_path: Path):
    results, work = tmp_path / "results", tmp_path / "work"
    results.mkdir()
    rows = [_row("static", 0.6, "short", 0.887, 0.60), _row("static_gates", 0.6, "short", 0.899, 0.61, +0.012),
            _row("static", 0.7, "short", 0.878, 0.70), _row("static_gates", 0.7, "short", 0.869, 0.72, -0.009)]
    (results / "cifar10_gates_resnet56.json").write_text(
        json.dumps({"meta": {"baseline_top1": 0.8963}, "rows": rows}))
    for name, rec in {"static_0.6_short": {"seconds": 3600, "cpu_seconds": 3600},
                      "ev_static_0.6_short": {"seconds": 60, "cpu_seconds": 1800},
                      "static_gates_0.6_short": {"seconds": 7200}}.items():  # an early stage: wall time only
        (work / "resnet56" / name).mkdir(parents=True)
        (work / "resnet56" / name / "cost.json").write_text(json.dumps(rec))
    md = "\n".join(g.goals(results, work))
    assert "| resnet56 | 60% short: best instance-wise row beats static by >= 1 point(s), CI > 0 | " \
           "static_gates: +1.20 [+0.70, +1.70] | yes |" in md
    assert "static_gates: -0.90 [-1.40, -0.40] | no |" in md  # 70% needs +2 points
    assert "60% short: within 1.0 point of the adapted baseline (0.8963) | static_gates: +0.27 points | yes" in md
    assert "70% long" not in md  # the plan runs the long budget at 60% only: no goal line for it
    assert "| resnet56 | 60% long: best instance-wise row beats static by >= 1 point(s), CI > 0 | pending | - |" in md
    assert "stretch" in md and "static_gates 0.7 short (0.720): -2.73 points | no |" in md
    assert "no row with per-image budgets" in md  # top-k rows only
    assert "| resnet20 | all | pending (no row yet) | - |" in md
    assert "1.5 CPU hours recorded (resnet56 1.5; resnet20 0.0), plus 2.0 wall hours of 1 early stages" in md
    assert md.count("| so far |") == 1  # planned rows are missing: the budget is judged so far


def test_report_pairs_rows_with_static_and_reads_each_gated_rows_static_part(tmp_path: Path, monkeypatch):
    """``report`` on a tiny stage tree: the gated row's test top-1 and paired difference to static, and the part of
    its cut that is static (0 for gates alone, the slim-off plan's static reduction for its slim-off row)."""
    monkeypatch.chdir(tmp_path)  # no adapted baseline here: the report says so (None), it does not fail
    work, results = tmp_path / "work", tmp_path / "results"
    results.mkdir()
    w = work / "resnet20"
    rng = np.random.default_rng(0)
    static_correct = rng.random(400) < 0.85
    gated_correct = static_correct.copy()
    gated_correct[:20] = False  # 20 of 400 images fewer right than static: -0.05 (minus any already wrong)

    def stage(name: str, files: dict[str, dict]) -> None:
        (w / name).mkdir(parents=True)
        for f, d in files.items():
            (w / name / f).write_text(json.dumps(d))

    stage("static_0.6_short", {"metrics.json": {"val_top1": 0.87}})
    (w / "static_0.6_short" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_top1": 0.84}) + "\n")
    stage("static_nodistill_0.6_short", {"metrics.json": {"val_top1": 0.85}})  # static too: no gated row
    (w / "static_nodistill_0.6_short" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_top1": 0.8}) + "\n")
    stage("ev_static_nodistill_0.6_short", {"metrics.json": {"dense_top1": float(gated_correct.mean())}})
    np.savez(w / "ev_static_nodistill_0.6_short" / "per_image.npz", dense_correct=gated_correct)
    stage("ev_static_0.6_short", {"metrics.json": {"dense_top1": float(static_correct.mean())}})
    np.savez(w / "ev_static_0.6_short" / "per_image.npz", dense_correct=static_correct)
    stage("gates_value_0.6_short", {"metrics.json": {"calibration": {"top1": 0.86}},
                                    "plan.json": {"gates": {"static": None}}})
    stage("slimoff_gates_value_0.6_short", {"plan.json": {"calibration": {"top1": 0.861},
                                                          "gates": {"static": {"flops_reduction": 0.55}}}})
    (w / "gates_value_0.6_short" / "metrics.jsonl").write_text(  # its epochs: the last one's fit is reported
        "".join(json.dumps({"epoch": e, "train_top1": t}) + "\n" for e, t in ((1, 0.9), (2, 0.81))))
    for name in ("ev_gates_value_0.6_short", "ev_slimoff_gates_value_0.6_short"):
        stage(name, {"metrics.json": {"dense_top1": 0.88, "top1": float(gated_correct.mean()),
                                      "flops_reduction": 0.6}})
        np.savez(w / name / "per_image.npz", correct=gated_correct, flops=np.full(400, 1.0))
    g.report("resnet20", work, results)
    rows = {r["variant"]: r for r in json.loads((results / "cifar10_gates_resnet20.json").read_text())["rows"]}
    assert set(rows) == {"static", "static_nodistill", "gates_value", "gates_value+slimoff"}
    assert rows["static"]["static_reduction"] is None and "minus_static" not in rows["static"]
    assert rows["gates_value"]["static_reduction"] == 0.0
    assert rows["gates_value+slimoff"]["static_reduction"] == 0.55
    want = float(gated_correct.mean() - static_correct.mean())
    diff = rows["gates_value"]["minus_static"]
    assert diff["diff"] == pytest.approx(want) and want < 0
    assert diff["ci95"][0] <= want <= diff["ci95"][1]
    assert rows["gates_value+slimoff"]["holdout_top1"] == 0.861
    assert rows["gates_value"]["train_top1"] == rows["gates_value+slimoff"]["train_top1"] == 0.81
    assert rows["static"]["train_top1"] == 0.84
    assert rows["gates_value"]["train_minus_static"] == pytest.approx(-0.03)
    md = (results / "cifar10_gates_resnet20.md").read_text()
    assert "| of it static |" in md and "| 0.550 |" in md
    assert "| gates_value | 0.6 | short (6) | 0.8100 | 0.8600 |" in md
    assert "1 of 1 trained gated rows fit the training set less well" in md and "median -3.00 points" in md
    assert f"test top-1: median {100 * want:+.2f})" in md


def test_frozen_masks_keep_each_gates_most_used_channels_at_its_mean_count():
    import torch

    usage = {"a": torch.tensor([0.9, 0.05, 1.0, 0.55, 0.5]),  # mean kept count 3.0: channels 2, 0, 3
             "b": torch.tensor([0.0, 0.004, 0.001]),  # almost never kept: still one channel (the most used)
             "c": torch.tensor([1.0, 1.0])}
    m = g.frozen_masks(usage)
    assert m["a"].tolist() == [True, False, True, True, False]
    assert m["b"].tolist() == [False, True, False]
    assert m["c"].tolist() == [True, True]
    for n, u in usage.items():  # the same mean MACs: the kept count is the mean kept count, rounded
        assert int(m[n].sum()) == max(1, round(float(u.sum())))


def test_frozen_with_no_trained_row_fails_in_one_line_and_writes_nothing(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(g.ROOT)  # the script runs from the repository root
    code = g.main(["frozen", "--model", "resnet20", "--work", str(tmp_path)])  # an empty study directory
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cifar10_gates: error: no row to write in"), err
    assert not any(tmp_path.rglob("*"))


def test_spread_stats_tell_gates_that_vary_together_from_gates_that_average_out():
    rng = np.random.default_rng(0)
    common = rng.random(4000)
    together = {f"g{i}": 0.2 + 0.5 * common for i in range(9)}  # every gate follows one per-image difficulty
    apart = {f"g{i}": 0.2 + 0.5 * rng.random(4000) for i in range(9)}  # each gate on its own
    w = {f"g{i}": 1.0 + i for i in range(9)}
    a, b = g.spread_stats(together, w), g.spread_stats(apart, w)
    assert a["coherence"] == pytest.approx(1.0) and a["mean_pairwise_r"] == pytest.approx(1.0)
    assert b["coherence"] < 0.5 and abs(b["mean_pairwise_r"]) < 0.05  # about 1/sqrt(9) with unequal weights
    assert a["varying_gates"] == b["varying_gates"] == 9
    assert a["gates"][0]["p10"] == pytest.approx(0.2 + 0.5 * np.percentile(common, 10))
    fixed = {"c": np.full(10, 0.5), "v": np.linspace(0, 1, 10)}  # a constant gate: no r, and no NaN
    c = g.spread_stats(fixed, {"c": 1.0, "v": 1.0})
    assert c["varying_gates"] == 1 and c["mean_pairwise_r"] is None and c["coherence"] == pytest.approx(1.0)


def test_spread_with_no_threshold_row_fails_in_one_line_and_writes_nothing(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(g.ROOT)
    code = g.main(["spread", "--model", "resnet20", "--work", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cifar10_gates: error: no trained row with threshold"), err
    assert not any(tmp_path.rglob("*"))
