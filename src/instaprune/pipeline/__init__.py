"""The stages glued together: load a model, discover points, analyse, calibrate, evaluate and report,
and the method sequence (decay fine-tune -> calibrate -> prune-aware phase -> recalibrate) written
once for the CLI, the demo and the studies.
"""


from instaprune._lazy import lazy_exports

_EXPORTS = {
    "LoadedModel": "stages",
    "load_model": "stages",
    "discover": "stages",
    "load_split": "stages",
    "cached_batches": "stages",
    "analyze_and_select": "stages",
    "calibrate_plan": "stages",
    "evaluate_and_report": "stages",
    "parse_selection": "stages",
    "PosthocSchedule": "posthoc",
    "PosthocResult": "posthoc",
    "run_posthoc": "posthoc",
    "GateSchedule": "gated",
    "GatedRun": "gated",
    "prepare_gates": "gated",
    "train_gated": "gated",
    "train_static": "gated",
    "calibrate_gates": "gated",
    "example_input": "gated",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
