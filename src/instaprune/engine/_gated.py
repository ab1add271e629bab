"""Predicted gates in the fast engine: ``to_dynamic(model, points, plan)`` with ``plan.gates`` set builds a
:class:`GatedEngine`, equal to the reference :class:`instaprune.method.gates.GatedModel` to float tolerance.

A gate sits on a tensor T made by ``conv P -> [BN] -> [act] -> ... [-> depthwise D -> BN -> act] -> T`` and read
only by the consumer conv C. The graph is rewritten as for the post-hoc engine (``_graph.rewrite``: BN folded,
ReLU/ReLU6 fused), then every P, D and C becomes a :class:`GatedConv2d`:

- P (the first producer) runs the gate's predictor on its input X first (global average pool -> linear or
  bottleneck -> ReLU = g (N, C)), selects each image's channels (top-k of g, or ``g > tau * scale`` with the
  floor; ``forced`` masks override) and chooses how the gate executes (:data:`GATE_STRATEGIES`, below);
- P computes only the kept output channels (gathered weight rows of the folded conv, bias and activation
  fused); D only the kept depthwise channels; the tensor between them stays *compact* (the kept channels only:
  there is no scatter back to full width anywhere on the chain), through any channel-wise op on the way
  (pooling, other activations, dropout);
- C reads the compact tensor with gathered weight columns; ``value`` gates fold g into those columns (or
  into the input multiplier of the ``union`` / ``dense`` strategies).

Execution of one gate (``strategy``, per gate and call; ``auto`` = the cost model :func:`site_costs`):

- ``grouped``: every image keeps its own channels; P, D and C each run as ONE grouped conv over the batch
  (images folded into groups, each group with its own gathered weights: (1, N*k, H, W)). With top-k every
  image has the same k; thresholds pad to the largest count with a zero weight row/column (exact). At batch
  1 this is the exact-work gathered conv. Runs in NCHW (a channels_last batch is converted at P's input and
  back at C's output);
- ``loop``: the same per-image compact tensor, one conv per image (threshold budgets: each image's own k);
- ``union``: one conv over the union of the batch's channels, each image's missing channels zeroed at C;
- ``dense``: every channel computed, masked at C (what a gate costs when it saves nothing).

A layer that is both C of one gate and P of the next (VGG, ResNet-50 bottlenecks, MobileNetV2 projections)
gathers rows and columns at once; its predictor pools the compact input and scatters the C_in-vector back.
Grouped (non-depthwise) convs on a gated chain (ResNeXt) run densely: the compact input is scattered back to
full width and the kept outputs are gathered after the conv (exact; they save nothing).

Layout and tuning: without ``tune``, batch 1 runs NCHW and batches channels_last. With ``tune``, the first call
of each (batch, input shape, threads, forced strategy) times every policy -- ``auto`` (per-gate cost model)
and each strategy forced on every gate (at batch 1: ``auto`` and ``dense``), in NCHW and channels_last --
alternating, and keeps the fastest.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from instaprune.core.errors import ConfigError, ModelError
from instaprune.engine._graph import check_equal, rewrite
from instaprune.engine._kernels import COST, fold_bn
from instaprune.engine._modules import EngineKnobs, FoldedConv2d, apply_activation
from instaprune.method.gates import GATES_ATTR, GateConfig, GatePlan, GateReport, GateSite, find_gates

__all__ = ["GATE_STRATEGIES", "GatedConv2d", "GatedEngine", "build_gated", "site_costs"]

log = logging.getLogger(__name__)

GATE_STRATEGIES = ("auto", "grouped", "loop", "union", "dense")
#: per-image convs pay this much more per MAC than a batched conv (the post-hoc engine's measured penalty)
_LOOP_PENALTY = 1.15
#: ns per element of a channels_last <-> NCHW copy
_RELAYOUT_NS = 0.5
#: tuning: timed rounds per candidate policy (the first is a warm-up; the minimum of the rest counts)
_TUNE_ROUNDS = 3
_TUNE_POLICIES = ("auto", "grouped", "union", "dense")
#: batch 1: gathered convs where the cost model says so (auto) or every gate dense, each in NCHW and NHWC (a
#: MobileNetV2's depthwise convs run faster in NHWC at 224x224, ResNets' small convs in NCHW)
_TUNE_POLICIES_B1 = ("auto", "dense")
#: batch 1: consumers whose output has at most this many pixels run as one GEMM (``_consumer_gemm``)
_GEMM_PIXELS = 64
#: batch 1 gathers plain rows / columns into a plain conv: ~0.3-0.4 ns per weight element (measured on ResNet-18
#: shapes: 1.2M elements in 0.33 ms as rows, 0.49 ms as columns, 1 thread), not the post-hoc kernels' 1.2 ns
#: (which includes oneDNN's per-call reorder, paid by the dense conv as well)
_COST_B1 = {**COST, "wf": 0.4}


def _key(name: str) -> str:
    return name.replace(".", "__")


class _Gate:
    """One gate at run time: its predictor, budget and the state of the last call (a plain object)."""

    def __init__(self, site: GateSite, cfg: GateConfig, keep: float, tau: float, predictor: nn.Module) -> None:
        self.site, self.name, self.c = site, site.name, site.channels
        self.cfg = cfg
        self.value = cfg.multiplier == "value"
        self.topk = cfg.selection == "topk"
        self.k = max(cfg.floor(self.c), min(self.c, round(keep * self.c)))
        self.tau = float(tau)
        self.floor = cfg.floor(self.c)
        lin = [m for m in predictor.modules() if isinstance(m, nn.Linear)]
        self.bottleneck = predictor.kind == "bottleneck"
        self.w1 = lin[0].weight.detach().clone() if self.bottleneck else None
        self.b1 = lin[0].bias.detach().clone() if self.bottleneck else None
        self.w, self.b = predictor.fc.weight.detach().clone(), predictor.fc.bias.detach().clone()
        self.order = -torch.arange(1, self.c + 1, dtype=self.w.dtype)  # rank of closed gates (see ``top``)
        self.layers: list[dict] = []  # geometry of P, D, C for the cost model (filled by build_gated)
        # state of the last call
        self.kind = "full"  # full | shared | per
        self.strategy = "dense"
        self.idx: torch.Tensor | None = None  # per: (N, K) with sentinel c for padding; shared: (u,)
        self.mult: torch.Tensor | None = None  # multiplier at C's input: per (N, K) (value); else (N, u or C)
        self.counts: np.ndarray = np.zeros(0)
        self.mask: torch.Tensor | None = None  # bool (N, C) when known (threshold / forced); else from idx
        self.n = 0
        self._mask_cache: tuple | None = None
        self._single_picks: dict[int, str] = {}
        self._counts: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------ prediction
    def scores(self, x: torch.Tensor, src: _Gate | None) -> torch.Tensor:
        """g (N, C) from the producer's input x (compact when x is another gate's tensor)."""
        z = (x if x.dtype == torch.float32 else x.float()).mean(dim=(2, 3))
        if src is not None:
            z = src.expand_pooled(z)
        if self.bottleneck:
            z = F.relu(F.linear(z, self.w1, self.b1))
        return F.linear(z, self.w, self.b).relu_()

    def top(self, g: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (N, k) of the k largest gate values, in any order (P and C use the same one); gates closed
        by the ReLU (g = 0) rank by channel index, lower first, as the reference's ``gates._top``."""
        return torch.where(g > 0, g, self.order).topk(k, dim=1, sorted=False).indices

    def expand_pooled(self, v: torch.Tensor) -> torch.Tensor:
        """The pooled compact tensor of this gate (N, K or u) at full width (N, C), multiplier applied: what
        the reference's next predictor reads (T masked and scaled at C's input)."""
        if self.mult is not None:
            v = v * self.mult
        if self.kind == "full":
            return v
        if self.kind == "shared":
            out = v.new_zeros(v.shape[0], self.c)
            out[:, self.idx] = v
            return out
        return v.new_zeros(v.shape[0], self.c + 1).scatter_(1, self.idx, v)[:, : self.c]

    def select(self, x: torch.Tensor, src: _Gate | None, ctx: GateContext) -> None:
        """Predict, select, choose the strategy and set this call's representation of T."""
        n = x.shape[0]
        self.n = n
        forced = ctx.forced_masks.get(self.name) if ctx.forced_masks is not None else None
        skip_g = forced is None and self.topk and self.k >= self.c and not self.value
        g = None
        if not skip_g and (forced is None or self.value or ctx.forced_pays_predictor):
            g = self.scores(x, src)
            if forced is not None and ctx.forced_pays_predictor and self.topk and self.k < self.c:
                self.top(g, self.k)  # benchmarks: the selection a top-k gate would run
        if forced is not None:
            mask = forced
            if mask.shape != (n, self.c):
                raise ConfigError(f"forced mask for gate {self.name} has shape {tuple(mask.shape)}, "
                                  f"expected {(n, self.c)}")
            self._from_mask(mask, g, ctx)
        elif skip_g or (self.topk and self.k >= self.c):
            self._full(n, g, None)
        elif self.topk:
            idx = self.top(g, self.k)
            self.mask = None
            counts = self._counts.get(n)
            if counts is None:
                counts = self._counts[n] = np.full(n, self.k)
            self.counts = counts
            self._choose(idx, g, ctx)
        else:
            mask = g > self.tau * ctx.scale
            mask.scatter_(1, self.top(g, self.floor), True)
            self._from_mask(mask, g, ctx)
        if ctx.record:
            ctx.records[self.name] = {"g": None if g is None else g.clone(), "keep": self.keep_mask()}

    def _full(self, n: int, g: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        self.kind, self.strategy, self.idx = "full", "dense", None
        self.mask = mask if mask is not None else None
        self.counts = np.full(n, self.c) if mask is None else mask.sum(1).numpy()
        mult = None
        if mask is not None and not bool(mask.all()):
            mult = mask.float()
        if self.value:
            mult = g if mult is None else mult * g
        self.mult = mult

    def _from_mask(self, mask: torch.Tensor, g: torch.Tensor | None, ctx: GateContext) -> None:
        cache = self._mask_cache
        if cache is not None and cache[0] is mask:  # forced masks: prepared once per mask tensor
            _, counts, idx = cache
        else:
            counts = mask.sum(1).numpy()
            kmax = int(counts.max())
            if kmax == 0 or int(counts.min()) == self.c:
                idx = None
            elif mask.shape[0] == 1:
                idx = mask[0].nonzero()[:, 0].view(1, -1)
            else:  # each row's kept channels in order, padded with the sentinel c
                order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)[:, :kmax]
                valid = torch.arange(kmax)[None, :] < torch.from_numpy(counts)[:, None]
                idx = torch.where(valid, order, self.c)
            if ctx.forced_masks is not None:
                self._mask_cache = (mask, counts, idx)
        n = mask.shape[0]
        self.counts = counts
        if idx is None:  # every channel kept (or none: only forced masks do this, and C then reads zeros)
            self._full(n, g, mask if int(counts.max()) == 0 else None)
            self.mask = mask
            return
        self.mask = mask
        self._choose(idx, g, ctx)

    def _choose(self, idx: torch.Tensor, g: torch.Tensor | None, ctx: GateContext) -> None:
        """idx: (N, K) kept channels per image (sentinel c = padding)."""
        n, kmax = idx.shape
        strategy = ctx.strategy
        if n == 1 and strategy != "dense":  # batch 1: the exact-work gathered convs, unless few channels are
            kmax = idx.shape[1]  # skipped and the gathers would cost more than they save (auto only)
            if strategy != "auto" or self._single(kmax) == "grouped":
                self.strategy, self.kind, self.idx = "grouped", "per", idx
                self.mult = torch.cat([g, g.new_zeros(1, 1)], 1).gather(1, idx) if self.value else None
                return
            strategy = "dense"
        union = None
        if strategy in ("auto", "union") and n > 1:
            used = torch.zeros(self.c + 1, dtype=torch.bool)
            used[idx.reshape(-1)] = True
            union = used[: self.c].nonzero()[:, 0]
        if strategy == "auto":
            u = union.numel() if union is not None else kmax
            cost = site_costs(self, n, int(self.counts.sum()), kmax, u, ctx.cl)
            if n == 1 or u == self.c:
                cost.pop("union")
            strategy = min(cost, key=cost.__getitem__)
        if n == 1 and strategy in ("union", "loop"):
            strategy = "grouped"
        self.strategy = strategy
        if strategy == "dense":
            self._full(n, g, self.keep_mask(idx))
            self.strategy = "dense"
            return
        if strategy == "union":
            mask = self.keep_mask(idx)
            sub = mask[:, union]
            self.kind, self.idx = "shared", union
            mult = None if bool(sub.all()) else sub.float()
            if self.value:
                gu = g[:, union]
                mult = gu if mult is None else mult * gu
            self.mult = mult
            self.mask = mask
            return
        self.kind, self.idx = "per", idx
        self.mult = None
        if self.value:
            self.mult = torch.cat([g, g.new_zeros(n, 1)], 1).gather(1, idx)

    def _single(self, k: int) -> str:
        """Batch 1: ``grouped`` (gathered weights, exact work) or ``dense`` by :func:`site_costs` with the batch-1
        gather constant (memoised per k)."""
        pick = self._single_picks.get(k)
        if pick is None:
            cost = site_costs(self, 1, k, k, k, False, k=_COST_B1)
            pick = self._single_picks[k] = "grouped" if cost["grouped"] <= cost["dense"] else "dense"
        return pick

    def keep_mask(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """bool (N, C) keep mask of the last call."""
        if self.mask is not None:
            return self.mask
        if idx is None:
            idx = self.idx if self.kind == "per" else None
        if idx is None:
            return torch.ones(self.n, self.c, dtype=torch.bool)
        m = torch.zeros(idx.shape[0], self.c + 1, dtype=torch.bool).scatter_(1, idx, True)[:, : self.c]
        self.mask = m
        return m

    def executed(self) -> np.ndarray:
        """Channels of T each image of the last call computed (padding, union, dense included)."""
        if self.kind == "full":
            return np.full(self.n, self.c, dtype=np.float64)
        if self.kind == "shared":
            return np.full(self.n, float(self.idx.numel()))
        return np.full(self.n, float(self.idx.shape[1]))  # grouped and loop: padded to the largest count


def site_costs(gate: _Gate, n: int, k_sum: int, k_max: int, union: int, cl: bool,
               k: dict[str, float] | None = None) -> dict[str, float]:
    """Modelled time (us) of one gate's layers under each strategy, with the post-hoc kernels' constants
    (:data:`instaprune.engine._kernels.COST`). Per layer L with m MACs per channel of T and image, w weight
    elements per channel of T, P pixels of the consumer's input:

    - dense   = N*C*m*mac + call (+ the masking pass N*C*P*xm at C)
    - union   = u*(N*m*mac + w*wf) + call (+ the masking pass N*u*P*xf at C)
    - grouped = N*k_max*(m*mac*rg + w*wf) + 2*call, rg = 1 + w*k_max/pad (oneDNN's grouped conv degrades as
      each group's weights grow) (+ the relayouts of P's input and C's output on channels_last); at batch 1 a
      plain conv on gathered weights: rg = 1, one call
    - loop    = sum_i k_i*(m*mac*1.15 + w*wf) + N*call
    """
    k = k or COST
    c = gate.c
    mac, wf, xf, xm, call = k["mac"] / 1e3, k["wf"] / 1e3, k["xf"] / 1e3, k["xm"] / 1e3, k["call"]
    out = dict.fromkeys(("grouped", "loop", "union", "dense"), 0.0)
    for lay in gate.layers:
        m, w = lay["macs"] / c, lay["w"]
        rg = 1.0 + w * k_max / k["pad"] if n > 1 else 1.0  # one image: a plain conv
        out["dense"] += n * c * m * mac + call
        out["union"] += union * (n * m * mac + w * wf) + call
        out["grouped"] += n * k_max * (m * mac * rg + w * wf) + (2 if n > 1 else 1) * call
        out["loop"] += k_sum * (m * mac * _LOOP_PENALTY + w * wf) + n * call
        if lay["role"] == "consumer":
            out["dense"] += n * c * lay["pix"] * xm
            out["union"] += n * union * lay["pix"] * xf
            if cl:
                out["grouped"] += n * (lay["in_x"] + lay["out_x"]) * _RELAYOUT_NS / 1e3
        elif lay["role"] == "first" and cl:
            out["grouped"] += n * lay["in_x"] * _RELAYOUT_NS / 1e3
    return out


class GateContext:
    """State shared by the gated layers of one engine (a plain object)."""

    def __init__(self, strategy: str, tune: bool, scale: float) -> None:
        self.strategy = strategy
        self.tune = tune
        self.scale = scale
        self.forced_masks: dict[str, torch.Tensor] | None = None
        self.forced_pays_predictor = False  # benchmarks: compute (and discard) g under forced masks
        self.record = False
        self.records: dict[str, dict[str, Any]] = {}
        self.profile = False
        self.cl = False  # the current call runs channels_last


class GatedConv2d(nn.Module):
    """A folded conv on a gated chain: producer (first: runs the gate's predictor), depthwise producer,
    consumer, or consumer of one gate and producer of the next (see module docs)."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d,
                 act: str | None, ctx: GateContext) -> None:
        super().__init__()
        self.name = name
        w = weight.detach().contiguous()
        co, cig, kh, kw = w.shape
        b = bias.detach().to(w.dtype) if bias is not None else w.new_zeros(co)
        self.register_buffer("weight", w)
        self.register_buffer("bias", b.contiguous())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, \
            conv.groups
        self.act = act
        self.depthwise = conv.groups > 1 and cig == 1 and co == conv.groups
        self.co, self.ci, self.khw = co, cig * conv.groups, kh * kw
        self._ctx = ctx
        self.first: _Gate | None = None  # gate whose predictor runs here
        self.produces: _Gate | None = None  # gate whose channels this layer's output is
        self.consumes: _Gate | None = None  # gate read at this layer's input (multiplier applied)
        self.store: dict[str, torch.Tensor] = {}
        self._wb = (w, self.bias)  # plain attributes on the per-call path (no nn.Module.__getattr__)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._wb = (self.weight, self.bias)
        if self.store:
            self.prepare()
        return out

    def prepare(self) -> None:
        """Arrange the weights the gathers need (once, after the gates are attached)."""
        w, b = self.weight, self.bias
        co, khw = self.co, self.khw
        z = w.new_zeros
        self.store = {"b_ext": torch.cat([b, z(1)])}
        if self.depthwise or self.groups > 1:
            self.store["w_ext"] = torch.cat([w, z(1, *w.shape[1:])]).contiguous()
            return
        ci = self.ci
        if self.produces is not None:
            self.store["w_rows"] = torch.cat([w, z(1, *w.shape[1:])]).contiguous()
        if self.consumes is not None:
            self.store["w_cols"] = torch.cat([w.view(co, ci, khw).transpose(0, 1),
                                              z(1, co, khw)]).contiguous()  # (C_in + 1, C_out, khw)
        if self.consumes is not None and self.produces is None and not isinstance(self.padding, str):
            # batch 1 at small outputs: (C_in*kh*kw, C_out), kept rows gathered contiguously for the GEMM path
            self.store["w_kt"] = w.permute(1, 2, 3, 0).reshape(ci * khw, co).contiguous()
            self.store["ar_khw"] = torch.arange(khw)
        if self.produces is not None and self.consumes is not None:
            ext = torch.zeros(co + 1, ci + 1, khw, dtype=w.dtype)
            ext[:co, :ci] = w.view(co, ci, khw)
            self.store["w_both"] = ext.view(-1, khw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self._ctx
        if ctx.profile:
            if self.first is not None:
                with torch.profiler.record_function("instaprune.saliency"):
                    self.first.select(x, self.consumes, ctx)
            with torch.profiler.record_function("instaprune.sparse"):
                return self.run(x, ctx)
        if self.first is not None:
            self.first.select(x, self.consumes, ctx)
        return self.run(x, ctx)

    # ------------------------------------------------------------ execution
    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, groups: int) -> torch.Tensor:
        return apply_activation(F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups), self.act)

    def run(self, x: torch.Tensor, ctx: GateContext) -> torch.Tensor:
        ins = self.consumes
        outs = self.produces
        src = ins if ins is not None else (outs if self.depthwise and self.first is None else None)
        ik = src.kind if src is not None else "none"
        ok = outs.kind if outs is not None else "none"
        mult = ins.mult if ins is not None else None
        if self.depthwise:
            return self._run_depthwise(x, src, outs, ok)
        if self.groups > 1:
            return self._run_grouped(x, src, outs, mult, ctx)
        if ik != "per" and ok != "per":
            w, b = self._wb
            if ok == "shared":
                w, b = w.index_select(0, outs.idx), b.index_select(0, outs.idx)
            if ik == "shared":
                w = w.index_select(1, src.idx)
            if mult is not None:
                x = x * mult.to(x.dtype)[:, :, None, None]
            return self._conv(x, w, b, 1)
        return self._run_per_image(x, src, outs, ik, ok, mult, ctx)

    def _run_per_image(self, x: torch.Tensor, src: _Gate | None, outs: _Gate | None, ik: str, ok: str,
                       mult: torch.Tensor | None, ctx: GateContext) -> torch.Tensor:
        n = x.shape[0]
        rows = outs.idx if ok in ("per", "shared") else None
        cols = src.idx if ik in ("per", "shared") else None
        if n == 1 and rows is None and cols is not None and "w_kt" in self.store:
            ho, wo = self._out_hw(x.shape[2], x.shape[3])
            if ho * wo <= _GEMM_PIXELS:
                return self._consumer_gemm(x, cols.view(-1), mult, ho, wo)
        if n == 1:  # one image: gather the kept rows / columns of the folded weights, one plain conv
            w, b = self._wb
            if rows is not None:
                r = rows.view(-1)
                w, b = w.index_select(0, r), b.index_select(0, r)
            if cols is not None:
                w = w.index_select(1, cols.view(-1))
            if mult is not None:
                w = w * mult.to(w.dtype).view(1, -1, 1, 1)
            return self._conv(x, w, b, 1)
        if (src is not None and src.strategy == "loop" and ik == "per") or \
                (outs is not None and outs.strategy == "loop" and ok == "per"):
            return self._run_loop(x, src, outs, rows, cols, mult, ctx)
        co, ci, khw = self.co, self.ci, self.khw
        kh, kw = self._wb[0].shape[2:]
        st = self.store
        if rows is not None and cols is not None:
            r = rows.view(n, -1) if rows.dim() == 2 else rows.view(1, -1).expand(n, -1)
            c = cols.view(n, -1) if cols.dim() == 2 else cols.view(1, -1).expand(n, -1)
            flat = (r[:, :, None] * (ci + 1) + c[:, None, :]).reshape(-1)
            ko, ki = r.shape[1], c.shape[1]
            wg = st["w_both"].index_select(0, flat).view(n, ko, ki, khw)
        elif rows is not None:
            r = rows if rows.dim() == 2 else rows.view(1, -1).expand(n, -1)
            ko, ki = r.shape[1], ci
            wg = st["w_rows"].index_select(0, r.reshape(-1)).view(n, ko, ki, khw)
        else:
            c = cols if cols.dim() == 2 else cols.view(1, -1).expand(n, -1)
            ko, ki = co, c.shape[1]
            wg = st["w_cols"].index_select(0, c.reshape(-1)).view(n, ki, co, khw).transpose(1, 2)
        if mult is not None:
            wg = wg * mult.to(wg.dtype)[:, None, :, None]
        wg = wg.reshape(n * ko, ki, kh, kw).contiguous()
        if rows is None:
            bg = self._wb[1].repeat(n)
        elif rows.dim() == 2:
            bg = st["b_ext"].index_select(0, rows.reshape(-1))
        else:
            bg = self._wb[1].index_select(0, rows).repeat(n)
        cl_in = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        xs = x.contiguous()
        h, wd = xs.shape[2:]
        out = self._conv(xs.view(1, n * ki, h, wd), wg, bg, n)
        out = out.view(n, ko, *out.shape[2:])
        if ok in ("none", "full") and (cl_in or ctx.cl):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _consumer_gemm(self, x: torch.Tensor, idx: torch.Tensor, mult: torch.Tensor | None, ho: int,
                       wo: int) -> torch.Tensor:
        """One image, consumer with few output pixels: ``out^T = cols(x)^T @ W_kt[kept rows]``. The kept rows of
        the (C_in*kh*kw, C_out) weight copy are contiguous, where the plain conv would gather strided weight
        columns (measured at 7x7, 1 thread: 512x512 3x3 at half the inputs 1.8 ms against 2.8 ms, slim 1.3 ms;
        2048x512 1x1 0.56 ms against 1.1 ms, slim 0.66 ms; equal at 14x14, so only below ``_GEMM_PIXELS``)."""
        st = self.store
        khw = self.khw
        k = idx.numel()
        rows = idx if khw == 1 else (idx[:, None] * khw + st["ar_khw"]).reshape(-1)
        wg = st["w_kt"].index_select(0, rows)
        if mult is not None:
            m = mult.view(-1).to(wg.dtype)
            wg = wg * (m if khw == 1 else m.repeat_interleave(khw))[:, None]
        if khw == 1 and self.stride == (1, 1) and self.padding == (0, 0):
            cols = x.reshape(k, -1)
        else:
            cols = F.unfold(x, self._wb[0].shape[2:], self.dilation, self.padding, self.stride)[0]
        out = torch.addmm(self._wb[1], cols.t(), wg)  # (pixels, C_out)
        return apply_activation(out.t().contiguous().view(1, self.co, ho, wo), self.act)

    def _run_loop(self, x: torch.Tensor, src: _Gate | None, outs: _Gate | None, rows: torch.Tensor | None,
                  cols: torch.Tensor | None, mult: torch.Tensor | None, ctx: GateContext) -> torch.Tensor:
        """One conv per image with that image's own rows / columns gathered (exact work even with threshold
        budgets: padded slots are not computed, the output is zero-padded to the batch's largest count)."""
        n = x.shape[0]
        k_out = self.co if rows is None else rows.shape[-1]
        parts = []
        for i in range(n):
            (w, b), xi = self._wb, x[i:i + 1]
            if rows is not None:
                r = rows if rows.dim() == 1 else rows[i, : int(outs.counts[i])]
                w, b = w.index_select(0, r), b.index_select(0, r)
            if cols is not None:
                if cols.dim() == 1:
                    c = cols
                else:
                    c = cols[i, : int(src.counts[i])]
                    xi = xi[:, : c.numel()]
                w = w.index_select(1, c)
            if mult is not None:
                w = w * mult[i, : w.shape[1]].to(w.dtype).view(1, -1, 1, 1)
            if w.shape[0] == 0 or w.shape[1] == 0:  # an image with no kept channel (forced masks only)
                ho, wo = self._out_hw(xi.shape[2], xi.shape[3])
                o = apply_activation(b.view(1, -1, 1, 1).expand(1, w.shape[0], ho, wo).clone(), self.act)
            else:
                o = self._conv(xi, w, b, 1)
            if o.shape[1] < k_out:  # padded slots of this image (zeros: C's padded columns are zero too)
                o = F.pad(o, (0, 0, 0, 0, 0, k_out - o.shape[1]))
            parts.append(o)
        out = torch.cat(parts)
        if rows is not None:
            return out.contiguous()  # a compact tensor: NCHW like the other per-image kernels
        return out.contiguous(memory_format=torch.channels_last) if ctx.cl else out

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        kh, kw = self._wb[0].shape[2:]
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _run_depthwise(self, x: torch.Tensor, src: _Gate | None, outs: _Gate | None, ok: str) -> torch.Tensor:
        st = self.store
        if outs is None or ok == "full":
            return self._conv(x, *self._wb, self.groups)
        if ok == "shared":
            u = outs.idx
            if src is None:  # the depthwise conv is the first producer: its input is full width
                x = x.index_select(1, u)
            w, b = self._wb
            return self._conv(x, w.index_select(0, u), b.index_select(0, u), u.numel())
        idx = outs.idx
        n, k = idx.shape
        xs = x.contiguous()
        h, wd = xs.shape[2:]
        if src is None:  # full-width input: gather each image's channels (padding reads channel 0)
            c = xs.shape[1]
            off = (torch.arange(n)[:, None] * c + idx.clamp(max=c - 1)).reshape(-1)
            xs = xs.view(n * c, h, wd).index_select(0, off)
        wg = self.store["w_ext"].index_select(0, idx.reshape(-1))
        bg = st["b_ext"].index_select(0, idx.reshape(-1))
        out = self._conv(xs.view(1, n * k, h, wd), wg, bg, n * k)
        return out.view(n, k, *out.shape[2:])

    def _run_grouped(self, x: torch.Tensor, src: _Gate | None, outs: _Gate | None, mult: torch.Tensor | None,
                     ctx: GateContext) -> torch.Tensor:
        """A grouped (non-depthwise) conv on a gated chain: dense at full width (exact, saves nothing)."""
        n = x.shape[0]
        if src is not None and src.kind != "full":
            x = _to_full(x, src, mult)
        elif mult is not None:
            x = x * mult.to(x.dtype)[:, :, None, None]
        out = self._conv(x, *self._wb, self.groups)
        if outs is None or outs.kind == "full":
            return out
        if outs.kind == "shared":
            return out.index_select(1, outs.idx)
        idx = outs.idx.clamp(max=self.co - 1)  # padded slots read a real channel; C's zero columns drop it
        o = out.contiguous()
        hw = o.shape[2] * o.shape[3]
        res = o.view(n, self.co, hw).gather(1, idx[:, :, None].expand(n, idx.shape[1], hw))
        return res.view(n, idx.shape[1], *o.shape[2:])

    def extra_repr(self) -> str:
        roles = [f"first={self.first.name}" if self.first else "",
                 f"produces={self.produces.name}" if self.produces else "",
                 f"consumes={self.consumes.name}" if self.consumes else ""]
        return f"{tuple(self.weight.shape)}, groups={self.groups}, act={self.act}, " + \
            ", ".join(r for r in roles if r)


def _to_full(x: torch.Tensor, gate: _Gate, mult: torch.Tensor | None) -> torch.Tensor:
    """A compact tensor of ``gate`` back at full width (zeros elsewhere), multiplier applied."""
    n = x.shape[0]
    xs = x.contiguous()
    if mult is not None:
        xs = xs * mult.to(xs.dtype)[:, :, None, None]
    h, w = xs.shape[2:]
    if gate.kind == "shared":
        out = xs.new_zeros(n, gate.c, h, w)
        out[:, gate.idx] = xs
        return out
    out = xs.new_zeros(n, gate.c + 1, h * w)
    out.scatter_(1, gate.idx[:, :, None].expand(n, gate.idx.shape[1], h * w), xs.view(n, -1, h * w))
    return out[:, : gate.c].reshape(n, gate.c, h, w)


# ---------------------------------------------------------------------------------------------- the model
class GatedEngine(EngineKnobs, nn.Module):
    """The executable gated model (eval only: forward runs under ``torch.inference_mode``). The same
    accounting interface as :class:`instaprune.engine.dynamic.DynamicModel`."""

    _STRATEGIES = GATE_STRATEGIES
    _STRATEGY_LABEL = "gate strategy"

    def __init__(self, net: nn.Module, ctx: GateContext, gates: dict[str, _Gate], report: GateReport,
                 dense_macs: int, method: str, channels_last: bool | None) -> None:
        super().__init__()
        self.net = net
        self._ctx = ctx
        self.gates = gates
        self.report = report
        self.dense_macs = int(dense_macs)
        self.method = method
        self.channels_last = channels_last
        self._layer_macs = dict(report.layer_macs)
        self._dw = {p for s in report for p in s.producers[1:]}
        self.layers = {m.name: m for m in net.modules() if isinstance(m, GatedConv2d)}
        self._batch = 0
        self._shape: tuple[int, ...] = ()
        self._policies: dict[tuple, tuple[str, bool]] = {}  # tuned regime -> (strategy, channels_last)
        self.tuned: dict[tuple, dict[str, float]] = {}  # regime -> candidate -> best time (s)

    # ------------------------------------------------------------ running
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._batch, self._shape = x.shape[0], tuple(x.shape[1:])
        ctx = self._ctx
        with torch.inference_mode():
            if ctx.tune and self.channels_last is None:
                key = (x.shape[0], self._shape, torch.get_num_threads(), ctx.strategy)
                if key not in self._policies:
                    self._tune(x, key)
                strategy, cl = self._policies[key]
                saved = ctx.strategy
                ctx.strategy = strategy
                try:
                    return self._run(x, cl)
                finally:
                    ctx.strategy = saved
            cl = self.channels_last if self.channels_last is not None else x.shape[0] > 1
            return self._run(x, cl)

    def _run(self, x: torch.Tensor, cl: bool) -> torch.Tensor:
        self._ctx.cl = cl
        return self.net(x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format))

    def _tune(self, x: torch.Tensor, key: tuple) -> None:
        ctx = self._ctx
        forced = ctx.strategy
        pols = (_TUNE_POLICIES if x.shape[0] > 1 else _TUNE_POLICIES_B1) if forced == "auto" else (forced,)
        cands = [(s, cl) for s in pols for cl in (False, True)]
        times: dict[tuple[str, bool], list[float]] = {c: [] for c in cands}
        saved_record = ctx.record
        ctx.record = False
        try:
            for _ in range(_TUNE_ROUNDS):
                for s, cl in cands:
                    ctx.strategy = s
                    t0 = time.perf_counter()
                    self._run(x, cl)
                    times[(s, cl)].append(time.perf_counter() - t0)
        finally:
            ctx.strategy, ctx.record = forced, saved_record
        best = {c: min(v[1:]) for c, v in times.items()}
        self._policies[key] = min(best, key=best.__getitem__)
        self.tuned[key] = {f"{s}/{'cl' if cl else 'nchw'}": t for (s, cl), t in best.items()}
        log.debug("gated engine tuning %s: %s", key, self._policies[key])

    def warmup(self, x: torch.Tensor, max_calls: int = 16) -> int:
        """One call (a new regime is tuned inside it); returns the number of forwards run."""
        self(x)
        return 1

    @property
    def tuning(self) -> bool:
        return False

    def _strategy_alias(self, value: str) -> str:
        return "grouped" if value == "padded" else value

    @property
    def scale(self) -> float:
        return self._ctx.scale

    @property
    def forced(self) -> dict[str, torch.Tensor] | None:
        """Masks (gate -> bool (N, C)) that override the selection, as ``GatedModel.forced``."""
        return self._ctx.forced_masks

    @forced.setter
    def forced(self, masks: dict[str, torch.Tensor] | None) -> None:
        if masks is not None:
            missing = [n for n in self.gates if n not in masks]
            if missing:
                raise ConfigError(f"forced masks missing for gate(s): {', '.join(missing[:5])}")
            masks = {n: torch.as_tensor(m).to(torch.bool).cpu() for n, m in masks.items()}
        self._ctx.forced_masks = masks


    # ------------------------------------------------------------ accounting
    def last_masks(self) -> dict[str, torch.Tensor]:
        return {n: g.keep_mask() for n, g in self.gates.items() if g.n}

    def strategies(self) -> dict[str, str]:
        return {n: g.strategy for n, g in self.gates.items() if g.n}

    def _macs(self, executed: bool) -> np.ndarray:
        """Per-image MACs of the last call in ``GatedModel.instance_macs``'s convention (the model's own dense
        MACs minus what the gates skipped; a grouped conv with gated input and output counts the channel pairs
        of each group); ``executed``: what ran instead (padding, union, dense fallbacks and the grouped convs,
        which run at full width)."""
        total = np.full(self._batch, float(self.report.dense_macs))
        fin: dict[str, np.ndarray] = {}
        fout: dict[str, np.ndarray] = {}
        for g in self.gates.values():
            f = (g.executed() if executed else g.counts.astype(np.float64)) / g.c
            fin[g.name] = f
            for p in g.site.producers:
                fout[p] = f
        for layer in set(fin) | set(fout):
            groups = self.layers[layer].groups
            if layer in self._dw:
                frac = fout[layer]
            elif groups > 1 and executed:
                frac = 1.0
            elif groups > 1 and layer in fin and layer in fout:
                m_in = self.gates[layer].keep_mask().numpy().astype(np.float64)
                m_out = self.layers[layer].produces.keep_mask().numpy().astype(np.float64)
                n = m_in.shape[0]
                pairs = (m_in.reshape(n, groups, -1).sum(2) * m_out.reshape(n, groups, -1).sum(2)).sum(1)
                frac = pairs / (m_in.shape[1] * m_out.shape[1] / groups)
            else:
                frac = fin.get(layer, 1.0) * fout.get(layer, 1.0)
            total = total - self._layer_macs[layer] * (1.0 - frac)
        return total

    def _check_ran(self) -> None:
        stale = [n for n, g in self.gates.items() if g.n != self._batch]
        if stale or not self._batch:
            raise ModelError("call the model before asking for its MACs")
        if self._shape != tuple(self.report_shape[1:]):
            raise ModelError(f"MACs are counted at the plan's input shape {self.report_shape}, the last input "
                             f"was {self._shape}")

    def instance_macs(self) -> torch.Tensor:
        """Per-image MACs the last forward's masks require (no overhead), as ``GatedModel.instance_macs``."""
        self._check_ran()
        return torch.from_numpy(self._macs(False))

    def executed_macs(self) -> float:
        """Mean MACs per image the last forward executed (padding, union and dense fallbacks included)."""
        self._check_ran()
        return float(self._macs(True).mean())

    def overhead_macs(self) -> int:
        return sum(s.in_channels * s.in_height * s.in_width + _pred_macs(g) + s.channels
                   for g in self.gates.values() for s in (g.site,))

    def summary(self) -> dict[str, Any]:
        dense = float(self.dense_macs)
        over = self.overhead_macs()
        req = float(self.instance_macs().mean())
        exe = self.executed_macs()
        return {
            "dense_macs": dense, "mean_dynamic_macs": req, "executed_macs": exe, "overhead_macs": over,
            "flops_reduction": 1.0 - (req + over) / dense,
            "executed_flops_reduction": 1.0 - (exe + over) / dense,
            "theoretical_speedup": dense / (req + over),
            "strategies": dict(collections.Counter(self.strategies().values())),
        }


