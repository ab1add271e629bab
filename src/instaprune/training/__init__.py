"""Training loops and their safety net: the SGD loop (feature decay, distillation, masks, DDP, AMP,
accumulation), checkpoints and weights I/O, crash-safe training state and fault injection.
Imports ``core``, ``data`` and ``method``.
"""


from instaprune._lazy import lazy_exports

_EXPORTS = {
    "AUGMENTS": "loop",
    "CHECKPOINT_NAME": "loop",
    "TrainConfig": "loop",
    "TrainResult": "loop",
    "train": "loop",
    "evaluate_top1": "loop",
    "FORMAT": "checkpoint",
    "VERSION": "checkpoint",
    "load_weights": "checkpoint",
    "save_checkpoint": "checkpoint",
    "save_safetensors": "checkpoint",
    "read_meta": "checkpoint",
    "read_state_dict": "checkpoint",
    "FAULT_EXIT_CODE": "artifacts",
    "Faults": "artifacts",
    "faults_from_env": "artifacts",
    "capture_rng": "artifacts",
    "restore_rng": "artifacts",
    "write_training_checkpoint": "artifacts",
    "read_training_checkpoint": "artifacts",
    "remove_partial_writes": "artifacts",
    "StopOnSignal": "artifacts",
    "Portable": "artifacts",
    "save_portable": "artifacts",
    "load_portable": "artifacts",
    "plan_points": "artifacts",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
