"""Prune-point discovery (docs/method.md section 1).

A *prune point* is the input X of one consuming layer (a ``Conv2d``, or a ``Linear`` reading a flat feature vector).
Pruning channel c at that point means the consumer treats X[c] as zero; other readers of the same tensor (e.g. a
residual connection) are unaffected, so a point is named after its consumer module.

Discovery runs the model once on an example input with forward hooks on every module (this works on any
``nn.Module``, traceable or not, and sees the real shapes). Every Conv/Linear-like layer ends up either as a point
or in ``skipped`` with a precise reason: nothing is dropped silently.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from instaprune.core.errors import ModelError
from instaprune.method.flops import conv_linear_macs

__all__ = ["PrunePoint", "PointReport", "find_prune_points", "SHORTCUT_PATTERNS"]

log = logging.getLogger(__name__)

#: attribute under which gate predictors hang in a model (``method.gates``); discovery never treats them as layers
GATES_ATTR = "instaprune_gates"

#: name patterns of downsampling shortcut convs (torchvision ``downsample``, CIFAR ``shortcut``): off by default.
SHORTCUT_PATTERNS: tuple[str, ...] = ("*downsample*", "*shortcut*")

_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear)


@dataclass(frozen=True)
class PrunePoint:
    """The input of one consumer layer, at the example input's resolution (per instance)."""

    name: str  # the consumer module's qualified name, e.g. "layer1.0.conv2"
    kind: str  # "conv", "grouped", "depthwise" or "linear"
    channels: int  # C: channels of the consumer's input
    height: int  # H, W of that input (1, 1 for a Linear)
    width: int
    groups: int
    macs: int  # dense MACs of the consumer for one instance
    source: str  # module that produced the tensor, or "functional op after <module>" (a torch function made it)
    shortcut: bool = False  # the consumer is a downsampling shortcut

    @property
    def macs_per_channel(self) -> float:
        """MACs the consumer spends per active input channel (also for grouped/depthwise convs)."""
        return self.macs / self.channels

    @property
    def overhead_macs(self) -> int:
        """Cost of computing this point's saliencies (one multiply-add per element) plus its threshold."""
        return self.channels * self.height * self.width + self.channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunePoint:
        return cls(**d)


@dataclass(frozen=True)
class PointReport:
    """Result of discovery: enabled points, points disabled by default/pattern, and layers that cannot be handled."""

    points: tuple[PrunePoint, ...]
    disabled: tuple[tuple[PrunePoint, str], ...] = field(default_factory=tuple)
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (layer name, reason)
    dense_macs: int = 0  # MACs of every conv/linear of the model for one instance
    input_shape: tuple[int, ...] = ()

    def __iter__(self):
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def by_name(self) -> dict[str, PrunePoint]:
        return {p.name: p for p in self.points}

    def fingerprint(self) -> str:
        """Hash of the enabled points' names, kinds, channels and groups (resolution independent)."""
        sig = [(p.name, p.kind, p.channels, p.groups) for p in self.points]
        return hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:16]

    def subset(self, names: Sequence[str]) -> PointReport:
        keep = set(names)
        unknown = keep - set(self.names())
        if unknown:
            raise ModelError(f"unknown prune point(s): {', '.join(sorted(unknown)[:5])}")
        return PointReport(
            tuple(p for p in self.points if p.name in keep), self.disabled, self.skipped,
            self.dense_macs, self.input_shape,
        )


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups == 1:
        return "conv"
    if m.groups == m.in_channels:
        return "depthwise"
    return "grouped"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_prune_points(
    model: nn.Module,
    example_input: torch.Tensor,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    shortcuts: bool = False,
) -> PointReport:
    """Discover the prune points of ``model`` by running it once on ``example_input`` (N, C, H, W).

    ``include``/``exclude`` are fnmatch patterns on consumer names (``include=None`` means all);
    downsampling shortcut convs (``SHORTCUT_PATTERNS``) are disabled unless ``shortcuts=True``.
    """
    modules = dict(model.named_modules())
    calls: dict[str, list[tuple[tuple[int, ...], int, str]]] = {}
    produced: dict[int, str] = {}  # id(output tensor) -> producing module name
    keep_alive: list[torch.Tensor] = []  # keep outputs alive so their ids stay unique during the pass
    first_input: dict[str, bool] = {}
    handles = []
    last = [""]  # the leaf module that finished most recently: names tensors made by torch functions after it

    def post_hook(name: str):
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            if isinstance(m, (nn.Conv2d, nn.Linear)) and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                src = produced.get(id(x)) or (f"functional op after {last[0]}" if last[0] else "functional op")
                calls.setdefault(name, []).append((tuple(x.shape), conv_linear_macs(m, out), src))
                first_input[name] = first_input.get(name, False) or x is example_input
            if isinstance(out, torch.Tensor):
                produced[id(out)] = name
                keep_alive.append(out)
                last[0] = name

        return hook

    modules = {n: m for n, m in modules.items() if not (n == GATES_ATTR or n.startswith(GATES_ATTR + "."))}
    for name, m in modules.items():
        if name and not list(m.children()):  # leaf modules only
            handles.append(m.register_forward_hook(post_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as e:  # a model that does not run cannot be analysed
        raise ModelError(f"the model failed on an example input of shape {tuple(example_input.shape)}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    points: list[PrunePoint] = []
    disabled: list[tuple[PrunePoint, str]] = []
    skipped: list[tuple[str, str]] = []
    dense = 0
    for name, m in modules.items():
        if isinstance(m, _UNSUPPORTED):
            skipped.append((name, f"{type(m).__name__} is not supported (only Conv2d and Linear consumers)"))
            continue
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        seen = calls.get(name, [])
        dense += sum(c[1] for c in seen)
        if not seen:
            skipped.append((name, "not called in forward with the example input"))
            continue
        if len(seen) > 1:
            skipped.append((name, f"called {len(seen)} times per forward (shared weights)"))
            continue
        shape, macs, src = seen[0]
        if first_input[name]:
            skipped.append((name, "reads the network input (RGB): not a prune point"))
            continue
        if isinstance(m, nn.Linear) and len(shape) != 2:
            skipped.append((name, f"Linear reads a {len(shape)}-d input {shape}; only (N, features) is supported"))
            continue
        h, w = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
        p = PrunePoint(
            name=name, kind=_kind(m), channels=shape[1], height=h, width=w,
            groups=getattr(m, "groups", 1), macs=macs, source=src,
            shortcut=_matches(name, SHORTCUT_PATTERNS),
        )
        if p.shortcut and not shortcuts:
            disabled.append((p, "downsampling shortcut (off by default; shortcuts=True enables)"))
        elif include is not None and not _matches(name, include):
            disabled.append((p, "not matched by include patterns"))
        elif exclude and _matches(name, exclude):
            disabled.append((p, "matched by exclude patterns"))
        else:
            points.append(p)
    for name, reason in skipped:
        log.info("prune point skipped: %s: %s", name, reason)
    return PointReport(tuple(points), tuple(disabled), tuple(skipped), dense, tuple(example_input.shape))