def _pred_macs(g: _Gate) -> int:
    return int(g.w.numel() + (g.w1.numel() if g.w1 is not None else 0))


# ---------------------------------------------------------------------------------------------- building
def _chain_ok(gm: fx.GraphModule, site: GateSite) -> None:
    """Between the rewritten producers and the consumer only parameter-free channel-wise ops may remain (a BN
    that was not folded would see the compact tensor)."""
    modules = dict(gm.named_modules())
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == site.name), None)
    if node is None:
        raise ModelError(f"gate {site.name}: the consumer is not in the rewritten graph")
    cur = node.args[0]
    while not (cur.op == "call_module" and isinstance(modules.get(cur.target), GatedConv2d)):
        if cur.op == "call_module" and any(True for _ in modules[cur.target].parameters()) or \
                cur.op == "call_module" and isinstance(modules[cur.target], nn.BatchNorm2d):
            raise ModelError(f"gate {site.name}: {type(modules[cur.target]).__name__} {cur.target!r} on the "
                             "chain could not be folded (the engine runs the chain on the kept channels only)")
        if not cur.args or not isinstance(cur.args[0], fx.Node):
            raise ModelError(f"gate {site.name}: unexpected node {cur.name} on the chain")
        cur = cur.args[0]
    if cur.target != site.producers[-1]:
        raise ModelError(f"gate {site.name}: the chain reaches {cur.target!r}, expected {site.producers[-1]!r}")


