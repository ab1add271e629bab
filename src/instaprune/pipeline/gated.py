"""The gated method's sequence, written once for the CLI, the demo and the studies (docs/method.md, section 9-10):

    [slim statically to part of the target] -> discover gates -> attach predictors (open) -> budget for the FLOPs
    target -> warm-up: fit the predictors to the saliency with the network frozen -> train under the masks (kept
    fraction ramped from 1.0, optional distillation from the dense starting model) -> thresholds calibrated on the
    held-out split (threshold selection) -> plan.

Nothing here prints; progress goes to the ``progress`` callable and the log.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from instaprune.core.distributed import current_env
from instaprune.core.errors import ConfigError
from instaprune.core.io import atomic_write_json
from instaprune.data.datasets import ImageSet, iterate_batches
from instaprune.method.flops import flops_reduction, layer_macs
from instaprune.method.gates import (
    ALLOCATIONS,
    GateConfig,
    GatedModel,
    GatePlan,
    GateRamp,
    allocate_keep,
    attach_predictors,
    channel_usage,
    find_gates,
    fit_predictors,
    uniform_keep_for_target,
)
from instaprune.method.plan import Plan, weights_fingerprint
from instaprune.method.scoring import score_batches
from instaprune.pipeline.stages import LoadedModel, cached_batches, discover
from instaprune.training.loop import CHECKPOINT_NAME, TrainConfig, train

__all__ = ["STATIC_SHARE", "GateSchedule", "GatedRun", "prepare_gates", "train_gated", "train_static",
           "calibrate_gates", "recalibrate_gates", "example_input", "slim_gated_off", "slim_off_plan"]

log = logging.getLogger(__name__)

#: the share of the FLOPs target slimmed statically (L1) before the gates cut the rest, unless
#: ``GateSchedule.static_target`` says otherwise (study 2, holdout top-1 at 60%, 6 epochs, value gates: ResNet-56
#: 0.9176 with half vs 0.9076 with none; ResNet-20 0.8698 vs 0.8704, a tie, and 0.8626 with three quarters)
STATIC_SHARE = 0.5


@dataclass(frozen=True)
class GateSchedule:
    """How the gated method trains: ``target`` mean FLOPs reduction (overhead included, against the dense
    starting model); ``ramp`` fraction of training over which the kept fraction falls from 1.0 to its budget
    (cosine); ``warmup_batches`` batches of predictor fitting with the network frozen before training (0 = off);
    ``static_target``: slim statically (L1 filter pruning) to this reduction first, then gate the rest (None:
    :data:`STATIC_SHARE` of ``target``; 0 = gates only; the value used: :attr:`static_reduction`);
    ``allocation``: per-gate budgets ``uniform`` or ``greedy`` (searched after the warm-up on ``allocation_images``
    held-out images, kept only if it beats uniform there);
    ``include`` / ``exclude``: fnmatch patterns of gates;
    ``slim_off``: after training, channels kept for fewer than this fraction of the held-out images are removed
    physically and the gates re-budgeted to the target on what remains (:func:`slim_gated_off`; 0 = off)."""

    target: float = 0.6
    ramp: float = 0.3
    warmup_batches: int = 50
    warmup_lr: float = 0.01
    static_target: float | None = None
    allocation: str = "uniform"
    allocation_images: int = 1024
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    slim_off: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.slim_off < 1.0:
            raise ConfigError(f"slim_off (usage below which a gated channel is removed) must be in [0, 1), got "
                              f"{self.slim_off}")
        if not 0.0 < self.target < 1.0:
            raise ConfigError(f"FLOPs target must be in (0, 1), got {self.target}")
        if not 0.0 <= self.ramp <= 1.0:
            raise ConfigError(f"gate ramp must be in [0, 1], got {self.ramp}")
        if self.warmup_batches < 0 or not self.warmup_lr > 0:
            raise ConfigError(f"gate warm-up needs batches >= 0 and lr > 0, got {self.warmup_batches}, "
                              f"{self.warmup_lr}")
        if self.allocation not in ALLOCATIONS or self.allocation_images < 1:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)} with allocation_images >= 1")
        if self.static_target is not None and not 0.0 <= self.static_target < self.target:
            raise ConfigError(f"static_target must be in [0, target), got {self.static_target}")

    @property
    def static_reduction(self) -> float:
        """The FLOPs reduction slimmed statically before the gates: ``static_target``, else the default share."""
        return STATIC_SHARE * self.target if self.static_target is None else self.static_target

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GatedRun:
    gated: GatedModel
    plan: GatePlan
    dense_macs: int
    metrics: dict[str, Any]


def example_input(lm: LoadedModel) -> torch.Tensor:
    return torch.zeros(1, len(lm.pre.mean), lm.pre.input_size, lm.pre.input_size)


def prepare_gates(lm: LoadedModel, cfg: GateConfig, schedule: GateSchedule, static: dict[str, Any] | None = None,
                  dense_macs: int | None = None) -> tuple[GatedModel, GatePlan]:
    """Slim (``schedule.static_reduction``, or the given ``static`` plan), discover gates, attach open predictors
    and choose the uniform per-gate budget for the target. Replaces ``lm.model`` when it slims."""
    from instaprune.baselines.static import StaticPlan, find_pairs, slim, static_plan

    x = example_input(lm)
    dense = dense_macs or int(sum(layer_macs(lm.model, x).values()))
    if static is None and schedule.static_reduction > 0:
        sp = static_plan(lm.model, x, schedule.static_reduction)
        static = sp.to_dict()
        lm.model = slim(lm.model, sp)
        log.info("slimmed statically to %.3f reduction before gating", sp.reduction)
    elif static is not None:
        lm.model = slim(lm.model, StaticPlan.from_dict(static, find_pairs(lm.model, x)[0]))
    gates = find_gates(lm.model, x, schedule.include, schedule.exclude)
    if not len(gates):
        raise ConfigError("this model has no gateable tensors (see 'instaprune points --gates')")
    attach_predictors(lm.model, gates, cfg)
    probe = GatedModel(lm.model, gates, cfg, dense_macs=dense)
    overhead = probe.overhead_macs()
    probe.remove()
    keep = uniform_keep_for_target(gates, schedule.target, dense, cfg.min_keep, overhead)
    plan = GatePlan(cfg, gates.sites, dict.fromkeys(gates.names(), keep), {}, dense, static)
    gated = GatedModel(lm.model, gates, cfg, keep=plan.keep, dense_macs=dense)
    return gated, plan


def _gated_plan(lm: LoadedModel, gates: GatePlan, target: float, calibration: dict[str, Any]) -> Plan:
    """The plan of gated weights ``lm.model`` (points, fingerprints) holding ``gates``."""
    points = discover(lm.model, lm.pre)
    return Plan(model_name=lm.name, fingerprint=points.fingerprint(), points=Plan.signature(points), taus={},
                target=target, calibration=calibration, preprocessing=lm.pre, gates=gates,
                weights=weights_fingerprint(lm.model))


def train_gated(lm: LoadedModel, data: ImageSet, val: ImageSet | None, cfg: GateConfig, schedule: GateSchedule,
                train_cfg: TrainConfig, out_dir: str | Path | None, resume: str | None = "auto",
                progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[Plan, dict[str, Any]]:
    """The whole gated sequence on ``lm`` (trained in place); returns the plan and the run's metrics.

    The model is slimmed statically to ``schedule.static_reduction`` first (unset: :data:`STATIC_SHARE` of the
    target), and training distils from a copy of the dense starting model with weight ``train_cfg.distill`` (unset:
    :data:`~instaprune.training.loop.DISTILL_WITH_TEACHER`; 0 = off). Resumable: the warm-up is skipped when
    ``out_dir`` already holds a training checkpoint (the predictors' weights are in it); ``out_dir=None`` writes
    nothing (no checkpoints: not resumable)."""
    if schedule.slim_off > 0 and val is None:
        raise ConfigError("slim-off measures channel usage on the held-out split: it needs one (--holdout)")
    t0 = time.perf_counter()
    out = Path(out_dir) if out_dir is not None else None
    train_cfg = replace(train_cfg, distill=train_cfg.distill_weight(teacher=True))  # recorded as used
    schedule = replace(schedule, static_target=schedule.static_reduction)
    teacher = copy.deepcopy(lm.model).eval() if train_cfg.distill else None
    gated, gplan = prepare_gates(lm, cfg, schedule)
    metrics: dict[str, Any] = {"gates": len(gplan.sites), "keep": next(iter(gplan.keep.values())),
                               "schedule": schedule.to_dict(), "gate_config": cfg.to_dict(),
                               "static": gplan.static is not None}
    resuming = resume is not None and out is not None and (out / CHECKPOINT_NAME).is_file()
    if schedule.warmup_batches and not resuming:
        # every rank fits the same predictors on the same global batches (N processes = 1 with the global batch)
        wb = train_cfg.batch_size * current_env().world_size
        batches = [(x, y) for x, y, _ in iterate_batches(data, wb, lm.pre.mean, lm.pre.std)]
        batches = batches[: schedule.warmup_batches]
        metrics["warmup_fit_loss"] = fit_predictors(gated, batches, epochs=1, lr=schedule.warmup_lr)
        log.info("gate warm-up: fit loss %s", metrics["warmup_fit_loss"])
    if schedule.allocation != "uniform" and val is not None and not resuming:
        held = cached_batches(val, lm.pre)
        n, chosen = 0, []
        for x, y in held:  # the first allocation_images held-out images
            chosen.append((x, y))
            n += len(y)
            if n >= schedule.allocation_images:
                break
        keep, metrics["allocation"] = allocate_keep(gated, chosen, schedule.target, schedule.allocation)
        gplan = replace(gplan, keep=keep)
        if out is not None:
            atomic_write_json(out / "allocation.json", {**metrics["allocation"], "keep": keep})
    elif out is not None and resuming and (out / "allocation.json").is_file():  # budgets the interrupted run had
        keep = json.loads((out / "allocation.json").read_text())["keep"]
        gplan = replace(gplan, keep={str(k): float(v) for k, v in keep.items()})
    ramp = GateRamp(gated, gplan.keep, schedule.ramp)
    points = discover(lm.model, lm.pre)
    res = train(lm.model, data, train_cfg, points, lm.pre, out, val, resume, masked=gated, progress=progress,
                teacher=teacher, controller=ramp)
    metrics["history"] = res.history
    metrics["train_seconds"] = res.seconds
    metrics.update(world_size=res.world_size, global_batch=res.global_batch, resumed_from=res.resumed_from)
    plan_g = gplan
    if val is not None:
        plan_g, cal = calibrate_gates(gated, gplan, cached_batches(val, lm.pre), schedule.target)
        metrics["calibration"] = cal
    gated.remove()
    if schedule.slim_off > 0 and val is not None:  # section 10: the channels the gates (nearly) never keep go
        metrics["calibration_before_slim_off"] = metrics.pop("calibration")
        plan_g, metrics["slim_off"] = slim_gated_off(lm, plan_g, cached_batches(val, lm.pre), schedule.target,
                                                     schedule.slim_off)
        metrics["calibration"] = metrics["slim_off"]["calibration"]
    plan = _gated_plan(lm, plan_g, schedule.target, metrics.get("calibration", {}))
    metrics["seconds"] = time.perf_counter() - t0
    return plan, metrics


def train_static(lm: LoadedModel, data: ImageSet, val: ImageSet | None, static_target: float,
                 train_cfg: TrainConfig, out_dir: str | Path, resume: str | None = "auto",
                 progress: Callable[[dict[str, Any]], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The static baseline as one sequence: L1 filter pruning of ``lm.model`` to ``static_target`` (channels
    really removed: ``lm.model`` is replaced by the slim model), then training, distilled from the dense starting
    model as in :func:`train_gated`. Returns the static plan (to store with the weights) and metrics.
    Resumable: the plan is a pure function of the starting weights, so a resumed run slims identically."""
    from instaprune.baselines.static import slim, static_plan

    if not 0.0 < static_target < 1.0:
        raise ConfigError(f"static target must be in (0, 1), got {static_target}")
    t0 = time.perf_counter()
    train_cfg = replace(train_cfg, distill=train_cfg.distill_weight(teacher=True))  # recorded as used
    teacher = copy.deepcopy(lm.model).eval() if train_cfg.distill else None
    sp = static_plan(lm.model, example_input(lm), static_target)
    lm.model = slim(lm.model, sp)
    points = discover(lm.model, lm.pre)
    res = train(lm.model, data, train_cfg, points, lm.pre, Path(out_dir), val, resume, progress=progress,
                teacher=teacher)
    metrics = {"method": "static L1-norm filter pruning (Li et al. 2017), block-internal channels, slimmed",
               "static_target": static_target, "flops_reduction": sp.reduction, "macs": sp.macs,
               "dense_macs": sp.dense_macs, "history": res.history, "seconds": time.perf_counter() - t0}
    return sp.to_dict(), metrics


def recalibrate_gates(lm: LoadedModel, gates: GatePlan, calib: ImageSet, target: float,
                      batch_size: int = 256) -> Plan:
    """A gated model (trained, predictors loaded) calibrated to another FLOPs ``target`` on ``calib`` without
    training: top-k gates get the uniform keep fraction of the new target; threshold gates keep their per-gate
    shape and one shared scale is bisected to the target."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"FLOPs target must be in (0, 1), got {target}")
    found = find_gates(lm.model, example_input(lm))
    gated = GatedModel(lm.model, gates.report(found), gates.config, keep=gates.keep, taus=gates.taus or None,
                       dense_macs=gates.dense_macs or None)
    try:
        if gates.config.selection == "topk":
            keep = uniform_keep_for_target(gated.gates, target, gated.dense_macs, gates.config.min_keep,
                                           gated.overhead_macs())
            gates = replace(gates, keep=dict.fromkeys(gates.keep, keep))
        new, cal = calibrate_gates(gated, gates, cached_batches(calib, lm.pre, batch_size), target)
    finally:
        gated.remove()
    return _gated_plan(lm, new, target, cal)


def slim_off_plan(lm: LoadedModel, gates: GatePlan, calib: ImageSet, target: float, usage: float,
                  batch_size: int = 256) -> Plan:
    """:func:`slim_gated_off` on a trained gated checkpoint (``lm``, its ``gates`` plan) as a complete plan for the
    slim weights ``lm.model`` now holds (``calibration`` records the static part and what was removed)."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"FLOPs target must be in (0, 1), got {target}")
    new, info = slim_gated_off(lm, gates, cached_batches(calib, lm.pre, batch_size), target, usage)
    cal = {**info["calibration"], "static_flops_reduction": info["static_flops_reduction"],
           "slim_off": {k: v for k, v in info.items() if k != "calibration"}}
    return _gated_plan(lm, new, target, cal)


def slim_gated_off(lm: LoadedModel, plan: GatePlan, calib: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   target: float | None = None, usage: float = 0.01) -> tuple[GatePlan, dict[str, Any]]:
    """Section 10 with the gates' own static part: the channels a trained gated model (``lm.model`` with its
    predictors, ``plan``) keeps for fewer than ``usage`` of the ``calib`` images are removed physically (the
    producer's filters, the BN channels, the consumer's inputs and the predictor's output rows), then the gates
    work on what remains: top-k keeps the same k channels per image (so on ``calib`` the outputs are unchanged
    when no removed channel was ever kept, and the MACs are the same), thresholds keep their taus and, with
    ``target``, one shared scale is re-bisected on ``calib``. (A uniform top-k re-budget to ``target`` was
    measured and rejected: on the study's ResNet-20 it took 8% of every gate's channels, the always-kept ones
    included, and fell from 0.870 to 0.619 on the holdout.) ``lm.model`` is replaced by the slim model.

    Slims the gates whose tensor is a block's ``conv1 -> bn1 -> conv2`` inner tensor (the static baseline's
    pairs) with ``conv1`` as the only producer; others stay gated at full width. Every gate keeps at least its
    floor and its top-k count. Refused (ConfigError) if slimming would change a predictor's input width."""
    from instaprune.baselines.static import StaticPlan, find_pairs, slim
    from instaprune.method.gates import GATES_ATTR, _key, gated_from_plan

    if not 0.0 < usage < 1.0:
        raise ConfigError(f"slim-off usage must be in (0, 1), got {usage}")
    x = example_input(lm)
    model = lm.model.eval()
    found = find_gates(model, x)
    gated = gated_from_plan(model, found, plan)
    try:
        used = channel_usage(gated, calib)
        report = gated.gates
    finally:
        gated.remove()
    pairs, cur_dense = find_pairs(model, x)
    by_conv2 = {p.conv2: p for p in pairs}
    masks: dict[str, torch.Tensor] = {}
    removed: dict[str, int] = {}
    skipped: dict[str, str] = {}
    cfg = plan.config
    for site in report:
        p = by_conv2.get(site.name)
        if p is None or site.producers != (p.conv1,):
            skipped[site.name] = "not a block's conv1 -> bn1 -> conv2 tensor"
            continue
        u = used[site.name]
        need = cfg.floor(site.channels)
        if cfg.selection == "topk":
            need = max(need, min(site.channels, round(plan.keep[site.name] * site.channels)))
        keep = u >= usage
        if int(keep.sum()) < need:  # the most used of the removed channels come back up to the floor / k
            order = torch.argsort(u, descending=True, stable=True)
            keep[order[:need]] = True
        if bool(keep.all()):
            continue
        masks[p.block] = keep
        removed[site.name] = int((~keep).sum())
    new_model = slim(model, StaticPlan(cur_dense, pairs, masks))
    bank = getattr(new_model, GATES_ATTR)
    for p in pairs:
        if p.block not in masks:
            continue
        idx = masks[p.block].nonzero().flatten()
        fc = bank[_key(p.conv2)].fc
        new_fc = torch.nn.Linear(fc.in_features, len(idx))
        new_fc.weight.data, new_fc.bias.data = fc.weight.data[idx].clone(), fc.bias.data[idx].clone()
        bank[_key(p.conv2)].fc = new_fc
    new_found = find_gates(new_model, x).subset([s.name for s in report])
    widths = {s.name: s.in_channels for s in report}
    changed = [s.name for s in new_found if s.in_channels != widths[s.name]]
    if changed:
        raise ConfigError(f"slim-off would change the input width of the predictors of {', '.join(changed[:3])} "
                          "(a slimmed tensor feeds another gate's predictor): not supported for this model")
    # the static part in the original model's channel indices (composed with an earlier static plan)
    prev = plan.static or {}
    keep_idx = {b: list(v) for b, v in prev.get("keep", {}).items()}
    channels = dict(prev.get("channels", {})) or {p.block: p.channels for p in pairs}
    for p in pairs:
        channels.setdefault(p.block, p.channels)
        if p.block in masks:
            base = keep_idx.get(p.block, list(range(p.channels)))
            keep_idx[p.block] = [base[i] for i in masks[p.block].nonzero().flatten().tolist()]
    dense_macs = plan.dense_macs or int(cur_dense)
    saved = sum((channels[p.block] - len(keep_idx[p.block])) * p.macs_per_channel for p in pairs
                if p.block in keep_idx)
    static = {"dense_macs": dense_macs, "macs": dense_macs - saved, "flops_reduction": saved / dense_macs,
              "keep": keep_idx, "channels": channels}
    old_c = {s.name: s.channels for s in report}
    new_c = {s.name: s.channels for s in new_found}
    keep_new = {}  # the same k channels per image on the narrower tensors
    for n, k in plan.keep.items():
        kk = max(cfg.floor(old_c[n]), min(old_c[n], round(k * old_c[n])))
        keep_new[n] = min(1.0, kk / new_c[n])
    new_plan = replace(plan, sites=tuple(new_found.sites), keep=keep_new, static=static)
    lm.model = new_model
    g2 = gated_from_plan(new_model, new_found, new_plan)
    try:
        if target is None:
            top1, red = _run(g2, calib)
            cal = {"selection": cfg.selection, "top1": top1, "flops_reduction": red}
        else:  # top-k: checked as it is (same k); thresholds: one shared scale re-bisected
            new_plan, cal = calibrate_gates(g2, new_plan, calib, target)
    finally:
        g2.remove()
    info = {"usage": usage, "removed": removed, "not_slimmed": skipped,
            "static_flops_reduction": static["flops_reduction"], "calibration": cal}
    log.info("slim-off: %d channels removed (static FLOPs reduction %.3f); gates re-budgeted: %s",
             sum(removed.values()), static["flops_reduction"], cal)
    return new_plan, info


@torch.no_grad()
def _run(gated: GatedModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    macs = [0.0]

    def add_macs(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
        macs[0] += float(gated.instance_macs().sum())

    sc = score_batches(gated, batches, each=add_macs)
    return sc.top1, flops_reduction(macs[0] / sc.seen, gated.dense_macs, gated.overhead_macs())


def calibrate_gates(gated: GatedModel, plan: GatePlan, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    target: float, tolerance: float = 0.01) -> tuple[GatePlan, dict[str, Any]]:
    """Held-out check of a top-k plan, or for threshold selection: the running thresholds as the per-gate shape,
    one shared scale bisected so the held-out mean FLOPs reduction hits ``target``."""
    if plan.config.selection == "topk":
        gated.set_keep(plan.keep)
        top1, red = _run(gated, batches)
        return plan, {"selection": "topk", "top1": top1, "flops_reduction": red}
    from instaprune.method.calibration import Evaluation, bisect_reduction

    gated.running_taus = False
    taus = dict(gated.taus)

    def at(scale: float) -> Evaluation:
        gated.scale = scale
        top1, red = _run(gated, batches)
        return Evaluation(top1, float("nan"), red)

    scale, e = bisect_reduction(at, target, tolerance)
    top1, red = e.top1, e.flops_reduction
    gated.scale = 1.0
    new = replace(plan, taus={n: t * scale for n, t in taus.items()})
    gated.taus = dict(new.taus)
    return new, {"selection": "threshold", "top1": top1, "flops_reduction": red, "scale": scale}
