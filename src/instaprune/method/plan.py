"""The calibrated pruning plan: a small, versioned JSON file consumed by the masked model and the fast engine.

A plan records the model's prune points (name, kind, channels, groups) and their fingerprint, so a plan made for
another model is rejected with the exact differences; the selection, threshold mode, per-point taus, global scale,
CV per point, FLOPs target, calibrated accuracy-vs-FLOPs curve, the preprocessing to use and a fingerprint of
the weights it was calibrated on (:func:`weights_fingerprint`; the CLI refuses other weights unless told).

:meth:`Plan.from_dict` is the schema check of plan.json: every field's type, finite numbers, known points, and
the ``gates`` section; each problem raises :class:`~instaprune.core.errors.PlanMismatchError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaprune.core.config import Preprocessing, config_from_dict, config_to_dict, convert_value
from instaprune.core.errors import ConfigError, InstapruneError, PlanMismatchError
from instaprune.core.io import atomic_write_json
from instaprune.method.gates import GatePlan
from instaprune.method.points import PointReport
from instaprune.method.thresholds import ThresholdConfig

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "Plan", "weights_fingerprint"]

PLAN_FORMAT = "instaprune-plan"
PLAN_VERSION = 2
#: versions this instaprune reads (1: post-hoc points only; 2 adds gates)
PLAN_VERSIONS = (1, 2)


@dataclass(frozen=True)
class Plan:
    model_name: str
    fingerprint: str
    points: tuple[tuple[str, str, int, int], ...]  # every enabled point: (name, kind, channels, groups)
    taus: dict[str, float]  # selected point -> tau
    thresholds: ThresholdConfig = field(default_factory=ThresholdConfig)
    scale: float = 1.0
    target: float | None = None
    cv: dict[str, float] = field(default_factory=dict)
    curve: tuple[dict[str, float], ...] = ()  # calibration split: scale -> flops_reduction, top1
    calibration: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    gates: GatePlan | None = None  # predicted gates (docs/method.md section 9); None: post-hoc points only
    weights: str | None = None  # weights_fingerprint() of the weights it was calibrated on (None: not recorded)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if not (0 <= self.scale < math.inf):
            raise ConfigError(f"plan scale must be a finite number >= 0, got {self.scale}")
        bad = [n for n, t in self.taus.items() if not (0 <= t < math.inf)]
        if bad:
            raise ConfigError(f"plan taus must be finite numbers >= 0: {', '.join(bad[:5])}")
        if self.target is not None and not 0 < self.target < 1:
            raise ConfigError(f"plan target must be in (0, 1), got {self.target}")
        names = {p[0] for p in self.points}
        extra = [n for n in self.taus if n not in names]
        if extra:
            raise ConfigError(f"plan selects unknown points: {', '.join(extra[:5])}")

    @property
    def selected(self) -> list[str]:
        return [p[0] for p in self.points if p[0] in self.taus]

    def with_scale(self, scale: float) -> Plan:
        return replace(self, scale=float(scale))

    def check_weights(self, model: nn.Module) -> str | None:
        """None when ``model``'s weights are the ones the plan was calibrated on (or the plan does not say);
        else a one-line description of the difference."""
        if self.weights is None:
            return None
        mine = weights_fingerprint(model)
        if mine == self.weights:
            return None
        return (f"the plan was calibrated on other weights (fingerprint {self.weights}, these weights "
                f"{mine}): its thresholds and FLOPs reduction do not hold for them")

    @staticmethod
    def signature(points: PointReport) -> tuple[tuple[str, str, int, int], ...]:
        return tuple((p.name, p.kind, p.channels, p.groups) for p in points)

    def check(self, points: PointReport, model_name: str | None = None) -> None:
        """Raise :class:`PlanMismatchError` naming what differs when ``points`` is not the plan's model."""
        if points.fingerprint() == self.fingerprint:
            return
        mine = {p[0]: p for p in self.points}
        theirs = {p[0]: p for p in self.signature(points)}
        missing = [n for n in mine if n not in theirs]
        extra = [n for n in theirs if n not in mine]
        changed = [f"{n} {mine[n][1:]} vs {theirs[n][1:]}" for n in mine if n in theirs and mine[n] != theirs[n]]
        parts = []
        for label, items in (("points missing in the model", missing), ("extra points in the model", extra),
                             ("(kind, channels, groups) differ", changed)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        target = f" {model_name!r}" if model_name else ""
        raise PlanMismatchError(
            f"plan was made for model {self.model_name!r} ({len(self.points)} points) and does not match the"
            f" model{target} ({len(points)} points): " + "; ".join(parts or ["fingerprint differs"])
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT, "version": self.version, "model_name": self.model_name,
            "fingerprint": self.fingerprint, "weights": self.weights, "points": [list(p) for p in self.points],
            "selected": self.selected, "taus": self.taus, "thresholds": config_to_dict(self.thresholds),
            "scale": self.scale, "target": self.target, "cv": self.cv, "curve": list(self.curve),
            "calibration": self.calibration, "preprocessing": self.preprocessing.to_dict(),
            "gates": None if self.gates is None else self.gates.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> Plan:
        """The plan in ``d`` (parsed plan.json), every field checked; errors name ``source`` and the field."""
        if not isinstance(d, Mapping):
            raise PlanMismatchError(f"{source} is malformed: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise PlanMismatchError(f"{source}: not an instaprune plan (missing 'format': 'instaprune-plan')")
        if d.get("version") not in PLAN_VERSIONS or isinstance(d.get("version"), bool):
            raise PlanMismatchError(f"{source}: plan format version {d.get('version')!r} is not supported "
                                    f"(this instaprune reads versions {', '.join(map(str, PLAN_VERSIONS))})")

        def get(key: str, tp: Any, default: Any = ...) -> Any:
            if key not in d or (d[key] is None and default is not ...):
                if default is ...:
                    raise PlanMismatchError(f"{source} is malformed: field '{key}' is missing")
                return default
            try:
                return convert_value(d[key], tp, f"field '{key}'")
            except ConfigError as e:
                raise PlanMismatchError(f"{source} is malformed: {e}") from e

        try:
            gates = None
            if d.get("gates") is not None:
                if not isinstance(d["gates"], Mapping):
                    raise PlanMismatchError(f"{source} is malformed: field 'gates': expected a mapping, got "
                                            f"{type(d['gates']).__name__}")
                try:
                    gates = GatePlan.from_dict(d["gates"])
                except InstapruneError as e:
                    raise PlanMismatchError(f"{source} is malformed: field 'gates': {e}") from e
                except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                    raise PlanMismatchError(f"{source} is malformed: field 'gates': {type(e).__name__}: {e}") from e
            points = get("points", tuple[tuple[str, str, int, int], ...])
            names = [p[0] for p in points]
            if len(set(names)) != len(names):
                raise PlanMismatchError(f"{source} is malformed: field 'points' names a point twice")
            cv = get("cv", dict[str, Any], {})
            bad = [k for k, v in cv.items()
                   if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))]
            if bad:
                raise PlanMismatchError(f"{source} is malformed: field 'cv.{bad[0]}': expected a number")
            cv = {k: float(v) for k, v in cv.items() if v is not None}
            curve = get("curve", tuple[dict[str, float], ...], ())
            for i, row in enumerate(curve):
                missing = [k for k in ("scale", "flops_reduction", "top1") if k not in row]
                if missing:
                    raise PlanMismatchError(f"{source} is malformed: field 'curve[{i}]' lacks {', '.join(missing)}")
            return cls(
                model_name=get("model_name", str), fingerprint=get("fingerprint", str), points=points,
                taus=get("taus", dict[str, float]),
                thresholds=config_from_dict(ThresholdConfig, d.get("thresholds") or {}, "field 'thresholds'"),
                scale=get("scale", float, 1.0), target=get("target", float | None, None), cv=cv,
                curve=curve, calibration=get("calibration", dict, {}),
                preprocessing=Preprocessing.from_dict(d.get("preprocessing") or {}, "field 'preprocessing'"),
                gates=gates, weights=get("weights", str | None, None),
            )
        except PlanMismatchError:
            raise
        except ConfigError as e:
            raise PlanMismatchError(f"{source} is malformed: {e}") from e

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanMismatchError(f"plan file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSON syntax, or an int over 4300 digits
            raise PlanMismatchError(f"cannot read plan {path}: {e}") from e
        return cls.from_dict(d, f"plan {path}")


def weights_fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """A short sha256 of the weights and buffers that decide a model's outputs (names, shapes, dtypes, bytes;
    BatchNorm's ``num_batches_tracked`` counters left out), so a plan can tell which weights it belongs to."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for k in sorted(state):
        if k.endswith("num_batches_tracked"):
            continue
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]
