"""The demo's gated branch: predicted gates (docs/method.md section 9) on the demo's pre-trained network, trained
for exactly the epochs the baseline branch gets, through the same sequence ``instaprune train --gates`` runs
(:func:`instaprune.pipeline.gated.train_gated`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from instaprune.core.errors import ConfigError
from instaprune.data.datasets import ImageSet
from instaprune.method.gates import GateConfig
from instaprune.method.plan import Plan
from instaprune.pipeline.gated import GateSchedule, train_gated
from instaprune.pipeline.stages import LoadedModel
from instaprune.training.loop import TrainConfig

__all__ = ["DemoGates", "gated_branch"]


@dataclass(frozen=True)
class DemoGates:
    """The gated branch's options: ``epochs`` (the baseline branch's total), ``lr`` (cosine), ``distill`` (from
    the pre-trained model), gate options as :class:`GateConfig` / :class:`GateSchedule` name them.

    Measured (``results/demo_variants``, seed 0, 1 thread, target 0.42, 2026-12-05): test top-1 drop against the
    baseline branch 1.96 points with half the target slimmed statically first (``static_share`` 0.5, static L1,
    docs/method.md section 10) and threshold gates on the rest (per-image budgets: p90/p10 1.14,
    Spearman(difficulty, FLOPs) +0.27); 1.78 with the same composition and top-k gates, 2.12 with three quarters
    static; gates alone 2.48 (threshold) / 2.14 (top-k), 2.24 / 2.78 with the value multiplier; distillation from
    the pre-trained model (a teacher weaker than the baseline branch) 3.9; the post-hoc rule 3.6. So: no
    distillation, half static, threshold selection (0.18 points behind top-k in this one seed) for the per-image
    budgets the demo reports.
    """

    epochs: int = 8
    lr: float = 0.05
    distill: float = 0.0
    selection: str = "threshold"
    multiplier: str = "hard"
    ramp: float = 0.3
    warmup_batches: int = 20
    predictor: str = "linear"
    static_share: float = 0.5  # this share of the FLOPs target is slimmed statically, the gates cut the rest

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.lr > 0 or not 0 <= self.distill <= 1 or not 0 <= self.static_share < 1:
            raise ConfigError(f"demo gates: epochs >= 1, lr > 0, distill in [0, 1] and static_share in [0, 1), "
                              f"got {self}")


def gated_branch(lm: LoadedModel, train_set: ImageSet, calib_set: ImageSet, base_cfg: TrainConfig, target: float,
                 options: DemoGates, progress: Callable[[dict[str, Any]], None] | None = None,
                 ) -> tuple[Plan, dict[str, Any]]:
    """Train gates on ``lm.model`` (in place) to ``target`` FLOPs reduction; returns the plan and the run's
    metrics (training history with train top-1 under the masks, held-out calibration)."""
    from dataclasses import replace

    cfg = GateConfig(selection=options.selection, multiplier=options.multiplier, predictor=options.predictor)
    schedule = GateSchedule(target=target, ramp=options.ramp, warmup_batches=options.warmup_batches,
                            static_target=options.static_share * target)
    tcfg = replace(base_cfg, epochs=options.epochs, lr=options.lr, distill=options.distill,
                   checkpoint_every=0)
    return train_gated(lm, train_set, calib_set, cfg, schedule, tcfg, None, resume=None, progress=progress)
