"""The fast dynamic engine: ``to_dynamic(model, points, plan)`` -> an eval-only model whose cost follows
each instance's active channels, equal to :class:`instaprune.masked.MaskedModel` (the reference) to float
tolerance.

What ``to_dynamic`` builds (``engine_graph.py`` rewrites the graph, ``engine_modules.py`` has the layers):

- BatchNorm folded into the preceding conv, ReLU/ReLU6 fused (torch.fx; module replacement when fx cannot
  trace, then checked against the original model on an example input);
- the consumer of every selected prune point replaced by a dynamic layer that computes the saliency of its
  input, the keep mask (``keep_mask``'s rule; thresholds ``plan.taus * scale``) and the sparse conv, with
  the per-batch strategy rule of ``engine_modules.py`` (full mask -> plain conv; batch 1 -> exact-work
  gather unless the cost model prefers the masked dense conv; batch > 1 -> per-instance loop, the batch's
  union, padding to the largest active set (one grouped conv) or the masked dense conv, by the cost model);
  a Linear consumer (``engine_linear.py``) reads only its active weight rows (``embedding_bag``);
- a pruned depthwise channel is not computed: its output is the constant ``act(folded bias)``;
- every other conv becomes a folded dense conv and ``nn.MaxPool2d`` a faster NCHW pool: with ``plan=None``
  the result is the BN-folded dense model (one of the dense baselines of the benchmark);
- memory format: NCHW at batch 1, channels_last above (``channels_last=None``; see :func:`to_dynamic`).

Saliencies are computed on the folded model's tensors, so a channel whose saliency lies within float
rounding of its threshold may flip against the reference; the tests bound and count such flips.
After each forward: ``last_masks()``, ``strategies()``, ``instance_macs()`` (what the masks require, the
convention of ``flops.py``), ``executed_macs()`` (what ran, padding/union/dense fallbacks included) and
``summary()`` with ``flops_reduction`` and ``executed_flops_reduction``.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from instaprune.core.errors import ConfigError, ModelError
from instaprune.engine._gated import GATE_STRATEGIES, GatedEngine, build_gated
from instaprune.engine._graph import check_equal, rewrite
from instaprune.engine._kernels import SparseInputConv2d, fold_bn
from instaprune.engine._linear import DynamicLinear
from instaprune.engine._modules import (
    ENGINE_STRATEGIES,
    DynamicConv2d,
    EngineContext,
    EngineKnobs,
    FoldedConv2d,
    executed_slots,
)
from instaprune.method.flops import flops_reduction
from instaprune.method.plan import Plan
from instaprune.method.points import PointReport, find_prune_points
from instaprune.method.thresholds import ThresholdConfig

__all__ = ["ENGINE_STRATEGIES", "GATE_STRATEGIES", "DynamicModel", "GatedEngine", "to_dynamic", "fold_dense"]

log = logging.getLogger(__name__)
_LAYOUT_TRIES = 3  # timed dense batch-1 calls per layout when a new input shape chooses its layout
#: batch 1 runs NHWC only when the dense network is this much faster in it: gathering channels from NHWC rows
#: costs ~4x more per element than from NCHW planes, so the dynamic path keeps NCHW unless its convs are far
#: slower (measured: dense NHWC 1.09-1.19x faster for CIFAR ResNet-56 / MobileNetV2 at one thread and MobileNetV2
#: at two, where the dynamic model was still faster in NCHW; 2.2x for ResNet-56 at two threads, where NHWC
#: made the dynamic model 1.8x faster)
_LAYOUT_MARGIN = 1.5


class DynamicModel(EngineKnobs, nn.Module):
    """The executable dynamic model (eval only: forward runs under ``torch.inference_mode``)."""

    _STRATEGIES = ENGINE_STRATEGIES

    def __init__(self, net: nn.Module, ctx: EngineContext, points: PointReport, taus: dict[str, float],
                 original: nn.Module, method: str, channels_last: bool | None) -> None:
        super().__init__()
        self.net = net
        self._ctx = ctx
        self.report = points
        self.taus = dict(taus)
        self.method = method
        self.channels_last = channels_last
        self._original = [original]  # not a submodule: only used to count MACs at new resolutions
        self._tables: dict[tuple[int, ...], PointReport] = {}
        self.dynamic: dict[str, DynamicConv2d | DynamicLinear] = {
            m.name: m for m in net.modules() if isinstance(m, (DynamicConv2d, DynamicLinear))}
        self._batch = 0
        self._shape: tuple[int, ...] = ()
        #: batch-1 layout per (input shape, threads): channels_last or not
        self._layouts: dict[tuple, bool] = {}

    # ---------------------------------------------------------------- running
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._batch, self._shape = x.shape[0], tuple(x.shape[1:])
        with torch.inference_mode():
            if x.dim() != 4:
                return self.net(x)
            cl = self._layout(x)
            return self.net(x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format))

    def _layout(self, x: torch.Tensor) -> bool:
        """channels_last? Fixed by ``channels_last``; else NHWC above batch 1 and, at batch 1, the layout in
        which this network runs faster for this input shape and thread count: with ``tune`` the first
        batch-1 call of a shape times the network with every channel kept (the plain folded convs: the same
        work whatever the masks) ``_LAYOUT_TRIES`` times in each layout, alternating, and takes NHWC only
        when it is ``_LAYOUT_MARGIN`` times faster (CIFAR ResNet-56 at two threads); without ``tune``: NCHW."""
        if self.channels_last is not None:
            return self.channels_last
        if x.shape[0] > 1:
            return True
        if not self._ctx.tune:
            return False
        key = (self._shape, torch.get_num_threads())
        if key not in self._layouts:
            self._layouts[key] = self._probe_layout(x)
            log.debug("batch-1 layout for %s: %s", key, "channels_last" if self._layouts[key] else "NCHW")
        return self._layouts[key]

    def _probe_layout(self, x: torch.Tensor) -> bool:
        ctx = self._ctx
        saved = ctx.forced_masks, ctx.forced_np, ctx.forced_pays_saliency, ctx.record
        channels = {n: p.channels for n, p in self._table().by_name().items() if n in self.dynamic}
        ctx.forced = {n: torch.ones(1, c, dtype=torch.bool) for n, c in channels.items()}
        ctx.forced_pays_saliency, ctx.record = False, False
        times: dict[bool, list[float]] = {False: [], True: []}
        try:
            for cl in (False, True):  # untimed first call of each layout (one-time setup)
                self.net(x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format))
            for _ in range(_LAYOUT_TRIES):
                for cl in (False, True):
                    xi = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
                    t0 = time.perf_counter()
                    self.net(xi)
                    times[cl].append(time.perf_counter() - t0)
        finally:
            ctx.forced_masks, ctx.forced_np, ctx.forced_pays_saliency, ctx.record = saved
        return _LAYOUT_MARGIN * min(times[True]) < min(times[False])

    @property
    def tuning(self) -> bool:
        """True while a layer's batched strategy is still being timed (the batch-1 layout is chosen at once)."""
        return any(m.tuning for m in self.dynamic.values() if isinstance(m, DynamicConv2d))

    def warmup(self, x: torch.Tensor, max_calls: int = 16) -> int:
        """Run ``x`` until the timing trials it leads to are over (every layer's candidate strategies for
        batches, the ``tune`` option of ``engine_modules``; batch 1 chooses its layout on the first call);
        returns the number of forwards run (at least one)."""
        calls = 0
        while calls < max_calls:
            self(x)
            calls += 1
            if not self.tuning:
                break
        return calls

    @property
    def forced(self) -> dict[str, torch.Tensor] | None:
        """Masks (point -> bool (N, C)) that override the thresholds, as ``MaskedModel.forced``."""
        return self._ctx.forced

    @forced.setter
    def forced(self, masks: dict[str, torch.Tensor] | None) -> None:
        if masks is not None:
            missing = [n for n in self.dynamic if n not in masks]
            if missing:
                raise ConfigError(f"forced masks missing for point(s): {', '.join(missing[:5])}")
        self._ctx.forced = masks

    # ---------------------------------------------------------------- accounting
    def last_masks(self) -> dict[str, torch.Tensor]:
        return {n: torch.from_numpy(m.last[1]) for n, m in self.dynamic.items() if m.last is not None}

    def strategies(self) -> dict[str, str]:
        return {n: m.last[0] for n, m in self.dynamic.items() if m.last is not None}

    def _table(self) -> PointReport:
        """Dense MACs and MACs per channel at the last input's resolution."""
        if self._shape == tuple(self.report.input_shape[1:]):
            return self.report
        if self._shape not in self._tables:
            x = torch.zeros(1, *self._shape)
            self._tables[self._shape] = find_prune_points(self._original[0], x, shortcuts=True)
        return self._tables[self._shape]

    def _per_point(self) -> list[tuple[str, float, np.ndarray, int, int]]:
        by_name = self._table().by_name()
        out = []
        for n, m in self.dynamic.items():
            if m.last is None:
                raise ModelError(f"point {n} did not run in the last forward (call the model first)")
            groups = m.sparse.groups if isinstance(m, DynamicConv2d) else 1
            slots = executed_slots(m.last[0], m.last[1], groups)
            out.append((n, by_name[n].macs_per_channel, m.last[1], groups, slots))
        return out

    def instance_macs(self) -> torch.Tensor:
        """Per-instance MACs the last forward's masks require (no overhead), like ``MaskedModel``'s."""
        dense = float(self._table().dense_macs)
        saved = np.zeros(self._batch)
        for _, mpc, keep, _, _ in self._per_point():
            saved += (keep.shape[1] - keep.sum(1)) * mpc
        return torch.from_numpy(dense - saved)

    def executed_macs(self) -> float:
        """Mean MACs per instance the last forward actually executed (padding / union / dense included)."""
        n = self._batch
        saved = sum((keep.size - slots) * mpc for _, mpc, keep, _, slots in self._per_point())
        return float(self._table().dense_macs) - saved / n

    def overhead_macs(self) -> int:
        by_name = self._table().by_name()
        return sum(by_name[n].overhead_macs for n in self.dynamic)

    def summary(self) -> dict[str, Any]:
        """MACs and reductions of the last forward (docs/method.md section 7) and the strategies it used."""
        dense = float(self._table().dense_macs)
        over = self.overhead_macs() if self.dynamic else 0
        req = float(self.instance_macs().mean()) if self.dynamic else dense
        exe = self.executed_macs() if self.dynamic else dense
        return {
            "dense_macs": dense, "mean_dynamic_macs": req, "executed_macs": exe, "overhead_macs": over,
            "flops_reduction": flops_reduction(req, dense, over),
            "executed_flops_reduction": flops_reduction(exe, dense, over),
            "theoretical_speedup": dense / (req + over),
            "strategies": dict(collections.Counter(self.strategies().values())),
        }


