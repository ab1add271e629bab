"""Prune-aware fine-tuning with a FLOPs-target controller (docs/method.md section 6.3).

In the prune-aware phase the calibrated masks are applied in the forward pass (:class:`~instaprune.masked.
MaskedModel`), so the network learns to do without each image's weak channels. Two things go wrong with fixed
thresholds: the saliency distribution moves while the network adapts, so the FLOPs actually skipped drift away
from the target (with a penalty on, sparsity ran away on ResNet-20, docs/method.md section 6.3), and switching every
mask on at once costs most of the accuracy in the first steps (calibration alone: 0.17 holdout top-1 at 60%).

:class:`TargetController` fixes both with one knob, the masked model's global ``scale`` on every tau: after each
optimizer step it reads the batch's measured FLOPs reduction and moves ``log(scale)`` in proportion to the gap to
a target that ramps linearly from 0 to ``target`` over the first ``ramp`` fraction of the phase (gradual
pruning, as in Zhu and Gupta 2017), then holds. The per-point shape of the thresholds (their ratios) stays the
calibrated one; the reduction cannot run away because the controller pulls it back every step. The phase ends
with a recalibration on the held-out split (the command line does it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from instaprune.core.config import ConfigMixin, check_fields
from instaprune.core.errors import ConfigError
from instaprune.method.flops import flops_reduction
from instaprune.method.masked import MaskedModel

__all__ = ["PruneAwareConfig", "TargetController"]


@dataclass(frozen=True)
class PruneAwareConfig(ConfigMixin):
    """``target``: mean FLOPs reduction held during training; ``ramp``: fraction of the phase over which the
    target grows linearly from 0 (0 = the full target from the first step); ``gain``: change of ``log(scale)``
    per unit of reduction error per step; ``scale_bounds``: the scale is kept inside them."""

    target: float = 0.5
    ramp: float = 0.3
    gain: float = 1.0
    scale_bounds: tuple[float, float] = (1e-3, 1e3)

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0.0 < self.target < 1.0:
            raise ConfigError(f"prune-aware target must be in (0, 1), got {self.target}")
        if not 0.0 <= self.ramp <= 1.0:
            raise ConfigError(f"prune-aware ramp must be in [0, 1], got {self.ramp}")
        if not self.gain >= 0.0:
            raise ConfigError(f"prune-aware gain must be >= 0, got {self.gain}")
        lo, hi = self.scale_bounds
        if not 0.0 < lo < hi:
            raise ConfigError(f"prune-aware scale bounds must satisfy 0 < lo < hi, got {self.scale_bounds}")


class TargetController:
    """Holds a :class:`MaskedModel`'s measured training-batch FLOPs reduction at a (ramped) target by adjusting
    its global ``scale``. Call :meth:`step` after each optimizer step with the phase's progress in [0, 1]."""

    def __init__(self, masked: MaskedModel, cfg: PruneAwareConfig, initial_scale: float | None = None) -> None:
        self.masked = masked
        self.cfg = cfg
        lo, hi = cfg.scale_bounds
        if initial_scale is None:  # a ramped target starts low: begin below the calibrated thresholds
            initial_scale = 0.5 if cfg.ramp > 0 else masked.scale
        start = initial_scale
        self.log_scale = math.log(min(max(start, lo), hi))
        self.masked.scale = math.exp(self.log_scale)
        self.last_reduction = 0.0
        self._sum = [0.0, 0.0, 0.0]  # reduction, scale, steps (since the last summary)

    def target_at(self, progress: float) -> float:
        if self.cfg.ramp <= 0:
            return self.cfg.target
        return self.cfg.target * min(max(progress / self.cfg.ramp, 0.0), 1.0)

    def measured(self) -> float:
        """FLOPs reduction of the last forward (batch mean, overhead included)."""
        m = self.masked
        return flops_reduction(float(m.instance_macs().mean()), m.report.dense_macs, m.overhead_macs())

    def step(self, progress: float, world_size: int = 1) -> float:
        """Update the scale from the last forward's reduction (averaged over ``world_size`` ranks, so every
        rank of a DDP run keeps the same scale: a collective when ``world_size`` > 1)."""
        red = self.measured()
        if world_size > 1:
            from instaprune.core.distributed import all_reduce_sum

            red = all_reduce_sum([red])[0] / world_size
        if not math.isfinite(red):  # no forward since the last step: nothing measured, nothing to correct
            return red
        self.last_reduction = red
        lo, hi = self.cfg.scale_bounds
        self.log_scale += self.cfg.gain * (self.target_at(progress) - red)
        self.log_scale = min(max(self.log_scale, math.log(lo)), math.log(hi))
        self.masked.scale = math.exp(self.log_scale)
        self._sum = [self._sum[0] + red, self._sum[1] + self.masked.scale, self._sum[2] + 1]
        return red

    def summary(self) -> dict[str, float]:
        """Mean training reduction and scale since the previous summary (one per epoch in the history)."""
        n = max(self._sum[2], 1)
        out = {"train_flops_reduction": self._sum[0] / n, "mean_scale": self._sum[1] / n,
               "scale": self.masked.scale}
        self._sum = [0.0, 0.0, 0.0]
        return out

    def state_dict(self) -> dict[str, float]:
        return {"log_scale": self.log_scale}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.log_scale = float(state["log_scale"])
        self.masked.scale = math.exp(self.log_scale)
