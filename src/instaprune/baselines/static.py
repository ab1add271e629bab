"""Static baseline: L1-norm filter pruning of block-internal channels (Li et al., "Pruning Filters for Efficient
ConvNets", ICLR 2017), to a FLOPs target, with the same MACs convention as the dynamic method
(docs/method.md sections 7 and 10).

A *pair* is a residual block's ``conv1 -> bn1 -> (ReLU) -> conv2``: removing output filter c of ``conv1`` removes
channel c of ``bn1`` and input channel c of ``conv2``. The MACs saved per removed filter are counted in BOTH the
producer (``conv1``: its per-output-channel share) and the consumer (``conv2``: its per-input-channel share);
BatchNorm costs no MACs in this convention (FlopCounterMode does not count it either), so it saves none.
Filters are ranked by the L1 norm of their ``conv1`` weights, smallest first; the number removed per pair is
layer-uniform (one ratio for every pair) or global (smallest per-layer-normalised L1 norms network-wide).

``reduction`` = 1 - MACs / dense MACs, identical for every image (no overhead). :func:`slim` builds the
physically smaller model, whose ``FlopCounterMode`` count equals :attr:`StaticPlan.macs` (tested);
:func:`apply_masks` zeroes the removed channels at the consumer's input instead (same outputs), which is how the
pruned model is fine-tuned with its masks fixed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from instaprune.core.errors import ConfigError
from instaprune.method.flops import layer_macs

__all__ = ["BlockPair", "StaticPlan", "find_pairs", "l1_scores", "static_plan", "apply_masks", "slim"]

log = logging.getLogger(__name__)

SCOPES = ("uniform", "global")


@dataclass(frozen=True)
class BlockPair:
    """``conv1``/``bn1``/``conv2`` of one block (qualified module names) and their per-instance MACs."""

    block: str
    conv1: str
    bn1: str
    conv2: str
    channels: int
    conv1_macs: int
    conv2_macs: int

    @property
    def macs_per_channel(self) -> float:
        """MACs saved per removed filter: producer share plus consumer share."""
        return (self.conv1_macs + self.conv2_macs) / self.channels


@dataclass
class StaticPlan:
    """Kept filters per pair (bool masks over ``conv1``'s output channels) and the resulting MACs."""

    dense_macs: int
    pairs: list[BlockPair]
    keep: dict[str, torch.Tensor] = field(default_factory=dict)  # block name -> bool (C,)

    @property
    def macs(self) -> float:
        saved = sum((~self.keep[p.block]).sum().item() * p.macs_per_channel for p in self.pairs if p.block in self.keep)
        return self.dense_macs - saved

    @property
    def reduction(self) -> float:
        return 1.0 - self.macs / self.dense_macs

    def to_dict(self) -> dict[str, Any]:
        return {"dense_macs": self.dense_macs, "macs": self.macs, "flops_reduction": self.reduction,
                "keep": {b: m.nonzero().flatten().tolist() for b, m in self.keep.items()},
                "channels": {p.block: p.channels for p in self.pairs}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], pairs: list[BlockPair]) -> StaticPlan:
        by = {p.block: p for p in pairs}
        unknown = [b for b in d["keep"] if b not in by]
        if unknown:
            raise ConfigError(f"static plan names blocks this model does not have: {', '.join(unknown[:3])}")
        keep = {}
        for b, idx in d["keep"].items():
            m = torch.zeros(by[b].channels, dtype=torch.bool)
            m[torch.tensor(idx, dtype=torch.long)] = True
            keep[b] = m
        return cls(int(d["dense_macs"]), pairs, keep)


def find_pairs(model: nn.Module, example_input: torch.Tensor) -> tuple[list[BlockPair], int]:
    """Every block with ``conv1``/``bn1``/``conv2`` children (ungrouped convs, matching widths), and the
    dense per-instance MACs of the model."""
    macs = layer_macs(model, example_input)
    pairs = []
    for name, m in model.named_modules():
        c1, b1, c2 = (getattr(m, a, None) for a in ("conv1", "bn1", "conv2"))
        if not (isinstance(c1, nn.Conv2d) and isinstance(b1, nn.BatchNorm2d) and isinstance(c2, nn.Conv2d)):
            continue
        if c1.groups != 1 or c2.groups != 1 or c1.out_channels != c2.in_channels or b1.num_features != c1.out_channels:
            log.info("static: block %s skipped (grouped or mismatched widths)", name)
            continue
        q = (name + ".") if name else ""
        pairs.append(BlockPair(name, q + "conv1", q + "bn1", q + "conv2", c1.out_channels,
                               macs[q + "conv1"], macs[q + "conv2"]))
    if not pairs:
        raise ConfigError("static pruning: no residual block with conv1/bn1/conv2 found in this model")
    return pairs, sum(macs.values())


def l1_scores(model: nn.Module, pairs: list[BlockPair]) -> dict[str, torch.Tensor]:
    """L1 norm of each ``conv1`` output filter, per pair."""
    mods = dict(model.named_modules())
    return {p.block: mods[p.conv1].weight.detach().abs().flatten(1).sum(1).float() for p in pairs}


