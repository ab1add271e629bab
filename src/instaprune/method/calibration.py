"""Calibration of per-point thresholds to a FLOPs target (docs/method.md section 6.1).

Two searches, both on a held-out calibration split (never the test split):

- ``shared`` (default): one tau for every selected point, found by bisection so the mean FLOPs reduction hits
  the target.
- ``greedy``: per-point thresholds. Each point gets a *ladder* of taus (quantiles of its dense
  saliency ratios s/ref, so each rung drops about 1/steps of that point's channels). Starting from nothing
  pruned, repeatedly take the rung with the smallest loss increase per FLOPs saved (lazy greedy: stale scores
  are re-evaluated only when they reach the top), on a subset of ``search_images``; then one global scale is
  bisected on the full split to hit the target. The shared search is always run too and the greedy result is
  kept only if its calibration accuracy is at least as high, so it never scores below the shared search.

Why ``shared`` is the default (measured): in the CIFAR-10 study (ResNet-20, 5,000-image holdout, 60% target,
prune-aware phase) the shared bisection won all four comparisons on the holdout after the greedy search was run
(top-1 0.560 vs 0.477, 0.445 vs 0.421, 0.490 vs 0.460, 0.410 vs 0.359; ``results/study/resnet20/pa_*/plan.json``)
at 16-19 evaluations instead of 360-390 (about 2 minutes instead of 26-39); on the public ResNet-20 checkpoint
(2,000 held-out images, 30%) it scored 0.617 against greedy's 0.503 at 197 evaluations. ``progress`` receives one
dict per evaluation (search, evaluations, reduction, top-1) and the plan's ``calibration.reason`` says why the
kept result won.

The plan stores the calibration curve (accuracy vs FLOPs for several global scales).

``bn_recalibration``: BatchNorm's running statistics were collected on dense inputs; with channels masked, the
next layers see other statistics. With the option on, after the search the running statistics of every BatchNorm
are re-estimated (cumulative average, train-mode forwards without gradients) on the calibration images with the
chosen masks applied, then the global scale is bisected again to hit the target. This changes the model's buffers
(in place): the plan is only valid with those weights (the CLI saves them beside the plan). Measured once on the
public ResNet-20 (2,000 held-out images, shared tau): top-1 0.466 -> 0.571 at 30% and 0.256 -> 0.333 at 45%.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from instaprune.core.config import ConfigMixin, Preprocessing, check_fields
from instaprune.core.errors import ConfigError
from instaprune.method.analysis import ratio_quantiles
from instaprune.method.flops import flops_reduction
from instaprune.method.masked import MaskedModel
from instaprune.method.plan import Plan, weights_fingerprint
from instaprune.method.points import PointReport
from instaprune.method.scoring import score_batches
from instaprune.method.thresholds import ThresholdConfig

__all__ = ["SEARCHES", "CalibrationConfig", "Evaluation", "Evaluator", "calibrate", "bisect_scale",
           "bisect_reduction", "recalibrate_batchnorm"]

log = logging.getLogger(__name__)
SEARCHES = ("greedy", "shared")


@dataclass(frozen=True)
class CalibrationConfig(ConfigMixin):
    """``target`` mean FLOPs reduction on the calibration split (within ``tolerance``); ``search``: ``shared``
    (one tau, bisection) or ``greedy`` (per-point ladders of ``ladder_steps`` rungs scored on ``search_images``
    images, kept only if it beats shared); ``curve_scales``: global scales of the stored accuracy-vs-FLOPs curve;
    ``bn_recalibration``: re-estimate BatchNorm statistics under the masks (changes the weights)."""

    target: float = 0.5
    search: str = "shared"
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    tolerance: float = 0.01  # |achieved - target| on the calibration split
    search_images: int = 1024  # images used for each greedy step
    ladder_steps: int = 12
    curve_scales: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)
    bn_recalibration: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0.0 < self.target < 1.0:  # also refuses NaN
            raise ConfigError(f"FLOPs target must be in (0, 1), got {self.target}")
        if self.search not in SEARCHES:
            raise ConfigError(f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if not 0 < self.tolerance < 0.5:
            raise ConfigError(f"tolerance must be in (0, 0.5), got {self.tolerance}")
        if self.search_images < 1 or self.ladder_steps < 2:
            raise ConfigError("search_images must be >= 1 and ladder_steps >= 2")
        if any(not 0.0 <= s < 1e6 for s in self.curve_scales):
            raise ConfigError(f"curve_scales must be in [0, 1e6), got {self.curve_scales}")


@dataclass(frozen=True)
class Evaluation:
    top1: float
    loss: float
    flops_reduction: float


class Evaluator:
    """Runs the masked model over cached calibration batches for given thresholds. ``progress`` receives one dict
    per evaluation (``search``: the label set in :attr:`search`, ``evaluations``, ``flops_reduction``, ``top1``)."""

    def __init__(self, masked: MaskedModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.masked = masked
        self.batches = list(batches)
        self.count = 0
        self.search = ""
        self.progress = progress

    @torch.no_grad()
    def run(self, taus: Mapping[str, float], scale: float = 1.0, limit: int | None = None) -> Evaluation:
        self.masked.set_taus(taus, scale)
        macs = [0.0]

        def add_macs(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
            macs[0] += float(self.masked.instance_macs().sum())

        sc = score_batches(self.masked, self.batches, limit=limit, loss=True, each=add_macs)
        self.count += 1
        red = flops_reduction(macs[0] / sc.seen, self.masked.report.dense_macs, self.masked.overhead_macs())
        e = Evaluation(sc.top1, sc.loss, red)
        if self.progress is not None:
            self.progress({"search": self.search, "evaluations": self.count, "flops_reduction": red,
                           "top1": e.top1, "images": sc.seen})
        return e


def _ladders(model: nn.Module, points: PointReport, names: Sequence[str], batches, cfg: CalibrationConfig,
             max_values: int = 50_000) -> dict[str, list[float]]:
    """Per-point tau ladders from the dense distribution of s/ref (quantiles 1/steps apart)."""
    q = torch.linspace(0, 1, cfg.ladder_steps + 1, dtype=torch.float64)[1:].tolist()
    rungs = ratio_quantiles(model, names, batches, q, cfg.thresholds.mode, cfg.search_images, max_values)
    return {n: sorted(set(r)) for n, r in rungs.items()}


def bisect_reduction(fn: Callable[[float], Evaluation], target: float, tol: float, hi: float = 1.0,
                     max_iter: int = 40) -> tuple[float, Evaluation]:
    """Find x >= 0 with fn(x).flops_reduction within tol/2 of target (reduction grows with x): the one bisection
    of every calibration (post-hoc taus, gate thresholds)."""
    lo, e_lo = 0.0, fn(0.0)
    if e_lo.flops_reduction >= target - tol / 2:
        return 0.0, e_lo
    e_hi = fn(hi)
    while e_hi.flops_reduction < target - tol / 2:
        if hi > 1e6:
            raise ConfigError(f"FLOPs target {target:.2f} is unreachable with the selected points "
                              f"(at most {e_hi.flops_reduction:.3f} at the min_keep floor)")
        lo, e_lo, hi = hi, e_hi, hi * 2
        e_hi = fn(hi)
    best = (hi, e_hi)
    for _ in range(max_iter):
        if abs(best[1].flops_reduction - target) <= tol / 2:
            break
        mid = (lo + hi) / 2
        e = fn(mid)
        if e.flops_reduction < target:
            lo = mid
        else:
            hi = mid
        if abs(e.flops_reduction - target) < abs(best[1].flops_reduction - target):
            best = (mid, e)
    return best


def bisect_scale(ev: Evaluator, taus: Mapping[str, float], target: float,
                 tolerance: float = 0.01) -> tuple[float, Evaluation]:
    """The global scale on ``taus`` at which the evaluator's batches reach a mean FLOPs reduction of ``target``
    (within ``tolerance`` / 2, by bisection), and the evaluation there. Works with any :class:`MaskedModel`."""
    return bisect_reduction(lambda s: ev.run(taus, s), target, tolerance)


def _greedy(ev: Evaluator, ladders: dict[str, list[float]], target: float, limit: int) -> dict[str, float]:
    level = {n: -1 for n in ladders}  # -1 = tau 0 (only exact zeros pruned)

    def taus_at(lv: Mapping[str, int]) -> dict[str, float]:
        return {n: (ladders[n][i] if i >= 0 else 0.0) for n, i in lv.items()}

    cur = ev.run(taus_at(level), limit=limit)
    step = 0
    heap: list[tuple[float, int, str]] = []

    def score(n: str) -> tuple[float, Evaluation] | None:
        while level[n] + 1 < len(ladders[n]):
            trial = dict(level)
            trial[n] += 1
            e = ev.run(taus_at(trial), limit=limit)
            gain = e.flops_reduction - cur.flops_reduction
            if gain > 1e-9:
                return (e.loss - cur.loss) / gain, e
            level[n] += 1  # this rung saves nothing on its own: skip it
        return None

    for n in ladders:
        s = score(n)
        if s is not None:
            heapq.heappush(heap, (s[0], step, n))
    while heap and cur.flops_reduction < target:
        s0, stamp, n = heapq.heappop(heap)
        if stamp != step:
            s = score(n)
            if s is not None:
                heapq.heappush(heap, (s[0], step, n))
            continue
        level[n] += 1
        step += 1
        cur = ev.run(taus_at(level), limit=limit)
        log.debug("greedy step %d: %s -> rung %d, reduction %.3f loss %.4f", step, n, level[n],
                  cur.flops_reduction, cur.loss)
        s = score(n)
        if s is not None:
            heapq.heappush(heap, (s[0], step, n))
    return taus_at(level)


def calibrate(
    model: nn.Module,
    points: PointReport,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    cfg: CalibrationConfig,
    selected: Sequence[str] | None = None,
    cv: Mapping[str, float] | None = None,
    model_name: str = "model",
    preprocessing: Preprocessing | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Plan:
    """Choose thresholds for the ``selected`` points (default: all) so the calibration split's mean FLOPs
    reduction is ``cfg.target`` (+- ``cfg.tolerance``) at the highest accuracy the search finds. ``progress``:
    one dict per evaluation (see :class:`Evaluator`). The plan records the fingerprint of the weights."""
    t0 = time.perf_counter()
    names = list(selected) if selected is not None else points.names()
    if not names:
        raise ConfigError("no prune points selected for calibration")
    masked = MaskedModel(model, points, {n: 0.0 for n in names}, cfg.thresholds)
    ev = Evaluator(masked, batches, progress)
    try:
        masked.enabled = False
        dense_top1 = score_batches(model, batches).top1
        masked.enabled = True
        ev.search = "shared"

        def shared_fn(t: float) -> Evaluation:
            return ev.run({n: t for n in names})

        tau, shared = bisect_reduction(shared_fn, cfg.target, cfg.tolerance)
        results = {"shared": {"taus": {n: tau for n in names}, "top1": shared.top1,
                              "flops_reduction": shared.flops_reduction}}
        chosen = "shared"
        reason = "shared search requested (one tau for every point, bisection)"
        if cfg.search == "greedy":
            masked.enabled = False
            ladders = _ladders(model, points, names, batches, cfg)
            masked.enabled = True
            ev.search = "greedy"
            taus = _greedy(ev, ladders, cfg.target, cfg.search_images)
            scale, g = bisect_reduction(lambda s: ev.run(taus, s), cfg.target, cfg.tolerance)
            results["greedy"] = {"taus": {n: t * scale for n, t in taus.items()}, "top1": g.top1,
                                 "flops_reduction": g.flops_reduction}
            on_target = abs(g.flops_reduction - cfg.target) <= cfg.tolerance
            if g.top1 >= shared.top1 and on_target:
                chosen = "greedy"
                reason = (f"greedy scored {g.top1:.4f} >= shared {shared.top1:.4f} on the calibration split at "
                          f"reduction {g.flops_reduction:.3f}")
            elif not on_target:
                reason = (f"greedy missed the target ({g.flops_reduction:.3f} vs {cfg.target:.3f} +- "
                          f"{cfg.tolerance}); shared kept ({shared.top1:.4f})")
            else:
                reason = (f"shared scored {shared.top1:.4f} > greedy {g.top1:.4f} on the calibration split "
                          f"(kept as the better of the two)")
        final = results[chosen]["taus"]
        if cfg.bn_recalibration:
            masked.set_taus(final, 1.0)
            ev.search = "bn_recalibration"
            n_bn = recalibrate_batchnorm(masked, batches)
            scale, e = bisect_reduction(lambda s: ev.run(final, s), cfg.target, cfg.tolerance)
            final = {n: t * scale for n, t in final.items()}
            results["bn_recalibrated"] = {"taus": final, "top1": e.top1, "flops_reduction": e.flops_reduction,
                                          "batchnorm_layers": n_bn, "scale": scale}
            chosen = "bn_recalibrated"
            reason += "; then BatchNorm statistics re-estimated under the masks (--bn-recal)"
            log.info("BatchNorm statistics re-estimated under the masks (%d layers): top1 %.4f at %.3f",
                     n_bn, e.top1, e.flops_reduction)
        curve = []
        ev.search = "curve"
        for s in cfg.curve_scales:
            e = ev.run(final, s)
            curve.append({"scale": s, "flops_reduction": e.flops_reduction, "top1": e.top1})
    finally:
        masked.remove()
    calibration = {
        "search": cfg.search, "chosen": chosen, "reason": reason, "dense_top1": dense_top1,
        "images": sum(len(y) for _, y in batches),
        "tolerance": cfg.tolerance, "evaluations": ev.count, "seconds": time.perf_counter() - t0,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "taus"} for k, v in results.items()},
    }
    log.info("calibrated %d points to target %.2f: %s search, top1 %.4f at reduction %.3f (%d evaluations)",
             len(names), cfg.target, chosen, results[chosen]["top1"], results[chosen]["flops_reduction"], ev.count)
    return Plan(
        model_name=model_name, fingerprint=points.fingerprint(), points=Plan.signature(points),
        taus=dict(final), thresholds=cfg.thresholds, target=cfg.target,
        cv={n: float(v) for n, v in (cv or {}).items()}, curve=tuple(curve), calibration=calibration,
        preprocessing=preprocessing or Preprocessing(), weights=weights_fingerprint(model),
    )


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Re-estimate the running mean/var of every BatchNorm in ``net`` (e.g. a :class:`MaskedModel`, so with its
    masks applied) as the plain average over ``batches``; returns the number of BatchNorm layers reset."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    was_training = net.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    try:
        net.train()
        for x, _ in batches:
            net(x)
    finally:
        for m, mo in zip(bns, momenta, strict=True):
            m.momentum = mo
        net.train(was_training)
    return len(bns)
