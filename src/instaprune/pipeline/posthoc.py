"""The post-hoc method as one sequence (docs/method.md): decay fine-tune -> calibrate -> prune-aware phase ->
recalibrate. The CLI's ``train``, the demo and the studies all call :func:`run_posthoc`; what differs between
them (learning rates, the controller, output files) is in its arguments, not in copies of the sequence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from instaprune.core.config import ConfigMixin, check_fields
from instaprune.core.distributed import current_env
from instaprune.core.errors import ConfigError
from instaprune.data.datasets import ImageSet
from instaprune.method.analysis import SaliencyStats
from instaprune.method.calibration import SEARCHES, CalibrationConfig
from instaprune.method.masked import MaskedModel
from instaprune.method.plan import Plan
from instaprune.method.points import PointReport
from instaprune.method.prune_aware import PruneAwareConfig, TargetController
from instaprune.pipeline.stages import LoadedModel, calibrate_plan
from instaprune.training.loop import TrainConfig, TrainResult, train

__all__ = ["PosthocSchedule", "PosthocResult", "run_posthoc"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PosthocSchedule(ConfigMixin):
    """What follows the decay fine-tune. ``prune_aware_epochs`` with the calibrated masks on (0: calibrate once
    and stop), at ``prune_aware_lr`` (None: the fine-tune's lr / 10) and feature-decay ``prune_aware_lam``;
    ``prune_aware_control``: hold the training batches' FLOPs reduction at the target
    (:class:`~instaprune.method.prune_aware.TargetController`, its ramp ``prune_aware_ramp``);
    ``start_search``: the search of the calibration the phase starts from (None: ``shared`` with the controller,
    whose scale follows the target anyway, else the calibration's own search)."""

    prune_aware_epochs: int = 0
    prune_aware_lr: float | None = None
    prune_aware_lam: float = 0.0
    prune_aware_control: bool = True
    prune_aware_ramp: float = PruneAwareConfig.ramp
    start_search: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.prune_aware_epochs < 0:
            raise ConfigError(f"prune-aware epochs must be >= 0, got {self.prune_aware_epochs}")
        if self.prune_aware_lr is not None and not self.prune_aware_lr > 0:
            raise ConfigError(f"prune-aware lr must be > 0, got {self.prune_aware_lr}")
        if not self.prune_aware_lam >= 0:
            raise ConfigError(f"prune-aware lambda must be >= 0, got {self.prune_aware_lam}")
        if self.start_search is not None and self.start_search not in SEARCHES:
            raise ConfigError(f"start search must be one of {', '.join(SEARCHES)}, got {self.start_search!r}")
        PruneAwareConfig(0.5, self.prune_aware_ramp)  # validates the ramp


@dataclass
class PosthocResult:
    finetune: TrainResult
    plan: Plan | None = None  # the final (re)calibrated plan; None without a calibration
    stats: SaliencyStats | None = None
    start_plan: Plan | None = None  # the plan the prune-aware phase started from
    prune_aware: TrainResult | None = None
    timings: dict[str, float] = field(default_factory=dict)


def run_posthoc(
    lm: LoadedModel,
    points: PointReport,
    train_set: ImageSet,
    finetune: TrainConfig,
    calib: ImageSet | None = None,
    calibration: CalibrationConfig | None = None,
    schedule: PosthocSchedule = PosthocSchedule(),
    selection: str | Sequence[str] = "all",
    out_dir: str | Path | None = None,
    val: ImageSet | None = None,
    resume: str | Path | None = None,
    teacher: nn.Module | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    stage: Callable[[str], None] | None = None,
    calibration_progress: Callable[[dict[str, Any]], None] | None = None,
    mask_points: PointReport | None = None,
) -> PosthocResult:
    """Fine-tune ``lm.model`` with ``finetune`` (its feature decay), then, with ``calibration``, calibrate on
    ``calib``; with ``schedule.prune_aware_epochs``, train with the masks on and recalibrate on the points the
    phase trained with (selecting anew would mask points the network never learnt to lose).

    ``out_dir``: training files (fine-tune in it, the phase in ``prune_aware/`` with ``start_plan.json``);
    ``val``: per-epoch validation split; ``progress``: per training step (dicts with ``phase``); ``stage``: a
    label before each stage; ``calibration_progress``: one dict per calibration evaluation; ``mask_points``: the
    points calibrated and masked (default ``points``; feature decay always sees ``points``). Returns the plans
    and training results; the caller saves the final plan."""
    say = stage or (lambda s: None)
    out = Path(out_dir) if out_dir is not None else None
    timings: dict[str, float] = {}

    def phase_progress(name: str) -> Callable[[dict[str, Any]], None] | None:
        if progress is None:
            return None
        return lambda d: progress({**d, "phase": name})

    say("fine-tuning with feature decay")
    t = time.perf_counter()
    res = train(lm.model, train_set, finetune, points, lm.pre, out, val, resume, progress=phase_progress("finetune"),
                teacher=teacher)
    timings["train_decay_s"] = time.perf_counter() - t
    result = PosthocResult(res, timings=timings)
    if calibration is None:
        return result
    if calib is None:
        raise ConfigError("calibration needs a calibration split (a holdout)")
    points = mask_points if mask_points is not None else points
    say("analysing and calibrating")
    lm.model.eval()
    control = schedule.prune_aware_control and schedule.prune_aware_epochs > 0
    search = schedule.start_search or ("shared" if control else calibration.search)
    t = time.perf_counter()
    start_cfg = calibration if search == calibration.search else replace(calibration, search=search)
    plan, stats = calibrate_plan(lm, points, calib, start_cfg, selection, progress=calibration_progress)
    timings["calibrate_s"] = time.perf_counter() - t
    result.plan, result.stats = plan, stats
    if not schedule.prune_aware_epochs:
        return result
    result.start_plan = plan
    if out is not None and current_env().is_main:
        plan.save(out / "prune_aware" / "start_plan.json")  # the points and thresholds the phase starts from
    say("prune-aware fine-tuning")
    t = time.perf_counter()
    masked = MaskedModel(lm.model, points, plan.taus, plan.thresholds)
    ctl = TargetController(masked, PruneAwareConfig(calibration.target, schedule.prune_aware_ramp)) if control else None
    pa = replace(finetune, epochs=schedule.prune_aware_epochs,
                 lr=schedule.prune_aware_lr if schedule.prune_aware_lr is not None else finetune.lr * 0.1,
                 decay=replace(finetune.decay, lam=schedule.prune_aware_lam))
    try:
        pa_out = None if out is None else out / "prune_aware"
        result.prune_aware = train(lm.model, train_set, pa, points, lm.pre, pa_out, val, resume, masked=masked,
                                   progress=phase_progress("prune_aware"), teacher=teacher, controller=ctl)
    finally:
        masked.remove()
    lm.model.eval()
    timings["prune_aware_s"] = time.perf_counter() - t
    say("recalibrating")
    t = time.perf_counter()
    result.plan, result.stats = calibrate_plan(lm, points, calib, calibration, plan.selected,
                                               progress=calibration_progress)
    timings["recalibrate_s"] = time.perf_counter() - t
    log.info("post-hoc sequence done: %s", {k: round(v, 1) for k, v in timings.items()})
    return result