def build_gated(model: nn.Module, input_shape: tuple[int, ...], gplan: GatePlan, *, scale: float = 1.0,
                strategy: str = "auto", channels_last: bool | None = None, check: bool = True,
                tune: bool = True) -> GatedEngine:
    """The fast engine of a gated plan (``to_dynamic`` calls this when ``plan.gates`` is set)."""
    strategy = "grouped" if strategy == "padded" else strategy
    if strategy not in GATE_STRATEGIES:
        raise ConfigError(f"gate strategy must be one of {', '.join(GATE_STRATEGIES)}, got {strategy!r}")
    if scale < 0:
        raise ConfigError(f"scale must be >= 0, got {scale}")
    bank = getattr(model, GATES_ATTR, None)
    if not isinstance(bank, nn.ModuleDict):
        raise ModelError(f"the model has no gate predictors ({GATES_ATTR}); load a gated checkpoint")
    was_training = model.training
    model.eval()
    example = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    try:
        report = gplan.report(find_gates(model, torch.zeros(1, *input_shape[1:])))
        cfg = gplan.config
        gates: dict[str, _Gate] = {}
        for s in report:
            if _key(s.name) not in bank:
                raise ModelError(f"the model's gate predictors do not cover {s.name!r}")
            gates[s.name] = _Gate(s, cfg, gplan.keep.get(s.name, cfg.keep), gplan.taus.get(s.name, 0.0),
                                  bank[_key(s.name)])
        roles: dict[str, dict[str, _Gate]] = collections.defaultdict(dict)
        for g in gates.values():
            roles[g.site.producers[0]]["first"] = g
            for p in g.site.producers:
                roles[p]["produces"] = g
            roles[g.site.name]["consumes"] = g
        ctx = GateContext(strategy, tune, scale)

        def build(name: str, m: nn.Module, bn: nn.BatchNorm2d | None, act: str | None) -> nn.Module | None:
            if isinstance(m, nn.Linear):
                return None
            if m.padding_mode != "zeros":
                if name in roles:
                    raise ModelError(f"{name}: padding_mode={m.padding_mode!r} is not supported (only 'zeros')")
                return None
            w, b = fold_bn(m, bn) if bn is not None else (m.weight.detach(), m.bias)
            if name not in roles:
                return FoldedConv2d(w, b, m, act)
            layer = GatedConv2d(name, w, b, m, act, ctx)
            for role, g in roles[name].items():
                setattr(layer, role, g)
            return layer

        with torch.no_grad():
            net, method = rewrite(model, example, build)
        if method != "fx":
            raise ModelError("gates need a torch.fx-traceable model")
        for mod in net.modules():  # hooks copied with the model (e.g. a GatedModel's) must not run here
            mod._forward_pre_hooks.clear()
            mod._forward_hooks.clear()
        layers = {m.name: m for m in net.modules() if isinstance(m, GatedConv2d)}
        missing = [n for n in roles if n not in layers]
        if missing:
            raise ModelError(f"gated layer(s) not rewritten (each must be called once, as a Conv2d): "
                             f"{', '.join(missing[:5])}")
        for s in report:
            _chain_ok(net, s)
        for lay in layers.values():
            lay.prepare()
        for g in gates.values():
            s = g.site
            for i, p in enumerate(s.producers):
                lay = layers[p]
                g.layers.append({"role": "first" if i == 0 else "dw", "macs": s.producer_macs[i],
                                 "w": lay.khw if lay.depthwise else lay.ci // lay.groups * lay.khw, "pix": 0,
                                 "in_x": s.in_channels * s.in_height * s.in_width, "out_x": 0})
            c = layers[s.name]
            hw_in = (s.consumer_macs / max(c.co * (c.ci // c.groups) * c.khw, 1))  # output pixels
            g.layers.append({"role": "consumer", "macs": s.consumer_macs, "w": c.co * c.khw, "pix": hw_in,
                             "in_x": 0, "out_x": c.co * hw_in})
        engine = GatedEngine(net, ctx, gates, report, gplan.dense_macs or report.dense_macs, method,
                             channels_last)
        engine.report_shape = tuple(input_shape)
        if check:
            with torch.no_grad():
                ref = model(example)
            engine.forced = {n: torch.ones(example.shape[0], g.c, dtype=torch.bool) for n, g in gates.items()}
            ctx.tune = False
            saved_value = {n: g.value for n, g in gates.items()}
            try:
                for g in gates.values():
                    g.value = False  # all open, no scaling: the rewritten net must equal the model itself
                check_equal(ref, engine(example), f"to_dynamic with gates ({method})")
            finally:
                engine.forced, ctx.tune = None, tune
                for n, g in gates.items():
                    g.value = saved_value[n]
    finally:
        model.train(was_training)
    log.info("gated engine: %d gates, strategy %s", len(gates), strategy)
    return engine
