"""Fast execution of a Conv2d whose *input* channels are pruned per instance (the consumer of a prune point).

``SparseInputConv2d(...)(x, active)`` returns exactly ``F.conv2d(x * mask[:, :, None, None], W, b, ...)``
(then the optional fused ReLU/ReLU6) while computing only the active channels. Strategies (``STRATEGIES``):

- ``dense``: the masked dense conv (the fallback; with every channel active no masking pass at all).
- ``loop``: per instance, gather its active channels and weight columns, one conv each (exact work).
- ``padded``: every instance's active channels padded to the largest count, ONE grouped conv with groups=N
  (weights gathered per instance into an (N*C_out, k_max, kh, kw) tensor).
- ``union``: one conv on the union of the batch's active channels; channels an instance lacks are zeroed.
- ``bucket``: greedy clusters of near-identical masks, one union conv per cluster (for correlated masks).

Grouped and depthwise convs run through the same padded kernel per group: only groups with an active channel
are computed; outputs of a group with no active input channel equal the bias (depthwise: a pruned channel c
outputs the constant ``bias[c]``) and are filled with it. ``auto`` = :func:`choose_strategy`.
The cost model's constants were fitted on a layer benchmark of these kernels (the former
``benchmarks/kernel_latency.py``, git history); the engine's strategy choice is now measured against every
forced strategy in ``results/engine_latency.md`` (``benchmarks/engine_latency.py``, layer and model rows).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from instaprune.core.errors import ConfigError, ModelError
from instaprune.engine import _kernels_impl as impl

__all__ = [
    "STRATEGIES",
    "ACTIVATIONS",
    "fold_bn",
    "MaskStats",
    "choose_strategy",
    "strategy_costs",
    "COST",
    "SparseInputConv2d",
    "as_mask",
]

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "dense", "loop", "padded", "union", "bucket")
ACTIVATIONS = (None, "relu", "relu6")


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` with ``bn`` in eval mode (running statistics) as one conv."""
    if bn.num_features != conv.out_channels:
        raise ModelError(f"BatchNorm has {bn.num_features} features but the conv has {conv.out_channels} outputs")
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=w.dtype)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros_like(b)
    var = bn.running_var if bn.running_var is not None else torch.ones_like(b)
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(b)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(b)
    scale = gamma / torch.sqrt(var + bn.eps)
    return (w * scale.reshape(-1, 1, 1, 1)).contiguous(), (b - mean) * scale + beta


@dataclass(frozen=True)
class MaskStats:
    """What the cost model needs from one call: batch, channels, active counts, union size."""

    n: int
    channels: int
    k_sum: int
    k_max: int
    union: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> MaskStats:
        m = mask.cpu().numpy()  # numpy: a few microseconds on (N, C) bool, far below torch's per-op overhead
        counts = m.sum(1)
        union = int(m.any(0).sum()) if m.shape[0] > 1 else int(counts[0])
        return cls(m.shape[0], m.shape[1], int(counts.sum()), int(counts.max()), union)


#: Cost-model constants, fitted by grid search on the former benchmarks/kernel_latency.py rows of the 2-core
#: AMD EPYC dev machine (commit cbf6007, measured under load): ns per MAC of a batched dense conv, ns per
#: gathered weight element (gather + oneDNN's weight reorder, paid per call), ns per gathered input element,
#: ns per element of the dense fallback's masking pass (xm), us per conv call, grouped-conv weight size scale
#: (pad), us of index work per grouped/depthwise call. A single-instance slow-down term for small outputs was
#: tried and fitted to zero once the per-call weight cost was in the model.
COST = {"mac": 0.02, "wf": 1.2, "xf": 0.1, "xm": 0.2, "call": 25.0, "pad": 5_000.0, "gcall": 100.0}


