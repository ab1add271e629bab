"""The method itself: prune points, saliency and thresholds, the feature-decay regulariser, CV analysis and
point selection, calibration to a FLOPs target, the prune-aware controller, the plan, the FLOPs
convention, and the masked reference model. Imports ``core`` (and ``models`` for nothing): never training,
evaluation or the engine.
"""


from instaprune._lazy import lazy_exports

_EXPORTS = {
    "PrunePoint": "points",
    "PointReport": "points",
    "find_prune_points": "points",
    "SHORTCUT_PATTERNS": "points",
    "THRESHOLD_MODES": "thresholds",
    "ThresholdConfig": "thresholds",
    "saliency": "thresholds",
    "reference": "thresholds",
    "keep_mask": "thresholds",
    "flop_counter_macs": "flops",
    "dynamic_macs": "flops",
    "overhead_macs": "flops",
    "reduction_summary": "flops",
    "flops_reduction": "flops",
    "Score": "scoring",
    "score_batches": "scoring",
    "PENALTIES": "regularizer",
    "WEIGHTINGS": "regularizer",
    "FeatureDecayConfig": "regularizer",
    "FeatureDecay": "regularizer",
    "attach_feature_decay": "regularizer",
    "penalty": "regularizer",
    "SaliencyStats": "analysis",
    "analyze": "analysis",
    "select_points": "analysis",
    "ratio_quantiles": "analysis",
    "PLAN_FORMAT": "plan",
    "PLAN_VERSION": "plan",
    "Plan": "plan",
    "weights_fingerprint": "plan",
    "SEARCHES": "calibration",
    "CalibrationConfig": "calibration",
    "Evaluation": "calibration",
    "Evaluator": "calibration",
    "calibrate": "calibration",
    "bisect_scale": "calibration",
    "bisect_reduction": "calibration",
    "recalibrate_batchnorm": "calibration",
    "PruneAwareConfig": "prune_aware",
    "TargetController": "prune_aware",
    "MaskedModel": "masked",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
