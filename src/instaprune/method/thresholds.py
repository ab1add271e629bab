"""Channel saliency and the per-instance keep rule (docs/method.md, sections 2 and 4).

``s[i,c] = ||X[i,c]||_2 / sqrt(H*W)``; channel c of instance i is kept iff ``s[i,c] > tau * ref(s[i,:])`` plus a
floor of ``min_keep``. Everything that measures or thresholds channels (regulariser, analysis, calibration, the
masked reference, the engine) asks this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from instaprune.core.config import ConfigMixin, check_fields
from instaprune.core.errors import ConfigError

__all__ = ["THRESHOLD_MODES", "ThresholdConfig", "saliency", "reference", "keep_mask"]

THRESHOLD_MODES = ("max", "mean", "one")


@dataclass(frozen=True)
class ThresholdConfig(ConfigMixin):
    """Channel c of instance i is kept iff ``s[i,c] > tau * ref(s[i,:])``, plus a floor of ``min_keep``.

    mode: ``max`` / ``mean`` (relative to the instance's own saliencies) or ``one`` (absolute threshold).
    min_keep: fraction of the point's channels always kept (the strongest ones; at least one channel).
    """

    mode: str = "max"
    min_keep: float = 0.05

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mode not in THRESHOLD_MODES:
            raise ConfigError(f"threshold mode must be one of {', '.join(THRESHOLD_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise ConfigError(f"min_keep must be in [0, 1], got {self.min_keep}")

    def floor(self, channels: int) -> int:
        return max(1, min(channels, math.ceil(self.min_keep * channels)))


def saliency(x: torch.Tensor) -> torch.Tensor:
    """``s[i,c] = ||X[i,c]||_2 / sqrt(H*W)`` (RMS of each channel map); ``|x|`` for flat (N, C) inputs."""
    if x.dim() == 2:
        return x.abs()
    return x.pow(2).mean(dim=tuple(range(2, x.dim()))).sqrt()


def reference(s: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-instance reference value (N, 1) that tau multiplies."""
    if mode == "max":
        return s.amax(dim=1, keepdim=True)
    if mode == "mean":
        return s.mean(dim=1, keepdim=True)
    return torch.ones_like(s[:, :1])


def keep_mask(s: torch.Tensor, tau: float, cfg: ThresholdConfig) -> torch.Tensor:
    """Boolean keep mask (N, C) for saliencies ``s`` (N, C)."""
    keep = s > tau * reference(s, cfg.mode)
    k = cfg.floor(s.shape[1])
    if k > 0:
        top = s.topk(k, dim=1).indices
        keep = keep.scatter(1, top, True)
    return keep
