"""Small shared configuration types and the one generic, versioned serialisation of every config dataclass.

:func:`config_to_dict` / :func:`config_from_dict` turn any frozen config dataclass (nested dataclasses, tuples,
optional fields) into plain JSON/YAML data and back. ``from_dict`` is also the schema check of every config a
file carries (plan.json, config.yaml, checkpoints): unknown keys, wrong types and non-finite numbers raise
:class:`~instaprune.core.errors.ConfigError` naming the field and what was expected, and the dataclass's own
``__post_init__`` validates the ranges. :class:`ConfigMixin` gives a dataclass ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from instaprune.core.errors import ConfigError, InstapruneError

__all__ = ["Preprocessing", "IMAGENET_MEAN", "IMAGENET_STD", "CONFIG_VERSION", "ConfigMixin", "config_to_dict",
           "config_from_dict", "convert_value", "check_fields", "field_default", "config_defaults"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: version of the serialised form written by :func:`config_to_dict` (``"version"`` key when asked for)
CONFIG_VERSION = 1

C = TypeVar("C")


def field_default(cls: type, name: str) -> Any:
    """The default of dataclass field ``name`` of ``cls`` (``default`` or ``default_factory()``)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def config_defaults(cls: type) -> dict[str, Any]:
    """Every field of ``cls`` with its default."""
    return {f.name: field_default(cls, f.name) for f in dataclasses.fields(cls)}


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return config_to_dict(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def config_to_dict(cfg: Any, version: bool = False) -> dict[str, Any]:
    """Plain data (dicts, lists, scalars) of a config dataclass, nested configs included; with ``version`` the
    serialisation version is recorded as ``"version"``."""
    d = {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if version:
        d["version"] = CONFIG_VERSION
    return d


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return {"float": "a number", "int": "an integer", "str": "a string", "bool": "true or false"}.get(
            tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def convert_value(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp`` (scalars, ``X | None``, tuples,
    dicts, config dataclasses); raises :class:`ConfigError` naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, tp):
        return value
    if isinstance(tp, type) and issubclass(tp, ConfigMixin):
        return tp.from_dict(value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_value(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return config_from_dict(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {_short(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert_value(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(convert_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {_short(value)}")
        args = typing.get_args(tp) or (str, Any)
        return {convert_value(k, args[0], where): convert_value(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {_short(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{where}: expected a number, got {_short(value)}")
        try:  # a Python int beyond float range (JSON and pickles keep it exactly) overflows here
            f = float(value)
        except OverflowError:
            raise ConfigError(f"{where}: expected a finite number, got an integer of {len(str(abs(value)))} "
                              "digits") from None
        if not math.isfinite(f):
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return f
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_short(value)}")
        return value
    return value


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def config_from_dict(cls: type[C], data: Any, where: str | None = None, strict: bool = True) -> C:
    """``cls`` built from ``data`` (what :func:`config_to_dict` wrote), every field type-checked.

    Missing keys take their defaults; unknown keys are an error when ``strict``; a ``"version"`` newer than this
    instaprune writes is refused. Every problem raises :class:`ConfigError` naming ``where.field``."""
    where = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {_short(data)}")
    data = dict(data)
    version = data.pop("version", None)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or version > CONFIG_VERSION):
        raise ConfigError(f"{where}: config version {version!r} is not supported (this instaprune reads "
                          f"<= {CONFIG_VERSION})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown and strict:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(names)})")
    kwargs = {k: convert_value(data[k], hints[k], f"{where}.{k}") for k in names if k in data}
    try:
        return cls(**kwargs)
    except InstapruneError as e:
        raise ConfigError(f"{where}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {type(e).__name__}: {e}") from e


def check_fields(cfg: Any) -> None:
    """Type-check (and normalise: ints to floats, lists to tuples) every field of the frozen dataclass ``cfg``,
    so a wrong type given to the Python API raises :class:`ConfigError` naming the field, not a ``TypeError``
    from deep inside. Call it first in ``__post_init__``."""
    cls = type(cfg)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        new = convert_value(v, hints[f.name], f"{cls.__name__}.{f.name}")
        if new is not v:
            object.__setattr__(cfg, f.name, new)


class ConfigMixin:
    """``to_dict`` / ``from_dict`` for a config dataclass through the generic serialisation."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data with ``"version"`` (what :meth:`from_dict` reads back)."""
        return config_to_dict(self, version=True)

    @classmethod
    def from_dict(cls: type[C], d: Any, where: str | None = None) -> C:
        return config_from_dict(cls, d, where)


@dataclass(frozen=True)
class Preprocessing(ConfigMixin):
    """How raw images become model inputs; stored in checkpoints and plans so `evaluate` can reuse it."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 32
    resize: int | None = None  # eval-time resize before the center crop (ImageNet style: 256 for 224)
    class_names: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
            object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        except (OverflowError, TypeError, ValueError) as e:
            raise ConfigError(f"preprocessing: mean and std must be finite numbers ({type(e).__name__})") from None
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(f"preprocessing: mean has {len(self.mean)} values but std has {len(self.std)}")
        if not all(math.isfinite(v) for v in self.mean + self.std):
            raise ConfigError(f"preprocessing: mean and std must be finite, got {self.mean}, {self.std}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocessing: std must be positive, got {self.std}")
        if not 0 < self.input_size <= 4096:
            raise ConfigError(f"preprocessing: input_size must be in [1, 4096], got {self.input_size}")
        if self.resize is not None and not 0 < self.resize <= 8192:
            raise ConfigError(f"preprocessing: resize must be in [1, 8192] or null, got {self.resize}")

    @classmethod
    def from_dict(cls, d: Any, where: str | None = None) -> Preprocessing:
        # lenient on unknown keys: older files carried extra entries
        if isinstance(d, Mapping):
            d = {k: d[k] for k in ("mean", "std", "input_size", "resize", "class_names") if k in d}
        return config_from_dict(cls, d, where or "preprocessing")