def strategy_costs(
    stats: MaskStats,
    c_out: int,
    groups: int,
    kernel: tuple[int, int],
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    k: dict[str, float] | None = None,
) -> dict[str, float]:
    """Modelled time (microseconds) of ``dense``, ``union``, ``loop`` and ``padded`` for one call.

    With P/Q = input/output pixels, wk = C_out/G*kh*kw weight elements per input channel, m = wk*Q MACs per
    active channel of one instance, u = union size, and the constants of :data:`COST` (every conv call pays
    wf per weight element it uses: oneDNN reorders the weights at each call; gathered ones are copied too):

    - dense  = N*C*(m*mac + P*xm) + C*wk*wf + call        (masking pass, then the conv over every channel)
    - union  = u*(N*(m*mac + P*xf) + wk*wf) + 2*call       (one conv on the union, weights gathered once)
    - loop   = sum_i k_i*(m*mac + wk*wf + P*xf) + N*call   (one conv per instance, weights gathered for each)
    - padded = N*k_max*(m*mac*rg + wk*wf + P*xf) + 3*call, rg = 1 + C_out*k_max*kh*kw/G/pad: oneDNN's grouped
      conv (groups=N) degrades as each group's weight grows
    - grouped/depthwise (G > 1): the non-dense strategies also pay gcall per call for index building and the
      fill of the outputs of inactive groups (N*C_out*Q*xf).
    """
    k = k or COST
    n, c = stats.n, stats.channels
    kh, kw = kernel
    p_in, q = in_hw[0] * in_hw[1], out_hw[0] * out_hw[1]
    wk = c_out // groups * kh * kw
    m = wk * q
    mac, wf, xf, call = k["mac"] / 1e3, k["wf"] / 1e3, k["xf"] / 1e3, k["call"]
    rg = 1.0 + c_out * max(stats.k_max, 1) * kh * kw / groups / k["pad"]
    gx = 0.0 if groups == 1 else k["gcall"] + n * c_out * q * xf
    return {
        "dense": n * c * (m * mac + p_in * k["xm"] / 1e3) + c * wk * wf + call,
        "union": stats.union * (n * (m * mac + p_in * xf) + wk * wf) + 2 * call + gx,
        "loop": stats.k_sum * (m * mac + wk * wf + p_in * xf) + n * (call + (gx / n if groups > 1 else 0)),
        "padded": n * stats.k_max * (m * mac * rg + wk * wf + p_in * xf) + 3 * call + gx,
    }


def choose_strategy(
    stats: MaskStats,
    c_out: int,
    groups: int,
    kernel: tuple[int, int],
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
) -> str:
    """The strategy of lowest :func:`strategy_costs`; ``dense`` (no masking at all) when every channel of
    every instance is active. ``bucket`` is only used when asked for (its clustering costs O(N^2) small ops)."""
    if stats.k_sum == stats.n * stats.channels:
        return "dense"
    cost = strategy_costs(stats, c_out, groups, kernel, in_hw, out_hw)
    if stats.union == stats.channels and groups == 1:
        del cost["union"]  # the union is every channel: run_union would run the dense fallback anyway
    return min(cost, key=cost.__getitem__)


