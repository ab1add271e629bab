"""High-level stage functions shared by the CLI and the demo: load, discover, analyse, calibrate, evaluate, report.

Each returns plain data; nothing here prints. The CLI adds argument parsing and rendering on top.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaprune.core.config import Preprocessing
from instaprune.core.errors import ConfigError
from instaprune.data.datasets import ImageSet, iterate_batches, load_dataset
from instaprune.evaluation.accuracy import EvalResult, accuracy_vs_flops, evaluate
from instaprune.evaluation.report import write_markdown, write_metrics, write_plots
from instaprune.method.analysis import SaliencyStats, analyze, select_points
from instaprune.method.calibration import CalibrationConfig, calibrate
from instaprune.method.plan import Plan
from instaprune.method.points import PointReport, find_prune_points
from instaprune.models import build_model, default_preprocessing
from instaprune.training.checkpoint import load_weights

__all__ = ["LoadedModel", "load_model", "discover", "load_split", "cached_batches", "analyze_and_select",
           "calibrate_plan", "evaluate_and_report", "parse_selection"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    model: nn.Module
    pre: Preprocessing
    meta: dict[str, Any]


def load_model(name: str, checkpoint: str | Path | None = None, num_classes: int | None = None) -> LoadedModel:
    """Build ``name`` and load ``checkpoint`` (public CIFAR format, plain state dict or instaprune checkpoint).

    The checkpoint's stored preprocessing (if any) wins over the model's default."""
    meta: dict[str, Any] = {}
    if checkpoint is not None:
        from instaprune.training.checkpoint import read_meta

        meta = read_meta(checkpoint)
        num_classes = num_classes or meta.get("num_classes")
    model = build_model(name, num_classes)
    pre = Preprocessing.from_dict(meta["preprocessing"]) if "preprocessing" in meta else default_preprocessing(name)
    if meta.get("gates") or meta.get("static"):
        model = restore_structure(model, meta, pre)
    if checkpoint is not None:
        meta = load_weights(model, checkpoint) or meta
    model.eval()
    return LoadedModel(name, model, pre, meta)


def restore_structure(model: nn.Module, meta: dict[str, Any], pre: Preprocessing) -> nn.Module:
    """A freshly built ``model`` brought to the shape a checkpoint was saved in: slimmed by its static plan
    (``meta["static"]``, or the gates' own), with the gate predictors of ``meta["gates"]`` attached."""
    from instaprune.baselines.static import StaticPlan, find_pairs, slim
    from instaprune.method.gates import GatePlan, GateReport, attach_predictors

    try:
        gplan = GatePlan.from_dict(meta["gates"]) if meta.get("gates") else None
        static = gplan.static if gplan is not None else meta.get("static")
        x = torch.zeros(1, len(pre.mean), pre.input_size, pre.input_size)
        if static:
            model = slim(model, StaticPlan.from_dict(static, find_pairs(model, x)[0]))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ConfigError(f"the checkpoint's structure (static plan / gates) is malformed: "
                          f"{type(e).__name__}: {e}") from e
    if gplan is not None:
        attach_predictors(model, GateReport(gplan.sites), gplan.config)
    return model


def discover(model: nn.Module, pre: Preprocessing, include: Sequence[str] | None = None,
             exclude: Sequence[str] = (), shortcuts: bool = False) -> PointReport:
    x = torch.zeros(1, len(pre.mean), pre.input_size, pre.input_size)
    return find_prune_points(model, x, include=include, exclude=exclude, shortcuts=shortcuts)


def load_split(path: str | Path, pre: Preprocessing, holdout: int = 0, part: str = "all",
               seed: int = 0) -> ImageSet:
    """Load a dataset; with ``holdout`` > 0 return the ``train`` remainder or the ``holdout`` part of a
    deterministic stratified split (the same for the same seed, so train and calibrate agree)."""
    data = load_dataset(path, size=pre.input_size, resize=pre.resize)
    if holdout <= 0 or part == "all":
        return data
    if holdout >= len(data):
        raise ConfigError(f"holdout {holdout} must be smaller than the dataset ({len(data)} images)")
    rest, held = data.split(holdout, seed)
    return held if part == "holdout" else rest


def cached_batches(data: ImageSet, pre: Preprocessing,
                   batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y, _ in iterate_batches(data, batch_size, pre.mean, pre.std)]


def parse_selection(spec: str) -> dict[str, Any]:
    """``all``, ``kappa:0.3`` or ``topk:10`` -> keyword arguments of :func:`select_points`."""
    spec = spec.strip()
    if spec == "all":
        return {}
    kind, _, val = spec.partition(":")
    try:
        if kind == "kappa":
            return {"kappa": float(val)}
        if kind == "topk":
            return {"top_k": int(val)}
    except ValueError:
        pass
    raise ConfigError(f"point selection must be 'all', 'kappa:<float>', 'topk:<int>' or 'plan:<path>', got {spec!r}")


def analyze_and_select(model: nn.Module, points: PointReport, batches, selection: str | Sequence[str] = "all",
                       target: float | None = None, min_keep: float = 0.05) -> tuple[SaliencyStats, list[str]]:
    """Streaming statistics and the selected points. ``selection`` is a spec (``all``, ``kappa:x``, ``topk:k``,
    ``plan:PATH`` = the points an existing plan selected) or an explicit list of point names, kept as given."""
    if isinstance(selection, str) and selection.strip().startswith("plan:"):  # resolved before the pass
        from instaprune.method.plan import Plan

        selection = Plan.load(selection.strip()[5:]).selected
    if not isinstance(selection, str):
        names = {p.name for p in points}
        missing = [n for n in selection if n not in names]
        if missing:
            raise ConfigError(f"selected points not among this model's prune points: {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        return analyze(model, batches, points), list(selection)
    kwargs = parse_selection(selection)
    stats = analyze(model, batches, points)
    return stats, select_points(stats, points, target=target, min_keep=min_keep, **kwargs)


def calibrate_plan(lm: LoadedModel, points: PointReport, calib: ImageSet, cfg: CalibrationConfig,
                   selection: str | Sequence[str] = "all", batch_size: int = 256,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[Plan, SaliencyStats]:
    """Analyse ``calib``, select points by ``selection`` and calibrate them (``progress``: one dict per
    evaluation, see :class:`~instaprune.method.calibration.Evaluator`)."""
    batches = cached_batches(calib, lm.pre, batch_size)
    stats, chosen = analyze_and_select(lm.model, points, batches, selection, cfg.target, cfg.thresholds.min_keep)
    cv = {p.name: stats.cv(p.name) for p in points}
    plan = calibrate(lm.model, points, batches, cfg, selected=chosen, cv=cv, model_name=lm.name,
                     preprocessing=lm.pre, progress=progress)
    return plan, stats


def evaluate_and_report(lm: LoadedModel, points: PointReport, data: ImageSet, out_dir: str | Path,
                        plan: Plan | None = None, baseline_top1: float | None = None,
                        stats: SaliencyStats | None = None, extra: dict[str, Any] | None = None,
                        title: str = "instaprune evaluation", curve_scales: Sequence[float] = (),
                        batch_size: int = 256, progress: Callable[[int], None] | None = None) -> EvalResult:
    """Evaluate dense (+ dynamic with ``plan``), then write metrics.json, report.md and plots to ``out_dir``.
    ``progress``: called with the number of images of every evaluated batch."""
    res = evaluate(lm.model, data, lm.pre, points, plan, batch_size, baseline_top1, progress=progress)
    metrics = {**(extra or {}), **res.metrics}
    if plan is not None:
        metrics["selected_points"] = len(plan.taus)
        metrics["target"] = plan.target
    curves: dict[str, Any] = {}
    if plan is not None and plan.curve:
        curves["calibration split"] = list(plan.curve)
    if plan is not None and curve_scales:
        test_curve = accuracy_vs_flops(lm.model, data, lm.pre, points, plan, curve_scales, batch_size)
        curves["test split"] = test_curve
        metrics["test_curve"] = test_curve
    cv_table = stats.table(points) if stats is not None else [
        {"name": r["name"], "cv": r["cv"]} for r in res.per_point if r.get("cv") is not None]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(out, res.per_instance if plan is not None else None, res.per_point, cv_table, curves,
                        2 * points.dense_macs, baseline_top1)
    write_metrics(out, metrics)
    write_per_image(out / "per_image.npz", res.per_instance)
    write_markdown(out, title, metrics, res.per_point, plots)
    res.metrics = metrics
    return res


def write_per_image(path: str | Path, per_instance: dict[str, torch.Tensor]) -> Path:
    """Per-image arrays in dataset order (``dense_correct``, ``dense_confidence``, and with a plan ``correct``,
    ``flops``, ``confidence``) as one ``.npz``: what paired bootstrap intervals are computed from."""
    import numpy as np

    from instaprune.core.io import atomic_write

    arrays = {k: v.detach().cpu().numpy() for k, v in per_instance.items()}
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
