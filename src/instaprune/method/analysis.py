"""Streaming saliency statistics and the coefficient of variation (docs/method.md sections 2 and 5).

For each prune point we keep, per channel, the count, sum and sum of squares of the saliency over instances
(float64). Memory does not grow with the number of images; two statistics merge by addition, and across
processes by an all-reduce, so N processes give the same CV as one.

    CV_l = mean over non-dead channels c of  std_i s[i,l,c] / mean_i s[i,l,c]     (population std)

A channel is *dead* when its saliency is zero for every instance (sum == 0): it is excluded from the mean and
counted (such channels are statically prunable).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from instaprune.core.errors import ConfigError
from instaprune.method.points import PointReport
from instaprune.method.thresholds import reference, saliency

__all__ = ["SaliencyStats", "analyze", "select_points", "ratio_quantiles"]

log = logging.getLogger(__name__)


@dataclass
class SaliencyStats:
    """Mergeable per-point, per-channel running sums of saliencies."""

    n: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    sumsq: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, name: str, s: torch.Tensor) -> None:
        """Add saliencies ``s`` (N, C) of one batch at point ``name`` (call ``count`` once per batch)."""
        s = s.detach().to(torch.float64)
        if name not in self.sums:
            self.sums[name] = torch.zeros(s.shape[1], dtype=torch.float64)
            self.sumsq[name] = torch.zeros(s.shape[1], dtype=torch.float64)
        self.sums[name] += s.sum(0).cpu()
        self.sumsq[name] += s.pow(2).sum(0).cpu()

    def merge(self, other: SaliencyStats) -> SaliencyStats:
        """Statistics of the union of both sample sets."""
        out = SaliencyStats(self.n + other.n)
        for name in {**self.sums, **other.sums}:
            a, b = self.sums.get(name), other.sums.get(name)
            out.sums[name] = a + b if a is not None and b is not None else (a if b is None else b).clone()
            qa, qb = self.sumsq.get(name), other.sumsq.get(name)
            out.sumsq[name] = qa + qb if qa is not None and qb is not None else (qa if qb is None else qb).clone()
        return out

    def all_reduce(self) -> SaliencyStats:
        """Sum the statistics over all processes of the default process group (no-op without one)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        names = sorted(self.sums)
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64)]
                         + [self.sums[k] for k in names] + [self.sumsq[k] for k in names])
        dist.all_reduce(flat)
        out = SaliencyStats(int(round(float(flat[0]))))
        i = 1
        for target in (out.sums, out.sumsq):
            for k in names:
                c = self.sums[k].numel()
                target[k] = flat[i:i + c].clone()
                i += c
        return out

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / max(self.n, 1)

    def std(self, name: str) -> torch.Tensor:
        m = self.mean(name)
        return (self.sumsq[name] / max(self.n, 1) - m * m).clamp_min(0).sqrt()

    def dead(self, name: str) -> torch.Tensor:
        """Boolean (C,): channels whose saliency was zero for every instance."""
        return self.sums[name] <= 0

    def cv(self, name: str) -> float:
        alive = ~self.dead(name)
        if not bool(alive.any()):
            return 0.0
        return float((self.std(name)[alive] / self.mean(name)[alive]).mean())

    def table(self, points: PointReport) -> list[dict[str, Any]]:
        """One row per analysed point: name, channels, MACs share, CV, dead channels."""
        rows = []
        for p in points:
            if p.name not in self.sums:
                continue
            rows.append({
                "name": p.name, "channels": p.channels, "macs_share": p.macs / points.dense_macs,
                "cv": self.cv(p.name), "dead": int(self.dead(p.name).sum()),
                "mean_saliency": float(self.mean(p.name).mean()),
            })
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sums": {k: v.tolist() for k, v in self.sums.items()},
                "sumsq": {k: v.tolist() for k, v in self.sumsq.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SaliencyStats:
        f64 = torch.float64
        return cls(int(d["n"]), {k: torch.tensor(v, dtype=f64) for k, v in d["sums"].items()},
                   {k: torch.tensor(v, dtype=f64) for k, v in d["sumsq"].items()})


@torch.no_grad()
def analyze(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Sequence[torch.Tensor]],
    points: PointReport,
    device: torch.device | str = "cpu",
) -> SaliencyStats:
    """One streaming pass over ``batches`` (tensors, or tuples whose first item is the input) in eval mode."""
    stats = SaliencyStats()
    modules = dict(model.named_modules())

    def hook(name: str):
        def fn(m: nn.Module, args: tuple) -> None:
            stats.update(name, saliency(args[0].float()))

        return fn

    handles = [modules[p.name].register_forward_pre_hook(hook(p.name)) for p in points]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch if isinstance(batch, torch.Tensor) else batch[0]
            model(x.to(device))
            stats.n += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats.all_reduce()


@torch.no_grad()
def ratio_quantiles(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[tuple[torch.Tensor, ...]],
    qs: Sequence[float],
    mode: str,
    max_images: int | None = None,
    max_values: int = 50_000,
) -> dict[str, list[float]]:
    """Per point, the ``qs`` quantiles of the dense model's ``s / ref(s)`` over the images of ``batches`` (up to
    ``max_images``; at most ``max_values`` values per point, a seeded random sample): tau ``quantile(q)`` drops
    about a fraction q of that point's channels. The calibration ladders are these quantiles."""
    values: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(model.named_modules())

    def hook(name: str):
        def fn(m: nn.Module, args: tuple) -> None:
            s = saliency(args[0].float())
            values[name].append((s / reference(s, mode).clamp_min(1e-12)).flatten())

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            model(batch[0])
            seen += batch[0].shape[0]
            if max_images is not None and seen >= max_images:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    q = torch.tensor(list(qs), dtype=torch.float64)
    out = {}
    for n, vals in values.items():
        v = torch.cat(vals).double()
        if v.numel() > max_values:
            v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:max_values]]
        out[n] = torch.quantile(v, q).tolist()
    return out


def select_points(
    stats: SaliencyStats,
    points: PointReport,
    kappa: float | None = None,
    top_k: int | None = None,
    target: float | None = None,
    min_keep: float = 0.05,
) -> list[str]:
    """Choose prune points by ``CV >= kappa`` or the ``top_k`` highest CVs (neither: all points).

    With a FLOPs ``target``, points are added in decreasing CV order until the selected consumers hold enough
    MACs for the target to be reachable (pruning each down to ``min_keep``, with 25% headroom).
    """
    if kappa is not None and top_k is not None:
        raise ConfigError("select points by kappa or by top_k, not both")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    ranked = sorted((p for p in points if p.name in stats.sums), key=lambda p: -stats.cv(p.name))
    if kappa is not None:
        chosen = [p for p in ranked if stats.cv(p.name) >= kappa]
    elif top_k is not None:
        chosen = ranked[:top_k]
    else:
        chosen = list(ranked)
    if target is not None:
        def reachable(sel: list) -> float:
            return sum(p.macs * (1 - min_keep) - p.overhead_macs for p in sel) / points.dense_macs

        for p in ranked:
            if reachable(chosen) >= min(1.25 * target, 0.95):
                break
            if p not in chosen:
                log.info("adding point %s (CV %.3f) so that the FLOPs target %.2f is reachable",
                         p.name, stats.cv(p.name), target)
                chosen.append(p)
    order = {p.name: i for i, p in enumerate(points)}
    return sorted((p.name for p in chosen), key=order.__getitem__)
