"""Small shared configuration types (frozen, validated, JSON/YAML friendly)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from instaprune.core.errors import ConfigError

__all__ = ["Preprocessing", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How raw images become model inputs; stored in checkpoints and plans so `evaluate` can reuse it."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 32
    resize: int | None = None  # eval-time resize before the center crop (ImageNet style: 256 for 224)
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if len(self.mean) != len(self.std):
            raise ConfigError(f"preprocessing: mean has {len(self.mean)} values but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocessing: std must be positive, got {self.std}")
        if self.input_size <= 0:
            raise ConfigError(f"preprocessing: input_size must be positive, got {self.input_size}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"], d["class_names"] = list(self.mean), list(self.std), list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {k: d[k] for k in ("mean", "std", "input_size", "resize", "class_names") if k in d}
        return cls(**known)