def as_mask(active: torch.Tensor | Sequence[torch.Tensor], n: int, channels: int) -> torch.Tensor:
    """A bool (N, C) mask from: a bool or floating (N, C) mask (nonzero = active), an integer (N, k) tensor of
    per-instance channel indices, or a sequence of N 1-d index tensors (lengths may differ)."""
    if isinstance(active, torch.Tensor) and (active.dtype == torch.bool or active.is_floating_point()):
        if tuple(active.shape) != (n, channels):
            raise ConfigError(f"mask shape {tuple(active.shape)} does not match (batch, channels) {(n, channels)}")
        return active if active.dtype == torch.bool else active != 0
    rows = list(active.unbind(0)) if isinstance(active, torch.Tensor) and active.dim() == 2 else list(active)
    if len(rows) != n:
        raise ConfigError(f"got channel indices for {len(rows)} instances but the batch has {n}")
    mask = torch.zeros(n, channels, dtype=torch.bool)
    for i, idx in enumerate(rows):
        idx = torch.as_tensor(idx).reshape(-1).long().cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= channels):
            raise ConfigError(f"channel index out of range [0, {channels}) for instance {i}")
        mask[i, idx] = True
    return mask


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SparseInputConv2d(nn.Module):
    """A Conv2d (optionally with folded eval-mode BN and fused ReLU/ReLU6) computing only the active input
    channels of each instance. ``forward(x, active, strategy=None)``; ``active`` is a bool (N, C) mask or
    per-instance channel index tensors. Weights are arranged once here (OIHW + a zero-padded copy)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        activation: str | None = None,
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ModelError(f"expected a 4-d conv weight, got shape {tuple(weight.shape)}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        c_out, cg, kh, kw = weight.shape
        if groups < 1 or c_out % groups:
            raise ModelError(f"groups={groups} does not divide the {c_out} output channels")
        self.in_channels, self.out_channels, self.groups = cg * groups, c_out, groups
        self.kernel_size = (kh, kw)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = self._resolve_padding(padding)
        self.activation, self.strategy = activation, strategy
        w = weight.detach().contiguous()
        b = bias.detach().to(w.dtype) if bias is not None else w.new_zeros(c_out)
        wext = torch.cat([w.view(c_out, cg, kh * kw), w.new_zeros(c_out, 1, kh * kw)], 1)
        self.register_buffer("weight", w)
        self.register_buffer("bias", b.contiguous())
        self.register_buffer("wext", wext.reshape(c_out * (cg + 1), kh * kw).contiguous())
        self._state: dict = {"last": None, "params": None}  # plain dict: no nn.Module __setattr__ per call

    def _resolve_padding(self, padding: int | str | Sequence[int]) -> tuple[int, int]:
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if self.stride != (1, 1):
                raise ModelError("padding='same' needs stride 1")
            tot = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            if any(t % 2 for t in tot):
                raise ModelError("padding='same' with an even effective kernel is asymmetric; not supported")
            return (tot[0] // 2, tot[1] // 2)
        if isinstance(padding, str):
            raise ModelError(f"unsupported padding {padding!r}")
        return _pair(padding)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None = None,
        activation: str | None = None,
        strategy: str = "auto",
    ) -> SparseInputConv2d:
        """Build from an ``nn.Conv2d`` (zero padding only), folding an eval-mode ``bn`` if given."""
        if not isinstance(conv, nn.Conv2d):
            raise ModelError(f"expected nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ModelError(f"padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
        w, b = fold_bn(conv, bn) if bn is not None else (conv.weight.detach(), conv.bias)
        return cls(
            w,
            b,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            activation=activation,
            strategy=strategy,
        )

    @property
    def last_strategy(self) -> str | None:
        """The strategy the last forward ran (what ``auto`` chose)."""
        return self._state["last"]

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half() replace the buffers: drop the cached params
        self._state["params"] = None
        return super()._apply(fn, recurse)

    def params(self) -> dict:
        """The buffers and geometry the kernels need (cached until the module is moved or cast)."""
        cached = self._state["params"]
        if cached is not None:
            return cached
        self._state["params"] = {
            "weight": self.weight,
            "bias": self.bias,
            "wext": self.wext,
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
            "kernel": self.kernel_size,
            "activation": self.activation,
        }
        return self._state["params"]

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        return impl._out_hw(self.params(), h, w)

    def pick(self, mask: torch.Tensor, in_hw: tuple[int, int]) -> str:
        """The strategy ``auto`` would use for this mask and input size."""
        return choose_strategy(
            MaskStats.of(mask), self.out_channels, self.groups, self.kernel_size, in_hw, self.out_hw(*in_hw)
        )

    def forward(
        self, x: torch.Tensor, active: torch.Tensor | Sequence[torch.Tensor], strategy: str | None = None
    ) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ModelError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        n = x.shape[0]
        mask = as_mask(active, n, self.in_channels)
        if mask.device != x.device:
            mask = mask.to(x.device)
        strategy = strategy or self.strategy
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        stats = MaskStats.of(mask)
        full = stats.k_sum == stats.n * stats.channels
        if strategy == "auto":
            strategy = (
                "dense"
                if full
                else choose_strategy(
                    stats,
                    self.out_channels,
                    self.groups,
                    self.kernel_size,
                    (x.shape[2], x.shape[3]),
                    self.out_hw(x.shape[2], x.shape[3]),
                )
            )
        self._state["last"] = strategy
        p = self.params()
        if strategy == "dense":
            return impl.run_dense(x, mask, p, full=full)
        if strategy == "loop":
            return impl.run_loop(x, mask, p)
        if strategy == "padded":
            return impl.run_padded(x, mask, p)
        if strategy == "union":
            return impl.run_union(x, mask, p)
        return impl.run_bucket(x, mask, p)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"activation={self.activation}, strategy={self.strategy}"
        )
