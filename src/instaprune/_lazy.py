"""Lazy re-exports for package ``__init__`` modules: a name is imported from its module on first access, so
``import instaprune`` (and each subpackage) stays cheap and never pulls in torch-heavy or optional modules early.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[list[str], Callable[[str], Any]]:
    """``(__all__, __getattr__)`` for ``package`` whose public names live in the modules ``table`` maps them to
    (module paths relative to ``package``)."""

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(f".{table[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return sorted(table), __getattr__
