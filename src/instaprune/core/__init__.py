"""Foundations every other layer may import: error types, atomic file output, small shared configs and
the generic versioned config serialisation, and the process-group helpers (DDP environment, reductions).
Imports nothing else from instaprune.
"""


from instaprune._lazy import lazy_exports

_EXPORTS = {
    "InstapruneError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "CheckpointError": "errors",
    "ModelError": "errors",
    "PlanMismatchError": "errors",
    "atomic_write": "io",
    "atomic_write_text": "io",
    "atomic_write_json": "io",
    "atomic_torch_save": "io",
    "Preprocessing": "config",
    "IMAGENET_MEAN": "config",
    "IMAGENET_STD": "config",
    "CONFIG_VERSION": "config",
    "ConfigMixin": "config",
    "config_to_dict": "config",
    "config_from_dict": "config",
    "convert_value": "config",
    "check_fields": "config",
    "field_default": "config",
    "config_defaults": "config",
    "DistEnv": "distributed",
    "init_from_env": "distributed",
    "current_env": "distributed",
    "shutdown": "distributed",
    "wrap_ddp": "distributed",
    "freeze_batchnorm": "distributed",
    "all_reduce_sum": "distributed",
    "any_rank": "distributed",
    "gather_objects": "distributed",
    "shard_dataset": "distributed",
    "barrier": "distributed",
    "maybe_no_sync": "distributed",
}

__all__, __getattr__ = lazy_exports(__name__, _EXPORTS)
