"""``instaprune demo``: the whole method end to end on a generated dataset, no files and no downloads.

1. generate train / calibration / test images whose difficulty is known (``demo_data``);
2. train a small residual CNN twice with the same recipe: without feature decay (the baseline) and with it;
3. analyse saliencies (CV per point) and calibrate per-image thresholds on the calibration split;
4. evaluate dense and dynamic on the test split, and write metrics.json, report.md and plots.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from instaprune.core.config import Preprocessing
from instaprune.core.errors import ConfigError
from instaprune.data.datasets import ImageSet
from instaprune.data.synthetic import RECIPE, DemoData, DemoRecipe, make_splits, mean_std
from instaprune.demo.gated import DemoGates, gated_branch
from instaprune.evaluation.report import spearman
from instaprune.method.calibration import CalibrationConfig
from instaprune.method.regularizer import FeatureDecayConfig
from instaprune.method.thresholds import ThresholdConfig
from instaprune.models.tiny_resnet import tiny_resnet
from instaprune.pipeline.posthoc import PosthocSchedule, run_posthoc
from instaprune.pipeline.stages import LoadedModel, discover, evaluate_and_report
from instaprune.training.loop import TrainConfig, evaluate_top1, train

__all__ = ["DEMO_RECIPE", "DEMO_TARGET", "DemoSchedule", "run_demo"]

log = logging.getLogger(__name__)

DEMO_TARGET = 0.42
DEMO_METHODS = ("gates", "posthoc")
#: the demo's data/training recipe (16x16 images keep the whole run within 3 minutes on 2 cores)
DEMO_RECIPE = RECIPE


@dataclass(frozen=True)
class DemoSchedule:
    """How the demo trains: both models share a plain prefix of ``recipe.epochs`` epochs (the "well-trained" model the
    paper fine-tunes), then branch with the *same* recipe and seed: ``finetune_epochs`` at ``finetune_lr`` and
    ``prune_aware_epochs`` at ``prune_aware_lr``. The baseline branch trains plainly; the method branch adds
    feature decay in the fine-tune, is calibrated, and trains its last epochs with the calibrated masks applied
    (penalty off) before it is recalibrated. So baseline and method get exactly the same number of epochs."""

    finetune_epochs: int = 4
    finetune_lr: float = 0.1
    prune_aware_epochs: int = 4
    prune_aware_lr: float = 0.05
    distill: float = 0.0  # method branch learns also from the baseline branch's soft targets (0 = off)
    threshold_mode: str = "max"
    search: str = "greedy"
    search_images: int = 512
    ladder_steps: int = 8
    prune_aware_control: bool = False  # hold the FLOPs target while masks are on (instaprune.prune_aware)
    prune_aware_ramp: float = 0.3
    #: fnmatch patterns of prune points that are not masked (feature decay still sees every point), e.g.
    #: ``("fc",)``: the classifier's input costs almost no MACs
    exclude: tuple[str, ...] = ()
    #: the method branch: ``gates`` (predicted gates, :mod:`instaprune.demo.gated`, trained for the same
    #: ``finetune_epochs + prune_aware_epochs``) or ``posthoc`` (the paper's rule, the fields above)
    method: str = "gates"
    gates: DemoGates = field(default_factory=DemoGates)

    def __post_init__(self) -> None:
        if min(self.finetune_epochs, self.prune_aware_epochs) < 0 or self.search_images < 1:
            raise ConfigError(f"demo schedule: epochs must be >= 0 and search_images >= 1, got {self}")
        if self.method not in DEMO_METHODS:
            raise ConfigError(f"demo method must be one of {', '.join(DEMO_METHODS)}, got {self.method!r}")


def _phase(progress: Callable[[dict[str, Any]], None] | None, name: str):
    return None if progress is None else (lambda d: progress({**d, "phase": name}))


def _imageset(d: DemoData) -> ImageSet:
    return ImageSet(d.images, d.labels, d.class_names)


def _train_cfg(r: DemoRecipe, lam: float, seed: int, epochs: int | None = None, lr: float | None = None,
               distill: float = 0.0) -> TrainConfig:
    return TrainConfig(
        epochs=r.epochs if epochs is None else epochs, batch_size=r.batch_size, lr=r.lr if lr is None else lr,
        momentum=r.momentum, nesterov=r.nesterov,
        weight_decay=r.weight_decay, label_smoothing=r.label_smoothing, augment="cifar", augment_pad=r.augment_pad,
        channels_last=r.channels_last, seed=seed, distill=distill,
        decay=FeatureDecayConfig(lam, r.decay_penalty, r.decay_weights),
    )


def run_demo(
    out_dir: str | Path = "instaprune-demo",
    seed: int = 0,
    target: float | None = None,
    recipe: DemoRecipe = DEMO_RECIPE,
    schedule: DemoSchedule = DemoSchedule(),
    progress: Callable[[str], None] | None = None,
    step_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the demo and return its metrics (also written to ``out_dir/metrics.json``). ``progress``: a label
    before each stage; ``step_progress``: every training step (the training loop's dicts, with ``phase``)."""
    t0 = time.perf_counter()
    target = DEMO_TARGET if target is None else target
    say = progress or (lambda stage: None)
    say("generating data")
    tr, ca, te = make_splits(seed, recipe)
    train_set, calib_set, test_set = _imageset(tr), _imageset(ca), _imageset(te)
    mean, std = mean_std(tr)
    pre = Preprocessing(mean, std, recipe.image_size, None, tr.class_names)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(seed)
        return tiny_resnet(len(tr.class_names), recipe.width, blocks=recipe.blocks)

    timings: dict[str, float] = {}
    model = fresh()
    points = discover(model, pre)
    say("pre-training (plain)")
    t = time.perf_counter()
    train(model, train_set, _train_cfg(recipe, 0.0, seed), points, pre,
          progress=_phase(step_progress, "pre-training (plain)"))
    timings["pretrain_s"] = time.perf_counter() - t
    base = copy.deepcopy(model)

    say("training the baseline branch (no feature decay)")
    t = time.perf_counter()
    for name, epochs, lr in (("baseline branch (fine-tune epochs)", schedule.finetune_epochs, schedule.finetune_lr),
                             ("baseline branch (prune-aware epochs)", schedule.prune_aware_epochs,
                              schedule.prune_aware_lr)):
        if epochs:
            train(base, train_set, _train_cfg(recipe, 0.0, seed, epochs, lr), points, pre,
                  progress=_phase(step_progress, name))
    timings["train_baseline_s"] = time.perf_counter() - t
    baseline_top1 = evaluate_top1(base, test_set, pre)
    teacher = base.eval() if schedule.distill > 0 else None

    lm = LoadedModel("tiny_resnet", model, pre, {})
    out = Path(out_dir)
    if schedule.method == "gates":  # the same epochs as the baseline branch, under predicted gates
        say("training the gated branch")
        t = time.perf_counter()
        gates = replace(schedule.gates, epochs=schedule.finetune_epochs + schedule.prune_aware_epochs)
        plan, gm = gated_branch(lm, train_set, calib_set, _train_cfg(recipe, 0.0, seed), target, gates,
                                progress=_phase(step_progress, "gated branch"))
        timings["train_gates_s"] = time.perf_counter() - t
        points, stats = discover(lm.model, pre), None
        before_pa = None
        train_top1 = [h["train_top1"] for h in gm["history"]]
    else:
        plan, stats, points, before_pa, train_top1 = _posthoc_branch(lm, points, train_set, calib_set, recipe,
                                                                     schedule, target, seed, teacher, say,
                                                                     step_progress, timings)
    plan.save(out / "plan.json")

    say("evaluating")
    t = time.perf_counter()
    scales = (0.5, 0.75, 1.0, 1.5, 2.0) if schedule.method == "posthoc" or schedule.gates.selection != "topk" else ()
    extra = {"model": "tiny_resnet", "seed": seed, "method": schedule.method, "recipe": recipe.to_dict(),
             "schedule": asdict(schedule), "calibration_top1_before_prune_aware": before_pa,
             "train_top1_under_masks": train_top1,
             "train_images": len(train_set), "calibration_images": len(calib_set)}
    res = evaluate_and_report(lm, points, test_set, out, plan, baseline_top1, stats, extra,
                              title="instaprune demo", curve_scales=scales)
    return _finish(res, te, timings, t, t0, out)


