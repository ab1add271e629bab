"""The one FLOPs convention of the project (docs/method.md section 7). Everything else asks this module.

- We count MACs (multiply-adds) of Conv2d and Linear layers; FLOPs = 2 x MACs.
- Dense counts equal ``torch.utils.flop_counter.FlopCounterMode`` / 2 (checked in the tests on every model).
- Dynamic counts are per instance: a consumer with k of its C input channels active costs k/C of its MACs
  (for grouped and depthwise convs this equals sum_g k_g/C_g of the per-group share).
- Overhead (saliency: one multiply-add per element, C*H*W, plus C for the threshold, per selected point) is
  reported separately as ``overhead_macs`` and included in ``flops_reduction`` and the theoretical speedup.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from instaprune.method.points import PrunePoint

__all__ = [
    "conv_linear_macs",
    "layer_macs",
    "flop_counter_macs",
    "dynamic_macs",
    "overhead_macs",
    "reduction_summary",
    "flops_reduction",
]


def flop_counter_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs per instance according to PyTorch's ``FlopCounterMode`` (which counts FLOPs = 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // example_input.shape[0]


def conv_linear_macs(m: nn.Module, out: torch.Tensor) -> int:
    """MACs of one Conv2d / Linear call for one instance (batch dimension 0): FlopCounterMode's count / 2."""
    n = out.shape[0]
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return out.numel() // n * (m.in_channels // m.groups) * kh * kw
    return out.numel() // n * m.in_features


def layer_macs(model: nn.Module, example_input: torch.Tensor, with_input_shapes: bool = False):
    """Per-instance MACs of every Conv2d and Linear of ``model`` on ``example_input`` (summed over calls);
    with ``with_input_shapes`` also each layer's input shape (of its first call)."""
    macs: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook(name: str):
        def f(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            macs[name] = macs.get(name, 0) + conv_linear_macs(m, out)
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape))
        return f

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not name.startswith("instaprune_gates."):  # gate predictors
            handles.append(m.register_forward_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return (macs, shapes) if with_input_shapes else macs


def overhead_macs(points: Iterable[PrunePoint]) -> int:
    """Per-instance cost of computing saliencies and thresholds at the given (selected) points."""
    return sum(p.overhead_macs for p in points)


def dynamic_macs(
    dense_macs: int, points: Iterable[PrunePoint], active: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Per-instance MACs (without overhead) given the number of active channels per point.

    ``active[name]`` is an integer tensor (N,) of kept input channels at that point; points not in ``active``
    run dense.
    """
    saved = None
    for p in points:
        if p.name not in active:
            continue
        k = active[p.name].to(torch.float64)
        s = (p.channels - k) * p.macs_per_channel
        saved = s if saved is None else saved + s
    if saved is None:
        raise ValueError("dynamic_macs: no active-channel counts given")
    return dense_macs - saved


def flops_reduction(mean_dynamic_macs: float, dense_macs: float, overhead: float = 0.0) -> float:
    """The one FLOPs-reduction formula: ``1 - (mean dynamic MACs + overhead) / dense MACs`` (never clipped).
    Every module that reports a reduction (calibration, the prune-aware controller, evaluation, the engine, the
    gates) calls this."""
    return 1.0 - (float(mean_dynamic_macs) + float(overhead)) / float(dense_macs)


def reduction_summary(per_instance_macs: torch.Tensor, dense_macs: int, overhead: int) -> dict[str, Any]:
    """``flops_reduction`` statistics: 1 - (dynamic + overhead) / dense, per instance, never clipped."""
    m = per_instance_macs.to(torch.float64)
    red = 1.0 - (m + overhead) / dense_macs  # flops_reduction() per instance
    q = torch.quantile(red, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    mean_dyn = float(m.mean())
    executed = mean_dyn + overhead
    per_image_flops = 2 * (m + overhead)
    p10, p90 = torch.quantile(per_image_flops, torch.tensor([0.1, 0.9], dtype=torch.float64)).tolist()
    return {
        "flops_reduction": flops_reduction(float(m.mean()), dense_macs, overhead),
        "flops_reduction_p10": float(q[0]),
        "flops_reduction_p50": float(q[1]),
        "flops_reduction_p90": float(q[2]),
        "dense_macs": int(dense_macs),
        "mean_dynamic_macs": mean_dyn,
        "overhead_macs": int(overhead),
        "theoretical_speedup": dense_macs / executed,
        "per_image_flops_p90_over_p10": p90 / p10 if p10 > 0 else float("inf"),
    }