def _taus(points: PointReport, plan: Plan | None,
          scale: float | None) -> tuple[dict[str, float], ThresholdConfig]:
    if plan is None:
        return {}, ThresholdConfig()
    plan.check(points)
    s = plan.scale if scale is None else float(scale)
    if s < 0:
        raise ConfigError(f"scale must be >= 0, got {s}")
    return {n: t * s for n, t in plan.taus.items()}, plan.thresholds


def to_dynamic(model: nn.Module, points: PointReport, plan: Plan | None = None, *, scale: float | None = None,
               strategy: str = "auto", channels_last: bool | None = None, check: bool = True,
               tune: bool = True) -> DynamicModel | GatedEngine:
    """Build the fast dynamic model of ``model`` for ``plan`` (``None``: the BN-folded dense model).

    ``points`` is the model's :func:`find_prune_points` report (it fixes the MACs accounting); ``scale``
    overrides ``plan.scale``; ``strategy`` forces one execution strategy (default ``auto``);
    ``channels_last``: run the network in NHWC (True), NCHW (False) or ``None`` = NHWC for batches above 1
    (measured: NHWC convs win at batch 32, e.g. ResNet-18 keep 1.0: 1.20 s vs 1.49 s, keep 0.5: 1.05 s vs
    1.16 s, 1 thread) and at batch 1 the layout measured faster on the first calls (``tune``; NCHW without).
    ``check`` compares the rewritten model with all channels kept against ``model`` on a random example input
    and raises :class:`ModelError` on a mismatch. ``tune``: on channels_last batches ``auto`` times its
    candidate strategies on the first calls of each regime and keeps the fastest, and batch 1 times both
    layouts (``DynamicModel.warmup`` runs an input until that settles); False = the cost model alone, NCHW at
    batch 1.

    A plan with gates (``plan.gates``) builds the gated engine instead (:class:`GatedEngine`, module
    ``_gated``): predictors first, producers computing only the kept channels, consumers reading only them;
    ``strategy`` is then one of ``GATE_STRATEGIES`` (``padded`` = ``grouped``). As in the reference
    (``evaluation.accuracy.dynamic_model``), a gated plan's post-hoc taus are not used."""
    if plan is not None and plan.gates is not None:
        plan.check(points)
        s = plan.scale if scale is None else float(scale)
        return build_gated(model, tuple(points.input_shape), plan.gates, scale=s, strategy=strategy,
                           channels_last=channels_last, check=check, tune=tune)
    taus, cfg = _taus(points, plan, scale)
    if strategy not in ENGINE_STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(ENGINE_STRATEGIES)}, got {strategy!r}")
    ctx = EngineContext(strategy=strategy, tune=tune)

    def build(name: str, m: nn.Module, bn: nn.BatchNorm2d | None, act: str | None) -> nn.Module | None:
        if isinstance(m, nn.Linear):
            return DynamicLinear(name, m, taus[name], cfg, ctx) if name in taus else None
        if m.padding_mode != "zeros":
            if name in taus:
                raise ModelError(f"{name}: padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
            return None
        w, b = fold_bn(m, bn) if bn is not None else (m.weight.detach(), m.bias)
        if name not in taus:
            return FoldedConv2d(w, b, m, act)
        sparse = SparseInputConv2d(w, b, stride=m.stride, padding=m.padding, dilation=m.dilation,
                                   groups=m.groups, activation=act)
        return DynamicConv2d(name, sparse, taus[name], cfg, ctx)

    example = torch.randn(points.input_shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            net, method = rewrite(model, example, build)
            engine = DynamicModel(net, ctx, points, taus, model, method, channels_last)
            missing = [n for n in taus if n not in engine.dynamic]
            if missing:
                raise ModelError(f"prune point(s) could not be made dynamic (consumer not found once in the "
                                 f"graph): {', '.join(missing[:5])}")
            if check:
                ref = model(example)
                engine.forced = {n: torch.ones(example.shape[0], p.channels, dtype=torch.bool)
                                 for n, p in points.by_name().items() if n in taus}
                ctx.tune = False  # the check is not a timing trial
                try:
                    check_equal(ref, engine(example), f"to_dynamic ({method})")
                finally:
                    engine.forced, ctx.tune = None, tune
    finally:
        model.train(was_training)
    log.info("dynamic engine (%s): %d dynamic points, channels_last=%s", method, len(engine.dynamic),
             channels_last)
    return engine


def fold_dense(model: nn.Module, points: PointReport, channels_last: bool = False) -> DynamicModel:
    """The BN-folded (ReLU-fused) dense model: ``to_dynamic`` with no plan."""
    return to_dynamic(model, points, None, channels_last=channels_last)