def _posthoc_branch(lm: LoadedModel, points, train_set: ImageSet, calib_set: ImageSet, recipe: DemoRecipe,
                    schedule: DemoSchedule, target: float, seed: int, teacher, say, step_progress,
                    timings: dict[str, float]):
    """The paper's rule as the method branch: the post-hoc sequence ``instaprune train`` runs."""
    model, pre = lm.model, lm.pre
    cfg = CalibrationConfig(target=target, search=schedule.search,
                            thresholds=ThresholdConfig(schedule.threshold_mode, ThresholdConfig.min_keep),
                            search_images=schedule.search_images, ladder_steps=schedule.ladder_steps)
    # the method branch: the post-hoc sequence, the same function `instaprune train` runs
    res = run_posthoc(
        lm, points, train_set,
        _train_cfg(recipe, recipe.decay_lam, seed, schedule.finetune_epochs, schedule.finetune_lr, schedule.distill),
        calib=calib_set, calibration=cfg,
        schedule=PosthocSchedule(prune_aware_epochs=schedule.prune_aware_epochs,
                                 prune_aware_lr=schedule.prune_aware_lr, prune_aware_lam=0.0,
                                 prune_aware_control=schedule.prune_aware_control,
                                 prune_aware_ramp=schedule.prune_aware_ramp, start_search=schedule.search),
        teacher=teacher, stage=say, progress=step_progress,
        mask_points=discover(model, pre, exclude=schedule.exclude) if schedule.exclude else None,
    )
    plan, stats = res.plan, res.stats
    assert plan is not None
    timings.update(res.timings)
    before = res.start_plan or plan
    before_pa = before.calibration["results"][before.calibration["chosen"]]["top1"]
    if schedule.exclude:
        points = discover(model, pre, exclude=schedule.exclude)
    return plan, stats, points, before_pa, None


