"""Layers of the fast dynamic engine (``engine.py``): BN-folded dense convs and the dynamic conv consumers
(the Linear consumer is in ``engine_linear.py``).

A dynamic consumer computes the saliency of its input, the keep mask (the rule of
:func:`instaprune.masked.keep_mask`), then only the active input channels (``kernels.py``):

- saliency and threshold: ``engine_saliency.py`` (per-channel L2 norms, numpy threshold and floor);
- execution, per call (the strategy rule; ``EngineContext.strategy`` forces one strategy everywhere):

  * full mask (nothing pruned): the plain folded conv, no masking pass;
  * batch 1, groups=1 or depthwise: ``loop`` = exact work (gathered input channels + gathered OIHW weight
    columns, one conv, on the dense conv's backend; depthwise: only the active channels are computed, the
    pruned ones are filled with the constant ``act(folded bias)``), unless the kernels' cost model (groups=1)
    or the 60 % rule (depthwise) prefers the masked dense conv;
  * batch > 1 on channels_last (``to_dynamic``'s default above batch 1): the cheapest by the kernels' cost
    model adjusted for NHWC (``_pick_batch_cl``) of per-instance ``loop``, ``union`` (one conv on the batch's
    union of channels, others zeroed), the masked ``dense`` conv, and ``padded`` (one grouped conv over every
    instance's active channels padded to the largest count, on NCHW copies: wins for small convs such as
    CIFAR ResNet layers); grouped/depthwise convs choose among the NCHW kernels plus both relayouts, or the
    masked dense conv in place; the output stays channels_last;
  * NCHW batches (``channels_last=False``): :func:`instaprune.kernels.choose_strategy` (loop / padded / union
    / dense; ``bucket`` on request), run by :class:`instaprune.kernels.SparseInputConv2d`.
- accounting: each call keeps (strategy, mask, output pixels); :func:`executed_slots` turns that into the
  channel-instances actually computed, so the engine reports the MACs the masks require and the MACs it ran.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from instaprune.core.errors import ConfigError
from instaprune.engine._kernels import COST, MaskStats, SparseInputConv2d, choose_strategy, strategy_costs
from instaprune.engine._kernels_impl import greedy_buckets
from instaprune.engine._saliency import channel_norms, threshold_keep
from instaprune.method.thresholds import ThresholdConfig

__all__ = ["ENGINE_STRATEGIES", "EngineContext", "EngineKnobs", "FoldedConv2d", "DynamicConv2d", "threshold_keep",
           "executed_slots", "apply_activation", "channel_norms"]

ENGINE_STRATEGIES = ("auto", "dense", "loop", "padded", "union", "bucket")
#: batched channels_last choice: per-instance convs cost this much more per MAC than the cost model says
#: (measured 1.1-1.6x the batched conv's per-MAC time on ResNet-18 shapes at batch 32; 1.15 keeps loop where
#: it won by > 15 % and hands near-ties to the batched dense / union conv)
_LOOP_PENALTY = 1.15
#: ns per element of a channels_last <-> NCHW copy (``padded`` runs on NCHW inside a channels_last batch)
_RELAYOUT_NS = 0.5
#: the cost model with NHWC channel gathers (index_select over the rows of the (N*H*W, C) view: ~0.6 ns per
#: element measured, against 0.1-0.2 ns for whole NCHW planes)
_COST_CL = {**COST, "xf": 0.6}
#: tuning of the batched channels_last choice: candidates within this factor of the model's best, at most
#: this many, each timed this many times (the minimum counts)
_TUNE_SPAN, _TUNE_MAX, _TUNE_TRIES = 3.0, 3, 2
_NATIVE_NUMEL = 20480  # PyTorch's batch-1 threshold between its native conv and oneDNN (Convolution.cpp)
_SCRATCH_BYTES = 32 << 20  # glibc's largest heap-served allocation; larger ones are mmap'ed per call


@dataclass
class EngineContext:
    """State shared by the dynamic layers of one engine (a plain object: no per-call module overhead).

    forced: point -> bool (N, C) masks overriding the thresholds (kept as numpy too, converted once when
    set); strategy: ``auto`` or one forced strategy; record: keep each call's saliencies, thresholds and masks
    in ``records`` (for tests and reports); tune: let ``auto`` time its candidates on channels_last batches
    (see ``DynamicConv2d._pick_batch_cl``)."""

    forced_masks: dict[str, torch.Tensor] | None = None
    forced_pays_saliency: bool = False  # benchmarks: compute (and discard) the saliencies under forced masks
    strategy: str = "auto"
    record: bool = False
    profile: bool = False  # wrap saliency and sparse execution in torch.profiler scopes
    tune: bool = True
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    scratch: torch.Tensor | None = None  # reusable buffer for large masked copies (consumed at once)
    forced_np: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def forced(self) -> dict[str, torch.Tensor] | None:
        return self.forced_masks

    @forced.setter
    def forced(self, masks: dict[str, torch.Tensor] | None) -> None:
        self.forced_masks = masks
        self.forced_np = {} if masks is None else {
            n: np.ascontiguousarray(torch.as_tensor(m).to(torch.bool).cpu().numpy()) for n, m in masks.items()}

    def scratch_like(self, x: torch.Tensor) -> torch.Tensor:
        """A tensor shaped and strided like ``x`` in the shared scratch buffer (grown when needed)."""
        if self.scratch is None or self.scratch.numel() < x.numel() or self.scratch.dtype != x.dtype \
                or self.scratch.device != x.device:
            self.scratch = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
        return self.scratch.as_strided(x.shape, x.stride())


def apply_activation(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "relu":
        return out.relu_()
    if activation == "relu6":
        return out.clamp_(0.0, 6.0)
    return out


def _is_cl(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _const_like(const: torch.Tensor, x: torch.Tensor, n: int, ho: int, wo: int) -> torch.Tensor:
    """(n, C_out, ho, wo) filled with ``const`` per channel, in x's memory format."""
    fmt = torch.channels_last if _is_cl(x) else torch.contiguous_format
    return const[None, :, None, None].expand(n, const.numel(), ho, wo).contiguous(memory_format=fmt)


