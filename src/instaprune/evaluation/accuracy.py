"""Evaluation of the dense model and of the masked dynamic model under a plan (docs/method.md section 7).

Returns plain data: a metrics dict (``dense_top1``, ``top1``, ``flops_reduction`` mean/p10/p50/p90,
``overhead_macs``, ``theoretical_speedup``, per-point keep ratios and their CV across instances) and the
per-instance arrays (MACs, confidence, correctness) the report plots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from instaprune.core.config import Preprocessing
from instaprune.data.datasets import ImageSet, iterate_batches
from instaprune.method.flops import reduction_summary
from instaprune.method.masked import MaskedModel
from instaprune.method.plan import Plan
from instaprune.method.points import PointReport
from instaprune.method.scoring import score_batches

__all__ = ["EvalResult", "evaluate", "accuracy_vs_flops", "dynamic_model"]


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    per_instance: dict[str, torch.Tensor] = field(default_factory=dict)  # macs, confidence, correct, dense_correct
    per_point: list[dict[str, Any]] = field(default_factory=list)  # name, channels, keep_mean, keep_cv, cv


def _units(dyn: nn.Module) -> list[tuple[str, int]]:
    """(name, channels) of every place a dynamic model masks: post-hoc points or gates."""
    if isinstance(dyn, MaskedModel):
        return [(p.name, p.channels) for p in dyn.selected]
    return [(s.name, s.channels) for s in dyn.gates]


@torch.no_grad()
def _run(net: nn.Module, data: ImageSet, pre: Preprocessing, batch_size: int,
         masked: nn.Module | None = None, progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    conf, correct, macs = [], [], []
    keep: dict[str, list[torch.Tensor]] = {}
    units = _units(masked) if masked is not None else []

    def record(x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        c, pred = logits.softmax(1).max(1)
        conf.append(c)
        correct.append(pred == y)
        if masked is not None:
            macs.append(masked.instance_macs())
            for name, ch in units:
                keep.setdefault(name, []).append(masked.active[name].double() / ch)
        if progress is not None:
            progress(int(y.shape[0]))

    score_batches(net, iterate_batches(data, batch_size, pre.mean, pre.std), each=record)
    out = {"confidence": torch.cat(conf), "correct": torch.cat(correct)}
    if masked is not None:
        out["macs"] = torch.cat(macs)
        out.update({f"keep/{k}": torch.cat(v) for k, v in keep.items()})
    return out


def dynamic_model(model: nn.Module, points: PointReport, plan: Plan, pre: Preprocessing) -> nn.Module:
    """The reference dynamic model of ``plan``: gates (:class:`~instaprune.method.gates.GatedModel`) or the
    post-hoc points (:class:`MaskedModel`). Call ``remove()`` on it when done."""
    plan.check(points)
    if plan.gates is not None:
        from instaprune.method.gates import find_gates, gated_from_plan

        x = torch.zeros(1, len(pre.mean), pre.input_size, pre.input_size)
        return gated_from_plan(model, find_gates(model, x), plan.gates, plan.scale, points,
                               dict(plan.taus), plan.thresholds)  # post-hoc points too, when the plan mixes
    return MaskedModel(model, points, plan.taus, plan.thresholds, plan.scale)


def evaluate(
    model: nn.Module,
    data: ImageSet,
    pre: Preprocessing,
    points: PointReport | None = None,
    plan: Plan | None = None,
    batch_size: int = 256,
    baseline_top1: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Dense top-1 always; with ``plan`` (and ``points`` of the same model) the dynamic model too. ``progress``:
    called with the number of images of every evaluated batch (dense, then dynamic)."""
    dense = _run(model, data, pre, batch_size, progress=progress)
    metrics: dict[str, Any] = {"images": len(data), "dense_top1": float(dense["correct"].double().mean())}
    if baseline_top1 is not None:
        metrics["baseline_top1"] = float(baseline_top1)
    if plan is None or points is None:
        return EvalResult(metrics, {"dense_correct": dense["correct"], "dense_confidence": dense["confidence"]})
    masked = dynamic_model(model, points, plan, pre)
    dense_macs = masked.dense_macs if plan.gates is not None else points.dense_macs
    try:
        dyn = _run(masked, data, pre, batch_size, masked, progress)
        overhead = masked.overhead_macs()
        units = dict(_units(masked))
    finally:
        masked.remove()
    metrics["top1"] = float(dyn["correct"].double().mean())
    metrics.update(reduction_summary(dyn["macs"], dense_macs, overhead))
    if plan.gates is not None:
        metrics["method"] = "gates"
        metrics["gate_selection"] = plan.gates.config.selection
    metrics["plan_scale"] = plan.scale
    if baseline_top1 is not None:
        metrics["top1_drop"] = float(baseline_top1) - metrics["top1"]
    per_point = []
    sites = {g.name: g for g in plan.gates.sites} if plan.gates is not None else {}
    by_point = points.by_name()
    for name, channels in units.items():
        r = dyn[f"keep/{name}"]
        if name in sites:
            macs = sum(sites[name].producer_macs) + sites[name].consumer_macs
            tau = plan.gates.taus.get(name, plan.gates.keep.get(name, 0.0))
        else:
            macs, tau = by_point[name].macs, plan.taus[name]
        per_point.append({"name": name, "channels": channels, "macs_share": macs / dense_macs, "tau": tau,
                          "keep_mean": float(r.mean()),
                          "keep_cv": float(r.std(unbiased=False) / r.mean()) if float(r.mean()) > 0 else 0.0,
                          "cv": plan.cv.get(name)})
    flops = 2 * (dyn["macs"] + overhead)
    per_instance = {"flops": flops, "confidence": dyn["confidence"], "correct": dyn["correct"],
                    "dense_correct": dense["correct"], "dense_confidence": dense["confidence"]}
    return EvalResult(metrics, per_instance, per_point)


def accuracy_vs_flops(model: nn.Module, data: ImageSet, pre: Preprocessing, points: PointReport, plan: Plan,
                      scales: Sequence[float], batch_size: int = 256) -> list[dict[str, float]]:
    """Accuracy vs FLOPs reduction obtained by moving the plan's global threshold scale (one pass per scale)."""
    masked = dynamic_model(model, points, plan, pre)
    dense_macs = masked.dense_macs if plan.gates is not None else points.dense_macs
    rows = []
    try:
        for s in scales:
            masked.scale = float(s)
            dyn = _run(masked, data, pre, batch_size, masked)
            red = reduction_summary(dyn["macs"], dense_macs, masked.overhead_macs())["flops_reduction"]
            rows.append({"scale": float(s), "flops_reduction": red, "top1": float(dyn["correct"].double().mean())})
    finally:
        masked.remove()
    return rows