def _finish(res, te, timings: dict[str, float], t: float, t0: float, out: Path) -> dict[str, Any]:
    timings["evaluate_s"] = time.perf_counter() - t
    m = res.metrics
    flops = res.per_instance["flops"]
    varies = bool(flops.max() > flops.min())  # top-k gates: every image costs the same, no rank correlation
    m["spearman_difficulty_flops"] = spearman(te.difficulty, flops) if varies else None
    m["spearman_confidence_flops"] = spearman(res.per_instance["dense_confidence"], flops) if varies else None
    from instaprune.evaluation.report import plot_difficulty_vs_flops

    plot_difficulty_vs_flops(out, te.difficulty, flops, 2 * m["dense_macs"], res.per_instance.get("correct"))
    m.update(timings)
    m["seconds"] = time.perf_counter() - t0
    m["torch"] = torch.__version__
    m["threads"] = torch.get_num_threads()
    from instaprune.evaluation.report import write_markdown, write_metrics

    write_metrics(out, m)
    notes = [f"Spearman correlation between generator difficulty and per-image FLOPs: "
             f"{m['spearman_difficulty_flops']:+.3f} (positive: harder images cost more)." if varies else
             "Every image costs the same FLOPs (top-k gates: a fixed budget per gate), so cost cannot follow "
             "difficulty; threshold gates (per-image budgets) can."]
    plots = sorted(p.name for p in out.glob("*.png"))
    write_markdown(out, "instaprune demo", m, res.per_point, plots, notes)
    log.info("demo finished in %.1fs: %s", m["seconds"], {k: m.get(k) for k in ("baseline_top1", "top1")})
    return m
