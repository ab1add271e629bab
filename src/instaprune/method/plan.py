"""The calibrated pruning plan: a small, versioned JSON file consumed by the masked model and the fast engine.

A plan records the model's prune points (name, kind, channels, groups) and their fingerprint, so a plan made for
another model is rejected with the exact differences; the selection, threshold mode, per-point taus, global scale,
CV per point, FLOPs target, calibrated accuracy-vs-FLOPs curve and the preprocessing to use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from instaprune.core.config import Preprocessing
from instaprune.core.errors import ConfigError, PlanMismatchError
from instaprune.core.io import atomic_write_json
from instaprune.method.gates import GatePlan
from instaprune.method.points import PointReport
from instaprune.method.thresholds import ThresholdConfig

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "Plan"]

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
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ConfigError(f"plan scale must be >= 0, got {self.scale}")
        names = {p[0] for p in self.points}
        extra = [n for n in self.taus if n not in names]
        if extra:
            raise ConfigError(f"plan selects unknown points: {', '.join(extra[:5])}")

    @property
    def selected(self) -> list[str]:
        return [p[0] for p in self.points if p[0] in self.taus]

    def with_scale(self, scale: float) -> Plan:
        return replace(self, scale=float(scale))

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
            "fingerprint": self.fingerprint, "points": [list(p) for p in self.points],
            "selected": self.selected, "taus": self.taus,
            "thresholds": {"mode": self.thresholds.mode, "min_keep": self.thresholds.min_keep},
            "scale": self.scale, "target": self.target, "cv": self.cv, "curve": list(self.curve),
            "calibration": self.calibration, "preprocessing": self.preprocessing.to_dict(),
            "gates": None if self.gates is None else self.gates.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != PLAN_FORMAT:
            raise PlanMismatchError("not an instaprune plan (missing 'format': 'instaprune-plan')")
        if d.get("version") not in PLAN_VERSIONS:
            raise PlanMismatchError(f"plan format version {d.get('version')} is not supported "
                                    f"(this instaprune reads version {PLAN_VERSION})")
        try:
            return cls(
                model_name=d["model_name"], fingerprint=d["fingerprint"],
                points=tuple((str(a), str(b), int(c), int(g)) for a, b, c, g in d["points"]),
                taus={k: float(v) for k, v in d["taus"].items()},
                thresholds=ThresholdConfig(**d.get("thresholds", {})), scale=float(d.get("scale", 1.0)),
                target=d.get("target"), cv=dict(d.get("cv", {})), curve=tuple(d.get("curve", ())),
                calibration=dict(d.get("calibration", {})),
                preprocessing=Preprocessing.from_dict(d.get("preprocessing", {})),
                gates=GatePlan.from_dict(d["gates"]) if d.get("gates") else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanMismatchError(f"plan is malformed: {type(e).__name__}: {e}") from e

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanMismatchError(f"plan file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanMismatchError(f"cannot read plan {path}: {e}") from e
        if not isinstance(d, dict):
            raise PlanMismatchError(f"cannot read plan {path}: not a JSON object")
        return cls.from_dict(d)
