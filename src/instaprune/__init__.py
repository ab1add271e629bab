"""instaprune: instance-wise dynamic channel pruning that really skips the work.

Implements "Learning Instance-wise Sparsity for Accelerating Deep Models" (Liu et al., IJCAI 2019):
feature decay (l2,1) regularisation, coefficient-of-variation layer selection, per-instance dynamic
thresholds calibrated to a FLOPs target. Heavy submodules are imported lazily so ``import instaprune``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "InstapruneError": "errors",
    "Preprocessing": "config",
    "PrunePoint": "points",
    "find_prune_points": "points",
    "FeatureDecayConfig": "regularizer",
    "FeatureDecay": "regularizer",
    "attach_feature_decay": "regularizer",
    "SaliencyStats": "analysis",
    "analyze": "analysis",
    "select_points": "analysis",
    "ThresholdConfig": "masked",
    "MaskedModel": "masked",
    "to_dynamic": "engine",
    "DynamicModel": "engine",
    "CalibrationConfig": "calibrate",
    "calibrate": "calibrate",
    "Plan": "plan",
    "count_dense_macs": "flops",
    "build_model": "models",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'instaprune' has no attribute {name!r}")