def _keep_lowest_removed(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if n_remove > 0:
        keep[torch.argsort(scores, stable=True)[:n_remove]] = False
    return keep


def static_plan(model: nn.Module, example_input: torch.Tensor, target: float, scope: str = "uniform",
                min_keep: int = 1) -> StaticPlan:
    """Remove the smallest-L1 filters until the MACs reduction reaches ``target`` (as close as the discrete
    filter counts allow: the first count at or above the target; raises if unreachable)."""
    if not 0.0 < target < 1.0:
        raise ConfigError(f"static pruning target must be in (0, 1), got {target}")
    if scope not in SCOPES:
        raise ConfigError(f"static pruning scope must be one of {SCOPES}, got {scope!r}")
    pairs, dense = find_pairs(model, example_input)
    scores = l1_scores(model, pairs)
    plan = StaticPlan(dense, pairs)
    cap = {p.block: p.channels - min_keep for p in pairs}
    if scope == "uniform":
        def plan_at(ratio: float) -> dict[str, torch.Tensor]:
            return {p.block: _keep_lowest_removed(scores[p.block], min(cap[p.block], round(ratio * p.channels)))
                    for p in pairs}
        lo, hi = 0.0, 1.0
        plan.keep = plan_at(hi)
        if plan.reduction < target:
            raise ConfigError(f"static pruning cannot reach {target:.3f} (max {plan.reduction:.3f})")
        for _ in range(40):  # bisection on the ratio; reduction is monotone in it
            mid = (lo + hi) / 2
            plan.keep = plan_at(mid)
            lo, hi = (mid, hi) if plan.reduction < target else (lo, mid)
        plan.keep = plan_at(hi)
        return plan
    # global: per-layer-normalised L1 (score / layer mean), cheapest first, until the target is reached
    order = sorted(((float(s / scores[p.block].mean()), p.block, int(c)) for p in pairs
                    for c, s in enumerate(scores[p.block])), key=lambda t: (t[0], t[1], t[2]))
    plan.keep = {p.block: torch.ones(p.channels, dtype=torch.bool) for p in pairs}
    by = {p.block: p for p in pairs}
    saved = 0.0
    for _, b, c in order:
        if saved / dense >= target:
            break
        if plan.keep[b].sum().item() <= min_keep:
            continue
        plan.keep[b][c] = False
        saved += by[b].macs_per_channel
    if plan.reduction < target:
        raise ConfigError(f"static pruning cannot reach {target:.3f} (max {plan.reduction:.3f})")
    return plan


def apply_masks(model: nn.Module, plan: StaticPlan) -> list[RemovableHandle]:
    """Zero the removed channels at each ``conv2``'s input (forward pre-hooks; remove the returned handles to
    undo). Outputs equal the slimmed model's; gradients reach only kept filters."""
    mods = dict(model.named_modules())
    handles = []
    for p in plan.pairs:
        keep = plan.keep.get(p.block)
        if keep is None or bool(keep.all()):
            continue

        def hook(m: nn.Module, args: tuple, keep: torch.Tensor = keep) -> tuple:
            x = args[0]
            return (x * keep.to(x.device, x.dtype).view(1, -1, 1, 1),) + tuple(args[1:])

        handles.append(mods[p.conv2].register_forward_pre_hook(hook))
    return handles


def slim(model: nn.Module, plan: StaticPlan) -> nn.Module:
    """A deep copy with the removed filters physically gone (``conv1`` outputs, ``bn1`` channels, ``conv2``
    inputs); eval-mode outputs equal :func:`apply_masks` on the original."""
    new = copy.deepcopy(model)
    mods = dict(new.named_modules())
    for p in plan.pairs:
        keep = plan.keep.get(p.block)
        if keep is None:
            continue
        idx = keep.nonzero().flatten()
        c1, b1, c2 = mods[p.conv1], mods[p.bn1], mods[p.conv2]
        n1 = nn.Conv2d(c1.in_channels, len(idx), c1.kernel_size, c1.stride, c1.padding, c1.dilation,
                       bias=c1.bias is not None)
        n1.weight.data = c1.weight.data[idx].clone()
        if c1.bias is not None:
            n1.bias.data = c1.bias.data[idx].clone()
        nb = nn.BatchNorm2d(len(idx), b1.eps, b1.momentum, b1.affine, b1.track_running_stats)
        for a in ("weight", "bias", "running_mean", "running_var"):
            if getattr(b1, a, None) is not None:
                getattr(nb, a).data = getattr(b1, a).data[idx].clone()
        n2 = nn.Conv2d(len(idx), c2.out_channels, c2.kernel_size, c2.stride, c2.padding, c2.dilation,
                       bias=c2.bias is not None)
        n2.weight.data = c2.weight.data[:, idx].clone()
        if c2.bias is not None:
            n2.bias.data = c2.bias.data.clone()
        block = mods[p.block]
        block.conv1, block.bn1, block.conv2 = n1, nb, n2
    return new
