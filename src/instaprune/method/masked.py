"""Saliency, dynamic thresholds and the masked *reference* dynamic model (docs/method.md sections 2, 4 and 7).

The masked model zeroes each instance's weak channels at the selected prune points (forward pre-hooks on the
consumers) and counts the MACs each instance would cost. It computes everything densely: it defines *what* is
pruned; ``engine.py`` makes it fast and is tested against this module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from instaprune.core.errors import ConfigError
from instaprune.method.flops import dynamic_macs
from instaprune.method.points import PointReport, PrunePoint
from instaprune.method.thresholds import ThresholdConfig, keep_mask, reference, saliency

__all__ = ["MaskedModel"]

class MaskedModel(nn.Module):
    """Reference dynamic model: the wrapped model with per-instance channel masks at the selected points.

    ``taus`` maps point names to thresholds (the selected points); ``scale`` multiplies every tau (a run-time
    knob trading accuracy for speed). After each forward, ``active`` holds the number of kept channels per point
    (N,), ``masks`` the keep masks when ``record_masks`` is set, and ``instance_macs()`` the per-instance MACs.
    ``forced`` (point -> bool mask (N, C)) overrides the thresholds (used to test the fast engine).
    Gradients flow through the kept channels, so the same object serves prune-aware fine-tuning.

    ``ste`` > 0 (training only): a straight-through gate. The forward value is unchanged (the hard mask), but the
    backward pass treats each channel's mask as ``sigmoid((s - thr) / (ste * thr))``, so the loss also reaches
    the saliencies: a pruned channel that would have lowered the loss is pushed above its threshold and a kept
    one that hurts is pushed below (with the hard mask alone, a pruned channel gets no gradient through this
    consumer). Only while gradients are enabled; evaluation and the engine never see it.
    """

    def __init__(
        self,
        model: nn.Module,
        points: PointReport,
        taus: Mapping[str, float],
        cfg: ThresholdConfig | None = None,
        scale: float = 1.0,
        record_masks: bool = False,
        ste: float = 0.0,
    ) -> None:
        super().__init__()
        if not ste >= 0.0:
            raise ConfigError(f"straight-through temperature must be >= 0, got {ste}")
        self.ste = float(ste)
        self.model = model
        self.report = points
        self.cfg = cfg or ThresholdConfig()
        self.scale = float(scale)
        self.record_masks = record_masks
        self.forced: dict[str, torch.Tensor] | None = None
        self.enabled = True
        by_name = points.by_name()
        unknown = [n for n in taus if n not in by_name]
        if unknown:
            raise ConfigError(f"thresholds given for unknown prune points: {', '.join(unknown[:5])}")
        self.taus = {n: float(t) for n, t in taus.items()}
        self.selected: list[PrunePoint] = [by_name[n] for n in points.names() if n in self.taus]
        self._batch = 0
        self.active: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = [
            modules[p.name].register_forward_pre_hook(self._hook(p.name)) for p in self.selected
        ]

    def _hook(self, name: str):
        def hook(m: nn.Module, args: tuple):
            if not self.enabled:
                return None
            x = args[0]
            s = None
            if self.forced is not None:
                keep = self.forced[name].to(torch.bool)
            else:
                with torch.no_grad():
                    s = saliency(x.detach())
                    keep = keep_mask(s, self.taus[name] * self.scale, self.cfg)
            self.active[name] = keep.sum(dim=1)
            if self.record_masks:
                self.masks[name] = keep
            m = self.multiplier(name, x, keep, s)
            return (x * m.view(keep.shape + (1,) * (x.dim() - 2)),) + tuple(args[1:])

        return hook

    def multiplier(self, name: str, x: torch.Tensor, keep: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
        """What the consumer's input is multiplied by, per instance and channel (N, C): the keep mask, plus the
        straight-through gate's gradient with ``ste`` > 0. ``s``: the saliencies the mask was computed from
        (without gradient; None for forced masks). Subclasses may change it (benchmarks' mask variants)."""
        m = keep.to(x.dtype)
        if self.ste > 0 and s is not None and torch.is_grad_enabled() and x.requires_grad:
            sg = saliency(x)
            thr = (self.taus[name] * self.scale * reference(s, self.cfg.mode)).clamp_min(1e-12)
            g = torch.sigmoid((sg - thr) / (self.ste * thr))
            m = m + (g - g.detach())
        return m

    def set_taus(self, taus: Mapping[str, float], scale: float | None = None) -> None:
        for n, t in taus.items():
            if n not in self.taus:
                raise ConfigError(f"prune point {n!r} is not selected in this masked model")
            self.taus[n] = float(t)
        if scale is not None:
            self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.active = {}
        self.masks = {}
        self._batch = x.shape[0]
        return self.model(x)

    def instance_macs(self) -> torch.Tensor:
        """Per-instance MACs (without overhead) of the last forward."""
        if not self.active:
            return torch.full((self._batch,), float(self.report.dense_macs), dtype=torch.float64)
        return dynamic_macs(self.report.dense_macs, self.selected, self.active)

    def overhead_macs(self) -> int:
        return sum(p.overhead_macs for p in self.selected)

    def remove(self) -> nn.Module:
        """Detach the hooks and return the plain model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.model
