"""Study 2's plan (benchmarks/cifar10_gates.py): which rows it runs, chosen on the holdout, never twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import bench_module

common = bench_module("_common")
g = bench_module("cifar10_gates")


def _holdout(work: Path, model: str, variant: str, top1: float, gated: bool = True) -> None:
    d = work / model / g.tag(variant, g.CHOICE_TARGET, "short")
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
