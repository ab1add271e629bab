"""Feature-decay regularisation (docs/method.md section 3): an ordinary loss term, attachable to any model.

    loss = CE + lambda * sum_l w_l * mean_i pen(s[i,l,:])

with ``s`` the channel saliencies (RMS per channel) of prune point l for instance i and ``pen`` one of

- ``l21``:   sum_c s                (the paper's instance-wise l2,1 norm)
- ``l1l2``:  sum_c s / ||s||_2      (scale invariant, Hoyer-style)
- ``l1max``: sum_c s / max_c s      (scale invariant, matches the relative-max threshold)

The scale-invariant variants cannot be lowered by shrinking a whole feature map through the previous BN (the
known trap of the plain l2,1 term). Weights ``w_l``: ``uniform`` (1/C_l) or ``flops`` (MACs one input channel of
l costs its consumer, normalised to sum to 1). The term is computed by forward pre-hooks, so it works unchanged
with AMP, gradient accumulation and DDP (hooks live on the wrapped module).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from instaprune.core.config import ConfigMixin, check_fields
from instaprune.core.errors import ConfigError
from instaprune.method.points import PointReport
from instaprune.method.thresholds import saliency

__all__ = ["PENALTIES", "WEIGHTINGS", "FeatureDecayConfig", "FeatureDecay", "attach_feature_decay", "penalty"]

PENALTIES = ("l21", "l1l2", "l1max")
WEIGHTINGS = ("uniform", "flops")
_EPS = 1e-12


@dataclass(frozen=True)
class FeatureDecayConfig(ConfigMixin):
    """``penalty`` default ``l1l2``: the CIFAR-10 study's choice on ResNet-20 (holdout top-1 at 60% FLOPs
    reduction after the prune-aware phase: l1l2 0.560, l21 0.490, l1max 0.445; RESULTS.md)."""

    lam: float = 0.0
    penalty: str = "l1l2"
    weights: str = "uniform"

    def __post_init__(self) -> None:
        check_fields(self)
        if not isinstance(self.lam, (int, float)) or self.lam < 0 or self.lam != self.lam:
            raise ConfigError(f"feature-decay lambda must be a non-negative number, got {self.lam}")
        if self.penalty not in PENALTIES:
            raise ConfigError(f"penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")
        if self.weights not in WEIGHTINGS:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHTINGS)}, got {self.weights!r}")


def penalty(s: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-instance penalty (N,) of saliencies ``s`` (N, C)."""
    l1 = s.sum(dim=1)
    if kind == "l21":
        return l1
    if kind == "l1l2":
        return l1 / s.norm(dim=1).clamp_min(_EPS)
    if kind == "l1max":
        return l1 / s.amax(dim=1).clamp_min(_EPS)
    raise ConfigError(f"unknown penalty {kind!r}")


def layer_weights(points: PointReport, weights: str) -> dict[str, float]:
    if weights == "uniform":
        return {p.name: 1.0 / p.channels for p in points}
    total = sum(p.macs_per_channel for p in points)
    return {p.name: p.macs_per_channel / total for p in points}


class FeatureDecay:
    """Handle returned by :func:`attach_feature_decay`.

    Each forward accumulates the weighted per-point terms; :meth:`pop` returns ``lambda * sum`` (a scalar tensor
    with gradient) and clears the buffer. Call it once per forward, even when ``lam == 0`` (it then returns 0).
    """

    def __init__(self, model: nn.Module, points: PointReport, cfg: FeatureDecayConfig) -> None:
        self.cfg = cfg
        self.weights = layer_weights(points, cfg.weights)
        self.enabled = True
        self._terms: list[torch.Tensor] = []
        self._values: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = [
            modules[p.name].register_forward_pre_hook(self._hook(p.name), prepend=True) for p in points
        ]

    def _hook(self, name: str):
        def hook(m: nn.Module, args: tuple) -> None:
            if not self.enabled or self.cfg.lam == 0 or not torch.is_grad_enabled():
                return None
            x = args[0].float()
            term = penalty(saliency(x), self.cfg.penalty).mean() * self.weights[name]
            self._terms.append(term)
            self._values[name] = term.detach()
            return None

        return hook

    def pop(self) -> torch.Tensor:
        """``lambda * sum_l w_l * mean_i pen_l(i)`` of the last forward(s); clears the buffer."""
        if not self._terms:
            return torch.zeros(())
        total = torch.stack(self._terms).sum() * self.cfg.lam
        self._terms = []
        return total

    def last_values(self) -> dict[str, float]:
        """Unscaled weighted per-point terms of the last forward (for logging)."""
        return {k: float(v) for k, v in self._values.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._terms = []


def attach_feature_decay(model: nn.Module, cfg: FeatureDecayConfig, points: PointReport) -> FeatureDecay:
    """Attach the feature-decay term to ``model`` at ``points``; returns the handle whose ``pop()`` is the loss."""
    return FeatureDecay(model, points, cfg)
