"""The one top-1 loop: run a network over labelled batches and count what it gets right.

Calibration, training's validation, evaluation and the gates all call :func:`score_batches`; extras (MACs,
confidences, keep ratios) are collected by its per-batch callback, so the loop itself exists once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from instaprune.core.errors import ModelError

__all__ = ["Score", "score_batches"]


@dataclass(frozen=True)
class Score:
    correct: int
    seen: int
    loss_sum: float = 0.0

    @property
    def top1(self) -> float:
        return self.correct / max(self.seen, 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)


@torch.no_grad()
def score_batches(
    net: nn.Module,
    batches: Iterable[tuple],
    device: torch.device | None = None,
    limit: int | None = None,
    loss: bool = False,
    each: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> Score:
    """Top-1 of ``net`` (put in eval mode) over ``batches`` of ``(x, y, ...)``; stops once ``limit`` images were
    seen; ``loss``: also the summed cross-entropy; ``each(x, y, logits)`` after every batch (on the labels'
    device)."""
    net.eval()
    correct = seen = 0
    loss_sum = 0.0
    for batch in batches:
        if limit is not None and seen >= limit:
            break
        x, y = batch[0], batch[1]
        out = net(x if device is None else x.to(device))
        if device is not None:
            out = out.to(y.device)
        if not bool(torch.isfinite(out).all()):  # NaN or overflow: argmax would score chance silently
            raise ModelError("the network's outputs are not finite (NaN or overflow): its weights are unusable")
        correct += int((out.argmax(1) == y).sum())
        if loss:
            loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
        seen += int(y.shape[0])
        if each is not None:
            each(x, y, out)
    return Score(correct, seen, loss_sum)