def _gather_channels(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[:, idx]`` keeping x's memory format (channels_last: one row gather on the (NHW, C) view)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        return flat.index_select(1, idx).view(n, h, w, idx.numel()).permute(0, 3, 1, 2)
    return x.index_select(1, idx)


class FoldedConv2d(nn.Module):
    """A dense Conv2d with folded BN and an optional fused ReLU/ReLU6 (the non-selected convs)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d,
                 activation: str | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return apply_activation(out, self.activation)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, stride={self.stride}, groups={self.groups}, " \
               f"act={self.activation}"


class DynamicConv2d(nn.Module):
    """Consumer conv of a selected prune point: saliency -> keep mask -> sparse conv (see module docs).

    The per-call path reads plain attributes (``_p``, refreshed when the module is moved or cast), not
    module buffers: ``nn.Module.__getattr__``/``__setattr__`` cost microseconds that add up at batch 1."""

    def __init__(self, name: str, sparse: SparseInputConv2d, tau: float, cfg: ThresholdConfig,
                 ctx: EngineContext) -> None:
        super().__init__()
        self.name, self.sparse, self.tau, self.cfg = name, sparse, float(tau), cfg
        self.floor = cfg.floor(sparse.in_channels)
        self._ctx = [ctx]  # a list: not registered, no state_dict entry
        self.last: tuple[str, np.ndarray, int] | None = None  # (strategy, keep mask, output pixels)
        cg = sparse.in_channels // sparse.groups
        self.depthwise = sparse.groups > 1 and cg == 1
        # constant output of a pruned depthwise channel (bias after the fused activation), per output channel
        self.register_buffer("const", apply_activation(sparse.bias.clone(), sparse.activation))
        self.register_buffer("mult_ar", torch.arange(sparse.out_channels // sparse.groups))
        self._p: dict | None = None
        self._picks: dict[tuple, str] = {}
        self._tuned: dict[tuple, dict] = {}  # batched regime -> candidates, their times, the pick

    def _apply(self, fn, recurse=True):
        self._p = None
        return super()._apply(fn, recurse)

    def params(self) -> dict:
        if self._p is None:
            sp = self.sparse
            self._p = {"w": sp.weight, "b": sp.bias, "const": self.const, "mult_ar": self.mult_ar,
                       "stride": sp.stride, "padding": sp.padding, "dilation": sp.dilation,
                       "groups": sp.groups, "act": sp.activation, "cout": sp.out_channels,
                       "kernel": sp.kernel_size, "ctx": self._ctx[0], "sparse": sp,
                       "mkldnn1": self._mkldnn_eligible(), "out_hw": {}}
        return self._p

    def _mkldnn_eligible(self) -> bool | None:
        """PyTorch runs a batch-1 fp32 conv on its native im2col path when the input has at most 20480
        elements (and on it always for 1x1 stride-1 convs with one thread), else on oneDNN. Gathering k of C
        channels can cross that line and switch backend (measured 25 % slower on ResNet-18's 256-of-512
        @ 7x7), so the gathered conv keeps the dense conv's backend: see ``_single``."""
        sp = self.sparse
        if not torch.backends.mkldnn.is_available() or sp.groups != 1:
            return None
        return sp.stride != (1, 1) or sp.dilation != (1, 1) or sp.kernel_size != (1, 1)

    @property
    def ctx(self) -> EngineContext:
        return self._ctx[0]

    def mask(self, x: torch.Tensor, ctx: EngineContext) -> np.ndarray:
        if ctx.forced_masks is not None and not ctx.forced_pays_saliency:
            return ctx.forced_np[self.name]
        _, _, h, w = x.shape
        hw = h * w
        norms = channel_norms(x)
        norms = (norms if norms.is_cpu else norms.cpu()).numpy()
        keep, thr = threshold_keep(norms, self.tau, self.cfg, hw, self.floor)
        if ctx.forced_masks is not None:
            return ctx.forced_np[self.name]
        if ctx.record:
            scale = 1.0 / math.sqrt(hw)
            ctx.records[self.name] = {"saliency": norms * scale, "threshold": np.reshape(thr, (-1, 1)) * scale,
                                      "keep": keep}
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self._p or self.params()
        ctx = p["ctx"]
        if ctx.profile:  # benchmarks' time breakdown: named profiler scopes (not on the fast path)
            with torch.profiler.record_function("instaprune.saliency"):
                keep = self.mask(x, ctx)
            with torch.profiler.record_function("instaprune.sparse"):
                return self.run(x, keep, p, ctx)
        return self.run(x, self.mask(x, ctx), p, ctx)

    def run(self, x: torch.Tensor, keep: np.ndarray, p: dict, ctx: EngineContext) -> torch.Tensor:
        """The conv of x with the channels of ``keep`` (N, C) only, by the rule of the module docs."""
        n, c, h, w = x.shape
        sp = p["sparse"]
        ho, wo = p["out_hw"].get((h, w)) or p["out_hw"].setdefault((h, w), sp.out_hw(h, w))
        k_sum = int(np.count_nonzero(keep))
        strategy = ctx.strategy
        if k_sum == n * c:
            strategy = "dense"
            out = apply_activation(F.conv2d(x, p["w"], p["b"], p["stride"], p["padding"], p["dilation"],
                                            p["groups"]), p["act"])
        elif n == 1 and (p["groups"] == 1 or self.depthwise) and strategy in ("auto", "loop", "dense"):
            if strategy == "auto":
                strategy = self._pick_single(c, k_sum, (h, w), (ho, wo), p)
            if strategy == "loop":
                out = self._single(x, keep[0], ho, wo, p)
            else:
                out = self._masked_dense(x, keep, p)
        elif _is_cl(x):  # channels_last batch (to_dynamic's layout above batch 1); the output stays NHWC
            mask = torch.from_numpy(keep)
            trial = None
            if strategy == "auto":
                strategy, trial = self._pick_batch_cl(MaskStats.of(mask), (h, w), (ho, wo), p, ctx.tune)
                t0 = time.perf_counter()
            if p["groups"] == 1 and strategy == "loop":
                out = torch.cat([self._single(x[i:i + 1], keep[i], ho, wo, p) for i in range(n)])
            elif p["groups"] == 1 and strategy == "union":
                out = self._union(x, keep, mask, p)
            elif strategy == "dense":
                out = self._masked_dense(x, keep, p)
            else:  # the NCHW kernels (padded, bucket; grouped loop/union): relayout in and out
                out = sp(x, mask, strategy).contiguous(memory_format=torch.channels_last)
            if trial is not None:
                trial["times"][strategy].append(time.perf_counter() - t0)
                if all(len(v) >= _TUNE_TRIES for v in trial["times"].values()):
                    trial["pick"] = min(trial["times"], key=lambda k: min(trial["times"][k]))
        else:
            mask = torch.from_numpy(keep)
            if strategy == "auto":
                strategy = choose_strategy(MaskStats.of(mask), p["cout"], p["groups"], p["kernel"], (h, w),
                                           (ho, wo))
            out = sp(x, mask, strategy)
        self.__dict__["last"] = (strategy, keep, ho * wo)
        return out

    @staticmethod
    def _masked_dense(x: torch.Tensor, keep: np.ndarray, p: dict) -> torch.Tensor:
        """Masked dense conv in x's own memory format. A masked copy above 32 MB goes to the context's
        reusable scratch buffer: glibc serves such sizes by mmap, so a fresh tensor page-faults on every call
        (ResNet-50's 32x256x56x56 masking pass: 54 ms fresh; measured)."""
        m = torch.from_numpy(keep).to(x.dtype)[:, :, None, None]
        if x.numel() * x.element_size() > _SCRATCH_BYTES:
            xm = torch.mul(x, m, out=p["ctx"].scratch_like(x))
        else:
            xm = x * m
        return apply_activation(F.conv2d(xm, p["w"], p["b"], p["stride"], p["padding"], p["dilation"],
                                         p["groups"]), p["act"])

    @staticmethod
    def _union(x: torch.Tensor, keep: np.ndarray, mask: torch.Tensor, p: dict) -> torch.Tensor:
        """One conv on the batch's union of active channels (layout-preserving gather), others zeroed."""
        union = keep.any(0)
        idx = torch.from_numpy(np.flatnonzero(union))
        if idx.numel() == 0:
            n, _, h, w = x.shape
            return _const_like(p["const"], x, n, *p["sparse"].out_hw(h, w))
        xg = _gather_channels(x, idx)
        sub = keep[:, union]
        if not sub.all():
            xg = xg * torch.from_numpy(sub).to(x.dtype)[:, :, None, None]
        out = F.conv2d(xg, p["w"].index_select(1, idx), p["b"], p["stride"], p["padding"], p["dilation"])
        return apply_activation(out, p["act"])

    def _pick_batch_cl(self, stats: MaskStats, in_hw: tuple[int, int], out_hw: tuple[int, int], p: dict,
                       tune: bool) -> tuple[str, dict | None]:
        """Batch > 1 on channels_last: (strategy, the tuning entry when this call is a timed trial).

        The kernels' cost model adjusted for this layout ranks the candidates: gathering channels from NHWC
        rows costs ``_COST_CL['xf']`` ns per element (measured ~0.6 ns against 0.1-0.2 ns for NCHW planes),
        per-instance convs cost ``_LOOP_PENALTY`` more per MAC, the NCHW kernels (padded; every non-dense
        strategy of a grouped conv) pay both relayouts, and the union is dropped when it is every channel.
        The model misranks small convs (e.g. CIFAR ResNet-56 layers at batch 32: oneDNN's grouped conv with
        tiny groups is 2-3x slower per MAC than modelled at 16 channels and faster at 64), so with ``tune``
        the first calls of each regime (batch, input size, keep ratio and union size in eighths) time the
        candidates the model rates within ``_TUNE_SPAN`` of its best (at most ``_TUNE_MAX``), each
        ``_TUNE_TRIES`` times, and the fastest (minimum time) is kept for that regime."""
        g = p["groups"]
        relayout = (stats.n * stats.channels * in_hw[0] * in_hw[1]
                    + stats.n * p["cout"] * out_hw[0] * out_hw[1]) * _RELAYOUT_NS / 1e3
        cost = strategy_costs(stats, p["cout"], g, p["kernel"], in_hw, out_hw)
        if g == 1:
            cl = strategy_costs(stats, p["cout"], 1, p["kernel"], in_hw, out_hw, k=_COST_CL)
            cost.update(loop=cl["loop"] * _LOOP_PENALTY, union=cl["union"])
            cost["padded"] += relayout
        else:
            for key in ("loop", "union", "padded"):
                cost[key] += relayout
        if stats.union == stats.channels:
            del cost["union"]
        best = min(cost, key=cost.__getitem__)
        if not tune:
            return best, None
        nc = stats.n * stats.channels
        key = (stats.n, in_hw, round(8 * stats.k_sum / nc), round(8 * stats.union / stats.channels))
        entry = self._tuned.get(key)
        if entry is None:
            cands = sorted((s for s in cost if cost[s] <= _TUNE_SPAN * cost[best]), key=cost.__getitem__)
            entry = self._tuned[key] = {"times": {s: [] for s in cands[:_TUNE_MAX]}, "pick": None}
            if len(entry["times"]) == 1:
                entry["pick"] = best
        if entry["pick"] is not None:
            return entry["pick"], None
        todo = min(entry["times"], key=lambda k: len(entry["times"][k]))
        return todo, entry

    @property
    def tuning(self) -> bool:
        """True while a batched regime this layer met is still timing its candidates."""
        return any(e["pick"] is None for e in self._tuned.values())

    def _pick_single(self, c: int, k: int, in_hw: tuple[int, int], out_hw: tuple[int, int], p: dict) -> str:
        """Batch 1: ``loop`` (exact work) or the masked dense conv. Depthwise: loop up to 60 % of the channels
        kept (measured on MobileNetV2's depthwise shapes: gathering, computing and scattering k planes beats
        masking and computing all C planes only below about that); groups=1: the kernels' cost model."""
        if self.depthwise:
            return "loop" if k <= 0.6 * c else "dense"
        key = (k, in_hw)
        pick = self._picks.get(key)
        if pick is None:  # memoised: the cost model is pure Python arithmetic, ~5 us per call
            stats = MaskStats(1, c, k, k, k)
            cost = strategy_costs(stats, p["cout"], p["groups"], p["kernel"], in_hw, out_hw)
            pick = self._picks[key] = "dense" if cost["dense"] < cost["loop"] else "loop"
        return pick

    def _single(self, x: torch.Tensor, keep: np.ndarray, ho: int, wo: int, p: dict) -> torch.Tensor:
        """Batch 1, exact work: gather the active channels (and their weights), one conv."""
        idx = torch.from_numpy(np.flatnonzero(keep))
        if idx.numel() == 0:
            return _const_like(p["const"], x, 1, ho, wo)
        xg = _gather_channels(x, idx)
        if not self.depthwise:
            wg = p["w"].index_select(1, idx)
            if (xg.numel() <= _NATIVE_NUMEL < x.numel() and xg.is_contiguous()
                    and p["mkldnn1"] is not None and (p["mkldnn1"] or torch.get_num_threads() > 1)):
                out = torch.mkldnn_convolution(xg, wg, p["b"], p["padding"], p["stride"], p["dilation"], 1)
            else:
                out = F.conv2d(xg, wg, p["b"], p["stride"], p["padding"], p["dilation"])
            return apply_activation(out, p["act"])
        mult = p["mult_ar"].numel()
        oidx = idx if mult == 1 else (idx[:, None] * mult + p["mult_ar"]).reshape(-1)
        part = F.conv2d(xg, p["w"].index_select(0, oidx), p["b"].index_select(0, oidx), p["stride"],
                        p["padding"], p["dilation"], idx.numel())
        out = _const_like(p["const"], x, 1, ho, wo)
        out.index_copy_(1, oidx, apply_activation(part, p["act"]).contiguous())
        return out


def executed_slots(strategy: str, keep: np.ndarray, groups: int) -> int:
    """Channel-instances a call computed (each costs the point's MACs per channel): what the masks require
    for the exact strategies, more for padding, the union or the dense fallback."""
    n, c = keep.shape
    if strategy == "dense":
        return n * c
    if groups == 1:
        if strategy == "loop":
            return int(keep.sum())
        if strategy == "padded":
            return n * int(keep.sum(1).max())
        if strategy == "union":
            return n * int(keep.any(0).sum())
        buckets = greedy_buckets(torch.from_numpy(keep))
        return sum(len(b) * int(keep[b].any(0).sum()) for b in buckets)
    cnt = keep.reshape(n, groups, c // groups).sum(2)  # (N, G) active channels per group
    if strategy == "loop":
        return int(sum((row > 0).sum() * row.max() for row in cnt))
    if strategy == "padded":
        return n * int((cnt > 0).sum(1).max()) * int(cnt.max())
    u = keep.any(0).reshape(groups, c // groups).sum(1)  # union (shared index) and bucket fallback
    return n * int((u > 0).sum()) * int(u.max())


class EngineKnobs:
    """The run-time knobs both engines (post-hoc :class:`~instaprune.engine.dynamic.DynamicModel`, gated
    ``GatedEngine``) expose, kept in their context ``self._ctx``: ``tune``, ``strategy`` (checked against
    ``_STRATEGIES``), ``record`` and ``records``."""

    _STRATEGIES: tuple[str, ...] = ()
    _STRATEGY_LABEL = "strategy"
    _ctx: Any

    @property
    def tune(self) -> bool:
        """Let ``auto`` time its candidates on the first calls of each batched regime (default True)."""
        return self._ctx.tune

    @tune.setter
    def tune(self, value: bool) -> None:
        self._ctx.tune = bool(value)

    @property
    def strategy(self) -> str:
        return self._ctx.strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        value = self._strategy_alias(value)
        if value not in self._STRATEGIES:
            raise ConfigError(f"{self._STRATEGY_LABEL} must be one of {', '.join(self._STRATEGIES)}, got {value!r}")
        self._ctx.strategy = value

    def _strategy_alias(self, value: str) -> str:
        return value

    @property
    def record(self) -> bool:
        """Keep each layer's selection details of the last forward in ``records``."""
        return self._ctx.record

    @record.setter
    def record(self, value: bool) -> None:
        self._ctx.record = bool(value)

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        return self._ctx.records

