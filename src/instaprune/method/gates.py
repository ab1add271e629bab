"""Predicted gates: choose each image's channels of a tensor *before* computing them (docs/method.md, section 9).

A **gate** sits on a tensor T whose producer chain can be computed per output channel and whose only reader is one
consumer conv:

    X -> conv P -> [BN] -> [act] -> ... -> T -> consumer conv C
    X -> conv P -> [BN] -> [act] -> depthwise conv D -> [BN] -> [act] -> T -> C     (MobileNet-style: P, D and C save)

Channel-wise ops (BatchNorm, activations, dropout, pooling) may sit on the chain; every tensor on it must have
exactly one reader. A skipped channel of T then costs nothing in P (its output filter), in D (its depthwise
channel) nor in C (its input channel). The gate is named after its consumer, like the post-hoc prune point on the
same tensor, so plans, reports and the CLI use one vocabulary. :func:`find_gates` discovers gate sites with
``torch.fx`` and gives a reason for every conv input that cannot be gated (those keep the paper's post-hoc points).

The **predictor** reads the producer's input X: global average pool -> linear (or a two-layer bottleneck) ->
ReLU, so gate values ``g[i, c] >= 0``. It starts open (weights 0, bias 1: every channel on, ``g = 1``) and can be
fitted to the paper's saliency of T (``s / mean(s)``: the RMS of each channel, normalised so values sit near 1).

**Which channels run**: ``topk`` keeps the ``round(keep * C)`` largest ``g`` of each image (every image costs the
same); ``threshold`` keeps ``g > tau * scale`` (per-image budgets), both with a floor of ``min_keep``. **How kept
channels pass**: ``hard`` (multiplied by 1; the predictor learns only from its fit to the saliency), ``ste``
(multiplied by 1 in the forward, with the gradient of ``g`` straight through to the predictor) or ``value``
(multiplied by ``g``, as FBS and ManiDP do).

:class:`GatedModel` is the **reference**: it computes everything densely and multiplies T at the consumer's input,
so it defines what the fast engine must compute; it also counts each image's MACs in the project's convention
(producer chain, depthwise channels and consumer inputs saved; predictors counted as overhead; a layer whose input
and output are both gated costs ``macs * k_in/C_in * k_out/C_out``).
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from instaprune.core.distributed import gather_cat, global_mean
from instaprune.core.errors import ConfigError, ModelError, PlanMismatchError
from instaprune.method.flops import layer_macs
from instaprune.method.masked import MaskedModel
from instaprune.method.points import GATES_ATTR, PointReport
from instaprune.method.regularizer import PENALTIES, penalty
from instaprune.method.thresholds import ThresholdConfig, saliency

__all__ = [
    "GATE_SELECTIONS",
    "GATE_MULTIPLIERS",
    "GATE_PREDICTORS",
    "GATES_ATTR",
    "GateConfig",
    "GateSite",
    "GateReport",
    "find_gates",
    "channel_usage",
    "GatePredictor",
    "attach_predictors",
    "GatedModel",
    "GateRamp",
    "uniform_keep_for_target",
    "fit_predictors",
    "GatePlan",
    "gated_from_plan",
    "ALLOCATIONS",
    "allocate_keep",
]

GATE_SELECTIONS = ("topk", "threshold")
GATE_MULTIPLIERS = ("hard", "ste", "value")
GATE_PREDICTORS = ("linear", "bottleneck")

_CHANNELWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU,
                nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
                nn.AvgPool2d, nn.Mish)
_CHANNELWISE_FUNCS = {F.relu, F.relu6, F.silu, F.hardswish, F.gelu, F.leaky_relu, F.elu, F.dropout, F.max_pool2d,
                      F.avg_pool2d, torch.relu, torch.sigmoid, torch.tanh, F.hardsigmoid, F.mish}
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
_ADD = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class GateConfig:
    """How gates choose and pass channels, and how they are trained.

    ``keep``: fraction of each gate's channels kept per image (``topk``; the starting budget of ``threshold``),
    ``selection``: ``topk`` | ``threshold``; ``multiplier``: ``hard`` | ``ste`` | ``value``; ``predictor``:
    ``linear`` | ``bottleneck`` (hidden width ``max(C_in // reduction, 8)``); ``min_keep``: floor per gate;
    ``fit``: weight of the predictor's regression to the saliency of T while training (0 = off);
    ``decay``: lambda of the feature-decay term on the *gated* features (``penalty`` as the regulariser's).
    Defaults: ``value`` multiplier as the CIFAR-10 study chose on the ResNet-20 holdout; the rest the pilot's
    (top-k, linear, fit on) where the study has not separated them (docs/method.md 9.4, 11)."""

    keep: float = 0.4
    selection: str = "topk"
    multiplier: str = "value"
    predictor: str = "linear"
    reduction: int = 4
    min_keep: float = 0.05
    fit: float = 1.0
    decay: float = 0.0
    penalty: str = "l1l2"

    def __post_init__(self) -> None:
        if not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"gate keep fraction must be in (0, 1], got {self.keep}")
        if self.selection not in GATE_SELECTIONS:
            raise ConfigError(f"gate selection must be one of {', '.join(GATE_SELECTIONS)}, got {self.selection!r}")
        if self.multiplier not in GATE_MULTIPLIERS:
            raise ConfigError(f"gate multiplier must be one of {', '.join(GATE_MULTIPLIERS)}, "
                              f"got {self.multiplier!r}")
        if self.predictor not in GATE_PREDICTORS:
            raise ConfigError(f"gate predictor must be one of {', '.join(GATE_PREDICTORS)}, got {self.predictor!r}")
        if not isinstance(self.reduction, int) or self.reduction < 1:
            raise ConfigError(f"gate bottleneck reduction must be a positive integer, got {self.reduction!r}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise ConfigError(f"gate min_keep must be in [0, 1], got {self.min_keep}")
        if not (self.fit >= 0 and self.decay >= 0):
            raise ConfigError(f"gate fit and decay weights must be >= 0, got {self.fit}, {self.decay}")
        if self.penalty not in PENALTIES:
            raise ConfigError(f"gate penalty must be one of {', '.join(PENALTIES)}, got {self.penalty!r}")

    def floor(self, channels: int) -> int:
        return max(1, min(channels, math.ceil(self.min_keep * channels)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateSite:
    """One gateable tensor T: its producer chain, its consumer and the per-image MACs of each."""

    name: str  # the consumer's qualified name (the post-hoc point on T has the same name)
    producers: tuple[str, ...]  # conv chain, first one reads X; a second one is depthwise
    channels: int  # C of T
    in_channels: int  # C_in of X (the predictor's input)
    in_height: int
    in_width: int
    producer_macs: tuple[int, ...]
    consumer_macs: int

    @property
    def macs_per_channel(self) -> float:
        """MACs one skipped channel saves when no other gate touches these layers."""
        return (sum(self.producer_macs) + self.consumer_macs) / self.channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateSite:
        d = dict(d)
        d["producers"] = tuple(d["producers"])
        d["producer_macs"] = tuple(d["producer_macs"])
        return cls(**d)


@dataclass(frozen=True)
class GateReport:
    """Discovery result: gate sites, conv inputs that cannot be gated (with the reason), and the layer MACs."""

    sites: tuple[GateSite, ...]
    not_gateable: tuple[tuple[str, str], ...] = ()
    disabled: tuple[tuple[str, str], ...] = ()
    dense_macs: int = 0
    layer_macs: tuple[tuple[str, int], ...] = ()

    def __iter__(self):
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def by_name(self) -> dict[str, GateSite]:
        return {s.name: s for s in self.sites}

    def subset(self, names: Sequence[str]) -> GateReport:
        keep = set(names)
        unknown = keep - set(self.names())
        if unknown:
            raise ModelError(f"not gateable in this model: {', '.join(sorted(unknown)[:5])}")
        return replace(self, sites=tuple(s for s in self.sites if s.name in keep))


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _channelwise(node: Any, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _CHANNELWISE)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCS
    if node.op == "call_method":
        return node.target in _CHANNELWISE_METHODS
    return False


def _describe(node: Any, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "placeholder":
        return "the network input"
    if node.op == "call_module":
        return f"{type(modules.get(node.target)).__name__} {node.target!r}"
    if node.op == "call_function":
        if node.target in _ADD:
            return "an addition (residual stream)"
        if node.target is torch.cat:
            return "a concatenation"
        return f"function {getattr(node.target, '__name__', node.target)}"
    return f"{node.op} {node.target}"


def _trace(model: nn.Module):
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # any tracing failure: no gates, one reason
        raise ModelError(f"gates need a torch.fx-traceable model: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}") from e


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_gates(model: nn.Module, example_input: torch.Tensor, include: Sequence[str] | None = None,
               exclude: Sequence[str] = ()) -> GateReport:
    """Gate sites of ``model`` (traced with ``torch.fx``), and a reason for every conv input that is not one.

    ``include``/``exclude``: fnmatch patterns on gate (consumer) names."""
    modules = dict(model.named_modules())
    gm = _trace(model)
    macs, shapes = layer_macs(model, example_input, with_input_shapes=True)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    sites: list[GateSite] = []
    reasons: list[tuple[str, str]] = []
    disabled: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.Conv2d):
            continue
        name = node.target
        site, why = _site_for(node, name, modules, calls, macs, shapes)
        if site is None:
            reasons.append((name, why))
        elif include is not None and not _matches(name, include):
            disabled.append((name, "not matched by include patterns"))
        elif exclude and _matches(name, exclude):
            disabled.append((name, "matched by exclude patterns"))
        else:
            sites.append(site)
    for n, m in modules.items():
        if isinstance(m, nn.Linear) and n in macs:
            reasons.append((n, "Linear consumer (flattened features): a post-hoc point, not a gate"))
    return GateReport(tuple(sites), tuple(reasons), tuple(disabled), int(sum(macs.values())),
                      tuple(sorted(macs.items())))


def _site_for(node: Any, name: str, modules: Mapping[str, nn.Module], calls: Mapping[str, int],
              macs: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]) -> tuple[GateSite | None, str]:
    if calls.get(name, 0) != 1:
        return None, "the consumer is called more than once per forward"
    if name not in macs:
        return None, "not called in forward with the example input"
    if _is_depthwise(modules[name]):
        return None, ("depthwise consumer: its channels are gated with its producer by the gate of the conv after "
                      "it, where that chain allows")
    cur = node.args[0]
    producers: list[str] = []
    while True:
        if len(cur.users) != 1:
            return None, (f"its input is also read elsewhere ({len(cur.users)} readers, e.g. a skip connection)"
                          if not producers else "the depthwise conv's input has other readers")
        if cur.op == "call_module" and isinstance(modules.get(cur.target), nn.Conv2d):
            conv = modules[cur.target]
            if calls.get(cur.target, 0) != 1:
                return None, f"producer {cur.target!r} is called more than once per forward"
            producers.insert(0, cur.target)
            if _is_depthwise(conv) and len(producers) == 1:
                # try to extend through the depthwise conv to the conv that feeds it (one gate saves in three)
                prev, inner = cur.args[0], cur.args[0]
                while _channelwise(inner, modules) and len(inner.users) == 1:
                    inner = inner.args[0]
                if (len(inner.users) == 1 and inner.op == "call_module"
                        and isinstance(modules.get(inner.target), nn.Conv2d)
                        and not _is_depthwise(modules[inner.target]) and calls.get(inner.target, 0) == 1
                        and len(prev.users) == 1):
                    producers.insert(0, inner.target)
            break
        if _channelwise(cur, modules):
            cur = cur.args[0]
            continue
        return None, f"its input comes from {_describe(cur, modules)}, not a conv -> BN -> activation chain"
    first = producers[0]
    if first not in shapes or len(shapes[first]) != 4:
        return None, f"producer {first!r} did not run on a 4-d input"
    _, c_in, h, w = shapes[first]
    if modules[first].in_channels != c_in:
        return None, f"producer {first!r} input width does not match"
    consumer = modules[name]
    work = sum(macs[p] for p in producers) + macs[name]
    predictor = c_in * h * w + c_in * consumer.in_channels + consumer.in_channels
    if predictor >= 0.5 * work:  # e.g. squeeze-excitation convs on a pooled 1x1 map
        return None, f"a predictor ({predictor:,} MACs) would cost at least half of what it gates ({work:,} MACs)"
    return GateSite(name=name, producers=tuple(producers), channels=consumer.in_channels, in_channels=c_in,
                    in_height=h, in_width=w, producer_macs=tuple(macs[p] for p in producers),
                    consumer_macs=macs[name]), ""


class GatePredictor(nn.Module):
    """``g = relu(W2 relu(W1 pool(X)))`` (bottleneck) or ``relu(W pool(X) + b)`` (linear); starts open: ``g = 1``."""

    def __init__(self, in_channels: int, channels: int, kind: str = "linear", reduction: int = 4) -> None:
        super().__init__()
        if kind not in GATE_PREDICTORS:
            raise ConfigError(f"gate predictor must be one of {', '.join(GATE_PREDICTORS)}, got {kind!r}")
        self.kind = kind
        if kind == "bottleneck":
            hidden = max(in_channels // reduction, 8)
            self.fc1 = nn.Linear(in_channels, hidden)
            self.fc = nn.Linear(hidden, channels)
        else:
            self.fc = nn.Linear(in_channels, channels)
        nn.init.zeros_(self.fc.weight)
        nn.init.ones_(self.fc.bias)

    def macs(self) -> int:
        return sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.float().mean(dim=(2, 3))
        if self.kind == "bottleneck":
            z = F.relu(self.fc1(z))
        return F.relu(self.fc(z))


def _key(name: str) -> str:
    return name.replace(".", "__")


class _GateBank(nn.ModuleDict):
    """The predictors of a model's gates. Its forward is the identity, so a model whose forward calls every child
    in turn (an ``nn.Sequential``) passes its output through unchanged; the gates call each predictor by name."""

    def forward(self, x: Any) -> Any:
        return x


def attach_predictors(model: nn.Module, gates: GateReport, cfg: GateConfig) -> nn.ModuleDict:
    """Add one predictor per gate to ``model`` under :data:`GATES_ATTR` (replacing any there): the predictors
    are then part of the model's parameters and state dict (saved and loaded with its weights)."""
    bank = _GateBank({_key(s.name): GatePredictor(s.in_channels, s.channels, cfg.predictor, cfg.reduction)
                      for s in gates})
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    bank.to(dev)
    setattr(model, GATES_ATTR, bank)
    return bank


class GatedModel(nn.Module):
    """Reference gated model: ``model`` with its predictors (attached with :func:`attach_predictors`, or already
    in its state dict) choosing each image's channels of every gated tensor.

    ``keep`` (gate -> fraction, top-k) or ``taus`` (gate -> threshold, ``threshold`` selection) set the budget;
    ``scale`` multiplies every tau (the run-time knob). After each forward: ``values`` (g), ``masks`` (bool (N, C))
    and ``active`` (kept channels (N,)) per gate; :meth:`instance_macs` / :meth:`overhead_macs` in the project's
    convention; :meth:`pop_aux` the predictors' fit loss plus the decay term of the gated features (training).
    ``forced`` (gate -> bool (N, C)) overrides the selection (engine tests). ``dense_macs`` defaults to the
    model's; pass the original model's for a statically slimmed one, so reductions stay relative to it.
    ``points``/``point_taus``: post-hoc points of the paper's rule on other tensors (a model may mix both)."""

    def __init__(self, model: nn.Module, gates: GateReport, cfg: GateConfig | None = None,
                 keep: Mapping[str, float] | None = None, taus: Mapping[str, float] | None = None,
                 scale: float = 1.0, dense_macs: int | None = None, points: PointReport | None = None,
                 point_taus: Mapping[str, float] | None = None, thresholds: ThresholdConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.posthoc: MaskedModel | None = None
        if point_taus:  # the paper's post-hoc points on tensors the gates do not cover (one model, both rules)
            if points is None:
                raise ConfigError("post-hoc thresholds need the model's prune points")
            both = sorted(set(point_taus) & set(gates.names()))
            if both:
                raise ConfigError(f"a tensor is either gated or a post-hoc point, not both: {', '.join(both[:5])}")
            self.posthoc = MaskedModel(model, points, point_taus, thresholds, scale, record_masks=True)
        self.gates = gates
        self.cfg = cfg or GateConfig()
        bank = getattr(model, GATES_ATTR, None)
        if not isinstance(bank, nn.ModuleDict):
            raise PlanMismatchError(f"the model has no gate predictors ({GATES_ATTR}); attach them first")
        missing = [s.name for s in gates if _key(s.name) not in bank]
        if missing:
            raise PlanMismatchError(f"the model's gate predictors do not cover: {', '.join(missing[:5])}")
        for s in gates:
            pr = bank[_key(s.name)]
            if pr.fc.out_features != s.channels or _first_linear(pr).in_features != s.in_channels:
                raise PlanMismatchError(f"gate predictor {s.name!r} has shape "
                                        f"({_first_linear(pr).in_features} -> {pr.fc.out_features}), the gate "
                                        f"needs ({s.in_channels} -> {s.channels})")
        self.bank = bank
        self.keep = {s.name: float(self.cfg.keep) for s in gates}
        if keep:
            self.set_keep(keep)
        self.taus = {s.name: 0.0 for s in gates}
        if taus:
            unknown = [n for n in taus if n not in self.taus]
            if unknown:
                raise ConfigError(f"thresholds given for unknown gates: {', '.join(unknown[:5])}")
            self.taus.update({n: float(t) for n, t in taus.items()})
        self.scale = float(scale)
        #: threshold selection in training mode: taus follow the batch quantile at ``keep`` (running averages
        #: are what evaluation then uses); off once thresholds are calibrated
        self.running_taus = self.cfg.selection == "threshold" and not taus
        self._tau_seen: dict[str, bool] = {}
        self.enabled = True
        self.forced: dict[str, torch.Tensor] | None = None
        self.values: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.active: dict[str, torch.Tensor] = {}
        self._aux: list[torch.Tensor] = []
        self._batch = 0
        self.dense_macs = int(dense_macs if dense_macs is not None else gates.dense_macs)
        self._layer_macs = dict(gates.layer_macs)
        mods = dict(model.named_modules())
        self._groups = {n: mods[n].groups for s in gates for n in (*s.producers, s.name)}
        self._handles = []
        for s in gates:
            self._handles.append(mods[s.producers[0]].register_forward_pre_hook(self._predict_hook(s)))
            self._handles.append(mods[s.name].register_forward_pre_hook(self._mask_hook(s)))

    # ------------------------------------------------------------------ budgets
    def set_keep(self, keep: Mapping[str, float]) -> None:
        for n, k in keep.items():
            if n not in self.keep:
                raise ConfigError(f"keep fraction given for an unknown gate: {n!r}")
            if not 0.0 < float(k) <= 1.0:
                raise ConfigError(f"gate keep fraction must be in (0, 1], got {k} for {n!r}")
            self.keep[n] = float(k)

    def _k(self, s: GateSite) -> int:
        return max(self.cfg.floor(s.channels), min(s.channels, round(self.keep[s.name] * s.channels)))

    def select(self, s: GateSite, g: torch.Tensor) -> torch.Tensor:
        """Boolean keep mask (N, C) for gate values ``g`` (N, C); closed gates (g = 0) rank by index (:func:`_top`)."""
        if self.cfg.selection == "topk":
            k = self._k(s)
            if k >= s.channels:
                return torch.ones_like(g, dtype=torch.bool)
            return torch.zeros_like(g, dtype=torch.bool).scatter(1, _top(g, k), True)
        if self.training and self.running_taus:
            # per-image budgets while training: one running threshold per gate, the batch's quantile of g at the
            # current keep fraction (images above it keep more channels, images below fewer)
            # (the global batch's quantile under DDP: every rank's g gathered, as one process would see them)
            q = torch.quantile(gather_cat(g.float()).flatten(), 1.0 - self.keep[s.name])
            self.taus[s.name] = 0.9 * self.taus[s.name] + 0.1 * float(q) if self._tau_seen.get(s.name) else float(q)
            self._tau_seen[s.name] = True
            keep = g > q
        else:
            keep = g > self.taus[s.name] * self.scale
        return keep.scatter(1, _top(g, self.cfg.floor(s.channels)), True)

    # ------------------------------------------------------------------ hooks
    def _predict_hook(self, s: GateSite):
        key = _key(s.name)

        def hook(m: nn.Module, args: tuple) -> None:
            if not self.enabled:
                return None
            g = self.bank[key](args[0])
            self.values[s.name] = g
            if self.forced is not None:
                keep = self.forced[s.name].to(torch.bool)
            else:
                keep = self.select(s, g.detach())
            self.masks[s.name] = keep
            self.active[s.name] = keep.sum(dim=1)
            return None

        return hook

    def _mask_hook(self, s: GateSite):
        def hook(m: nn.Module, args: tuple):
            if not self.enabled or s.name not in self.masks:
                return None
            x = args[0]
            keep, g = self.masks[s.name], self.values[s.name]
            mult = keep.to(x.dtype)
            training = torch.is_grad_enabled() and self.training
            if self.cfg.multiplier == "value":
                mult = mult * g.to(x.dtype)
            elif self.cfg.multiplier == "ste" and training:
                gx = g.to(x.dtype)
                mult = mult + (gx - gx.detach())
            if training and self.cfg.fit > 0:
                sal = saliency(x.detach().float())
                target = sal / global_mean(sal).clamp_min(1e-12)  # the global batch's mean under DDP
                self._aux.append(self.cfg.fit * F.mse_loss(g, target) / len(self.gates))
            out = x * mult.view(*mult.shape, 1, 1)
            if training and self.cfg.decay > 0:  # the paper's term on the gated channels: s(T * m) = |m| s(T)
                sal = (x.float().pow(2).mean(dim=(2, 3)) + 1e-12).sqrt()  # eps: no infinite gradient at 0
                self._aux.append(self.cfg.decay * penalty(sal * mult.float().abs(), self.cfg.penalty).mean()
                                 / (s.channels * len(self.gates)))
            return (out,) + tuple(args[1:])

        return hook

    def pop_aux(self) -> torch.Tensor:
        """Sum of the fit and gated-decay terms of the last forward(s) (0 when off); clears them."""
        if not self._aux:
            return torch.zeros(())
        total = torch.stack(self._aux).sum()
        self._aux = []
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.values, self.masks, self.active = {}, {}, {}
        self._batch = x.shape[0]
        if self.posthoc is not None:
            self.posthoc.active, self.posthoc.masks = {}, {}
            self.posthoc.enabled = self.enabled
        return self.model(x)

    # ------------------------------------------------------------------ MACs
    def fractions(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per layer, the fraction (N,) of its input and of its output channels computed in the last forward."""
        fin: dict[str, torch.Tensor] = {}
        fout: dict[str, torch.Tensor] = {}
        for s in self.gates:
            if s.name not in self.active:
                continue
            f = self.active[s.name].to(torch.float64) / s.channels
            fin[s.name] = f
            for p in s.producers:
                fout[p] = f  # a depthwise producer: its input and output channels are the same ones (once)
        if self.posthoc is not None:
            for p in self.posthoc.selected:
                if p.name in self.posthoc.active:
                    fin[p.name] = self.posthoc.active[p.name].to(torch.float64) / p.channels
        return fin, fout

    def instance_macs(self) -> torch.Tensor:
        """Per-image MACs (without overhead) of the last forward: the model's own dense MACs (a slimmed model's
        are below ``dense_macs``, the reference) minus what the gates skipped. A layer whose input and output are
        both gated costs ``macs * k_in/C_in * k_out/C_out``; for a grouped conv only pairs in the same group
        count, so it is counted from the masks group by group."""
        total = torch.full((self._batch,), float(self.gates.dense_macs), dtype=torch.float64)
        if not self.active:
            return total
        fin, fout = self.fractions()
        dw = self._dw()
        for layer in set(fin) | set(fout):
            groups = self._groups.get(layer, 1)
            if layer in dw:
                frac = fout[layer]
            elif groups > 1 and layer in fin and layer in fout and layer in self._groups:
                frac = self._grouped_fraction(layer, groups)
            else:
                frac = fin.get(layer, 1.0) * fout.get(layer, 1.0)
            total = total - self._layer_macs[layer] * (1.0 - frac)
        return total

    def _grouped_fraction(self, layer: str, groups: int) -> torch.Tensor:
        """Fraction of a grouped conv's (input, output) channel pairs that are computed, per image."""
        # the gate whose consumer is ``layer``, or the post-hoc point there
        m_in = (self.masks[layer] if layer in self.masks else self.posthoc.masks[layer]).to(torch.float64)
        m_out = next(self.masks[s.name] for s in self.gates if layer in s.producers).to(torch.float64)
        n = m_in.shape[0]
        k_in = m_in.view(n, groups, -1).sum(2)
        k_out = m_out.view(n, groups, -1).sum(2)
        return (k_in * k_out).sum(1) / (m_in.shape[1] * m_out.shape[1] / groups)

    def _dw(self) -> set[str]:
        return {p for s in self.gates for p in s.producers[1:]}

    def overhead_macs(self) -> int:
        """Predictors: the pool over X (C_in*H*W), the linears, and the selection (C)."""
        own = sum(s.in_channels * s.in_height * s.in_width + self.bank[_key(s.name)].macs() + s.channels
                  for s in self.gates)
        return own + (self.posthoc.overhead_macs() if self.posthoc is not None else 0)

    @property
    def report(self) -> Any:  # the interface TargetController reads (``report.dense_macs``)
        return self

    def remove(self) -> nn.Module:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.posthoc is not None:
            self.posthoc.remove()
        return self.model


def _top(g: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (N, k) of the k largest gate values per row. Gates closed by the ReLU (g = 0, often many) rank
    by channel index, lower first, so every backend (eager, torch.export, ONNX TopK, the engine) keeps the same
    channels; ties between equal positive values (measure zero) are left to ``topk``."""
    order = -torch.arange(1, g.shape[1] + 1, dtype=g.dtype, device=g.device)
    return torch.where(g > 0, g, order).topk(k, dim=1).indices


def _first_linear(p: GatePredictor) -> nn.Linear:
    return p.fc1 if p.kind == "bottleneck" else p.fc


def uniform_keep_for_target(gates: GateReport, target: float, dense_macs: int | None = None,
                            min_keep: float = 0.05, overhead: int = 0) -> float:
    """The keep fraction r, the same for every gate, whose top-k MACs reach a FLOPs reduction of ``target``
    (overhead included); raises :class:`ConfigError` when the gates cannot reach it."""
    dense = dense_macs or gates.dense_macs
    probe = _TopkMacs(gates, gates.dense_macs, min_keep)

    def reduction(r: float) -> float:
        return 1.0 - (probe.macs(dict.fromkeys(gates.names(), r)) + overhead) / dense

    floor = max(min_keep, max(1.0 / s.channels for s in gates))
    best = reduction(floor)
    if best < target:
        raise ConfigError(f"FLOPs target {target:.3f} is unreachable with these gates (at most {best:.3f}: the "
                          f"gated layers hold {_gated_share(gates, dense):.1%} of the MACs)")
    lo, hi = floor, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reduction(mid) >= target else (lo, mid)
    return lo


def _gated_share(gates: GateReport, dense: int) -> float:
    layers = {p for s in gates for p in s.producers} | {s.name for s in gates}
    macs = dict(gates.layer_macs)
    return sum(macs[n] for n in layers) / dense


class _TopkMacs:
    """MACs of top-k budgets without running the model (every image costs the same)."""

    def __init__(self, gates: GateReport, start: int, min_keep: float = 0.05) -> None:
        self.gates = gates
        self.dense = start  # the model's own dense MACs (a slimmed model's are below the original's)
        self.floor = GateConfig(min_keep=min_keep).floor
        self.layer = dict(gates.layer_macs)
        self.dw = {p for s in gates for p in s.producers[1:]}

    def macs(self, keep: Mapping[str, float]) -> float:
        fin: dict[str, float] = {}
        fout: dict[str, float] = {}
        for s in self.gates:
            k = max(self.floor(s.channels), min(s.channels, round(keep[s.name] * s.channels)))
            f = k / s.channels
            fin[s.name] = f
            for p in s.producers:
                fout[p] = f
        total = float(self.dense)
        for layer in set(fin) | set(fout):
            frac = fout[layer] if layer in self.dw else fin.get(layer, 1.0) * fout.get(layer, 1.0)
            total -= self.layer[layer] * (1.0 - frac)
        return total


ALLOCATIONS = ("uniform", "greedy")


@torch.no_grad()
def _score(gated: GatedModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
           keep: Mapping[str, float]) -> tuple[float, float]:
    """(top-1, mean cross-entropy) of ``gated`` with top-k budgets ``keep`` on ``batches`` (eval mode)."""
    saved, was = dict(gated.keep), gated.training
    gated.set_keep(keep)
    gated.eval()
    correct = loss = seen = 0.0
    try:
        for x, y in batches:
            out = gated(x)
            correct += float((out.argmax(1) == y).sum())
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            seen += len(y)
    finally:
        gated.keep = saved
        gated.train(was)
    return correct / seen, loss / seen


def allocate_keep(gated: GatedModel, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], target: float,
                  search: str = "greedy", rungs: int = 8) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-gate top-k budgets whose MACs reach ``target`` (overhead included, against ``gated.dense_macs``).

    ``uniform``: one kept fraction for every gate. ``greedy``: from every gate open, repeatedly lower the gate
    whose next rung (1/``rungs`` of its closable channels) costs the least loss on ``batches`` per MAC saved
    (lazy greedy), until the target is reached; then every budget is eased back by one common factor so the
    target is hit exactly. The greedy result is kept only if its top-1 on ``batches`` is at least the uniform
    one's, so the search never does worse than uniform on the split it is given (a held-out split)."""
    import heapq

    if search not in ALLOCATIONS:
        raise ConfigError(f"gate allocation must be one of {', '.join(ALLOCATIONS)}, got {search!r}")
    gates = gated.gates
    probe = _TopkMacs(gates, gates.dense_macs, gated.cfg.min_keep)
    overhead, dense = gated.overhead_macs(), gated.dense_macs

    def reduction(keep: Mapping[str, float]) -> float:
        return 1.0 - (probe.macs(keep) + overhead) / dense

    uni = dict.fromkeys(gates.names(), uniform_keep_for_target(gates, target, dense, gated.cfg.min_keep, overhead))
    u_top1, u_loss = _score(gated, batches, uni)
    info: dict[str, Any] = {"search": search, "chosen": "uniform", "evaluations": 1,
                            "uniform": {"top1": u_top1, "loss": u_loss, "keep": uni[gates.names()[0]]}}
    if search == "uniform":
        return uni, info
    low = {s.name: gated.cfg.floor(s.channels) / s.channels for s in gates}

    def keep_at(lv: Mapping[str, int]) -> dict[str, float]:
        return {n: 1.0 - (1.0 - low[n]) * i / rungs for n, i in lv.items()}

    level = dict.fromkeys(gates.names(), 0)
    cur_loss = _score(gated, batches, keep_at(level))[1]
    evals = 2
    heap: list[tuple[float, int, str]] = []
    stamp = 0

    def ratio(n: str) -> float | None:
        nonlocal evals
        if level[n] >= rungs:
            return None
        trial = {**level, n: level[n] + 1}
        saved = reduction(keep_at(trial)) - reduction(keep_at(level))
        if saved <= 0:
            return None
        evals += 1
        return (_score(gated, batches, keep_at(trial))[1] - cur_loss) / saved

    for n in level:
        r = ratio(n)
        if r is not None:
            heapq.heappush(heap, (r, stamp, n))
    while heap and reduction(keep_at(level)) < target:
        r, st, n = heapq.heappop(heap)
        if st != stamp:  # stale score: re-evaluate against the current budgets
            r2 = ratio(n)
            if r2 is not None:
                heapq.heappush(heap, (r2, stamp, n))
            continue
        level[n] += 1
        stamp += 1
        cur_loss = _score(gated, batches, keep_at(level))[1]
        evals += 1
        r2 = ratio(n)
        if r2 is not None:
            heapq.heappush(heap, (r2, stamp, n))
    greedy = keep_at(level)
    if reduction(greedy) < target:
        info["greedy"] = {"unreachable": True}
        return uni, info
    lo, hi = 0.0, 1.0  # ease every budget back by one factor a: keep = 1 - (1 - keep) * a
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reduction({n: 1 - (1 - k) * mid for n, k in greedy.items()}) >= target else (mid, hi)
    greedy = {n: 1 - (1 - k) * hi for n, k in greedy.items()}
    g_top1, g_loss = _score(gated, batches, greedy)
    info.update(greedy={"top1": g_top1, "loss": g_loss, "keep": greedy}, evaluations=evals + 1)
    if g_top1 >= u_top1:
        info["chosen"] = "greedy"
        return greedy, info
    return uni, info


class GateRamp:
    """Ramps every gate's kept fraction from 1.0 to its final value over the first ``ramp`` fraction of training
    (cosine, as ManiDP; ``shape="linear"`` for a straight line). Call :meth:`step` with the progress in [0, 1]."""

    def __init__(self, gated: GatedModel, final: Mapping[str, float], ramp: float = 0.3,
                 shape: str = "cosine") -> None:
        if not 0.0 <= ramp <= 1.0:
            raise ConfigError(f"gate ramp must be in [0, 1], got {ramp}")
        if shape not in ("cosine", "linear"):
            raise ConfigError(f"gate ramp shape must be cosine or linear, got {shape!r}")
        self.gated, self.final, self.ramp, self.shape = gated, dict(final), float(ramp), shape
        self.step(0.0)

    def fraction(self, progress: float) -> float:
        """How far along the ramp (0 = all open, 1 = final budgets)."""
        if self.ramp <= 0:
            return 1.0
        t = min(max(progress / self.ramp, 0.0), 1.0)
        return t if self.shape == "linear" else 0.5 * (1 - math.cos(math.pi * t))

    def step(self, progress: float, world_size: int = 1) -> float:
        self.progress = float(progress)
        a = self.fraction(progress)
        self.gated.set_keep({n: 1.0 - (1.0 - k) * a for n, k in self.final.items()})
        return a

    def summary(self) -> dict[str, float]:
        keeps = list(self.gated.keep.values())
        return {"mean_keep": sum(keeps) / max(len(keeps), 1)}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue exactly: the progress (hence the budgets) and, for threshold
        selection, the running thresholds."""
        return {"progress": self.progress, "taus": dict(self.gated.taus), "tau_seen": dict(self.gated._tau_seen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step(float(state.get("progress", 0.0)))
        self.gated.taus.update({str(k): float(v) for k, v in state.get("taus", {}).items()})
        self.gated._tau_seen.update({str(k): bool(v) for k, v in state.get("tau_seen", {}).items()})


@torch.no_grad()
def channel_usage(gated: GatedModel, batches: Iterable[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Per gate, the fraction of the images in ``batches`` (``(x, ...)``) that keep each channel (float (C,)):
    what slim-off removes and what the slim yardstick of a gated plan keeps."""
    counts: dict[str, torch.Tensor] = {}
    n = 0
    gated.eval()
    for batch in batches:
        x = batch[0]
        gated(x)
        n += x.shape[0]
        for s in gated.gates:
            c = gated.masks[s.name].float().sum(0)
            counts[s.name] = counts[s.name] + c if s.name in counts else c
    return {k: v / max(n, 1) for k, v in counts.items()}


def fit_predictors(gated: GatedModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], epochs: int = 1,
                   lr: float = 0.01) -> list[float]:
    """Gate warm-up: fit the predictors to the saliency of their tensors with the network frozen (eval mode, no
    masks: every gate open while fitting). Returns the mean fit loss per epoch."""
    batches = list(batches)
    params = list(gated.bank.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    frozen = [(p, p.requires_grad) for p in gated.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    cfg = gated.cfg
    # the dense network while fitting: every gate open and kept channels passed unscaled (a ``value`` multiplier
    # would scale T by the predictions being fitted and compound over depth: ResNet-56 overflowed to NaN)
    gated.cfg = replace(cfg, fit=max(cfg.fit, 1.0), decay=0.0, multiplier="hard")
    forced = gated.forced
    losses = []
    try:
        gated.model.eval()
        gated.train()  # GatedModel.training turns the fit term on; the wrapped network stays in eval mode
        gated.model.eval()
        for _ in range(epochs):
            tot = n = 0.0
            for x, _y in batches:
                gated.forced = None
                saved = dict(gated.keep)
                gated.keep = dict.fromkeys(gated.keep, 1.0)
                try:
                    with torch.enable_grad():
                        gated(x)
                        loss = gated.pop_aux()
                finally:
                    gated.keep = saved
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(x)
                n += len(x)
            losses.append(tot / max(n, 1))
    finally:
        gated.cfg = cfg
        gated.forced = forced
        for p, rg in frozen:
            p.requires_grad_(rg)
        gated.eval()
    return losses


@dataclass(frozen=True)
class GatePlan:
    """What a plan stores about gates: the config, the sites (checked against the model), the budgets (``keep``
    per gate for top-k, ``taus`` for thresholds), the dense MACs reductions are relative to (the original model's,
    also for a statically slimmed one) and the static plan applied before gating (kept channels per block)."""

    config: GateConfig
    sites: tuple[GateSite, ...]
    keep: dict[str, float]
    taus: dict[str, float] = field(default_factory=dict)
    dense_macs: int = 0
    static: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        names = {s.name for s in self.sites}
        for label, d in (("keep", self.keep), ("taus", self.taus)):
            extra = [n for n in d if n not in names]
            if extra:
                raise ConfigError(f"gate plan {label} names unknown gates: {', '.join(extra[:5])}")
        bad = [n for n, k in self.keep.items() if not 0.0 < float(k) <= 1.0]
        if bad:
            raise ConfigError(f"gate plan keep fractions must be in (0, 1]: {', '.join(bad[:5])}")

    def report(self, gates: GateReport) -> GateReport:
        """The model's gate report restricted to this plan's sites; raises when the model differs."""
        mine = {s.name: s for s in self.sites}
        theirs = gates.by_name()
        missing = [n for n in mine if n not in theirs]
        changed = [n for n in mine if n in theirs and (theirs[n].channels, theirs[n].in_channels,
                                                         theirs[n].producers) != (mine[n].channels,
                                                                                  mine[n].in_channels,
                                                                                  mine[n].producers)]
        if missing or changed:
            raise PlanMismatchError("the plan's gates do not match the model: "
                                    + "; ".join(p for p in (
                                        f"missing {', '.join(missing[:3])}" if missing else "",
                                        f"different shape {', '.join(changed[:3])}" if changed else "") if p))
        return gates.subset(list(mine))

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "sites": [s.to_dict() for s in self.sites], "keep": self.keep,
                "taus": self.taus, "dense_macs": self.dense_macs, "static": self.static}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GatePlan:
        return cls(config=GateConfig(**d.get("config", {})),
                   sites=tuple(GateSite.from_dict(s) for s in d["sites"]),
                   keep={str(k): float(v) for k, v in d.get("keep", {}).items()},
                   taus={str(k): float(v) for k, v in d.get("taus", {}).items()},
                   dense_macs=int(d.get("dense_macs", 0)), static=d.get("static"))


def gated_from_plan(model: nn.Module, gates: GateReport, plan: GatePlan, scale: float = 1.0,
                    points: PointReport | None = None, point_taus: Mapping[str, float] | None = None,
                    thresholds: ThresholdConfig | None = None) -> GatedModel:
    """The reference gated model of ``plan`` on ``model`` (whose predictors are loaded), with the paper's
    post-hoc points ``point_taus`` on other tensors when the plan mixes both."""
    return GatedModel(model, plan.report(gates), plan.config, keep=plan.keep, taus=plan.taus, scale=scale,
                      dense_macs=plan.dense_macs or None, points=points, point_taus=point_taus,
                      thresholds=thresholds)
