"""Exception types. Every error a user can cause by bad input derives from `InstapruneError`.

The CLI prints ``str(err)`` of these as one line on stderr and exits with code 2; anything else is a bug.
"""

from __future__ import annotations

__all__ = [
    "InstapruneError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "ModelError",
    "PlanMismatchError",
]


class InstapruneError(Exception):
    """Base class for errors caused by the user's input (files, options, models)."""


class ConfigError(InstapruneError, ValueError):
    """An option is out of range or of the wrong type."""


class DataError(InstapruneError):
    """A data directory or file is missing, empty or corrupt."""


class CheckpointError(InstapruneError):
    """A checkpoint is unreadable or does not match the model."""


class ModelError(InstapruneError):
    """Unknown model name or a model that cannot be analysed."""


class PlanMismatchError(InstapruneError):
    """A plan file does not match the model it is applied to."""
