"""instaprune: instance-wise dynamic channel pruning that really skips the work.

Implements "Learning Instance-wise Sparsity for Accelerating Deep Models" (Liu et al., IJCAI 2019) and goes past
it; ``docs/method.md`` in the repository describes the method as this package implements it. The subpackages
read as the pipeline, each importing only the ones above it:

    core        errors, atomic I/O, configs, process groups
    models      CIFAR ResNets / VGG / demo net, torchvision classifiers by name
    data        datasets, splits, augmentation, the demo's synthetic images
    method      points, saliency + thresholds, feature decay, CV analysis, calibration, plan, FLOPs, masked reference
    baselines   static L1 filter pruning
    training    the training loop, checkpoints, crash safety
    evaluation  accuracy and FLOPs, reports and plots, export
    engine      the fast dynamic engine and its benchmark
    pipeline    the stages and the method sequence, called by the CLI, the demo and the studies
    demo        ``instaprune demo``
    cli         the ``instaprune`` command

Names are imported lazily, so ``import instaprune`` stays cheap.
"""

from __future__ import annotations

from instaprune._lazy import lazy_exports

__version__ = "0.2.0"

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    "InstapruneError": "core.errors",
    "Preprocessing": "core.config",
    "build_model": "models",
    "PrunePoint": "method.points",
    "find_prune_points": "method.points",
    "ThresholdConfig": "method.thresholds",
    "FeatureDecayConfig": "method.regularizer",
    "FeatureDecay": "method.regularizer",
    "attach_feature_decay": "method.regularizer",
    "SaliencyStats": "method.analysis",
    "analyze": "method.analysis",
    "select_points": "method.analysis",
    "CalibrationConfig": "method.calibration",
    "calibrate": "method.calibration",
    "Plan": "method.plan",
    "MaskedModel": "method.masked",
    "flop_counter_macs": "method.flops",
    "to_dynamic": "engine.dynamic",
    "DynamicModel": "engine.dynamic",
}

_names, __getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = ["__version__", *_names]
