"""Checkpoint reading and writing.

Accepted inputs of :func:`load_weights` / :func:`read_meta`:

(a) the public CIFAR format ``{"state_dict": {...}, "best_prec1": ...}`` (also ``"model"`` /
    ``"model_state_dict"`` holding the state dict); keys may carry the ``module.`` prefix of
    ``DataParallel`` / DDP or the ``_orig_mod.`` prefix of ``torch.compile`` (stripped when the model has
    no such prefix);
(b) a plain state dict (name -> tensor);
(c) this project's checkpoint ``{"format": "instaprune-checkpoint", "version": 1, "model": state_dict,
    "meta": {...}}``; ``meta`` holds ``model_name``, ``num_classes``, ``preprocessing`` and anything else.
    Training checkpoints add ``optimizer`` / ``epoch`` / ``history`` entries, ignored here;
(d) ``.safetensors`` files, whose header metadata key ``"instaprune"`` holds the JSON-encoded meta.

Files are always read with ``torch.load(..., map_location="cpu", weights_only=True)``: no code in a checkpoint
is ever executed. Before weights reach a model they are checked: names and shapes against the model, dtypes
(floating where the model is floating, integer where it counts), and every floating value finite (a NaN or inf
weight is refused, naming the tensor); a file that is neither a PyTorch archive nor safetensors is named as such.
Every problem raises :class:`~instaprune.errors.CheckpointError` with a one-line message.
BatchNorm ``num_batches_tracked`` counters absent from old checkpoints are not reported as missing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaprune.core.errors import CheckpointError
from instaprune.core.io import _json_default, atomic_torch_save, atomic_write

__all__ = ["FORMAT", "VERSION", "load_weights", "save_checkpoint", "save_safetensors", "read_meta",
           "read_state_dict"]

log = logging.getLogger(__name__)

FORMAT = "instaprune-checkpoint"
VERSION = 1
_SAFETENSORS_META_KEY = "instaprune"
_STATE_KEYS = ("state_dict", "model", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # keys listed per category in a mismatch message


def _one_line(text: object, limit: int = 240) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _reason(e: BaseException) -> str:
    msg = _one_line(e)
    if "Weights only load failed" in msg:
        return ("it holds Python objects besides tensors and plain containers "
                "(refused by weights_only loading)")
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:  # sniff: 8-byte little-endian header length, then a JSON object
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {_reason(e)}") from e
    return state, _safetensors_meta(path, header)


def _safetensors_meta(path: Path, header: Mapping[str, str]) -> dict[str, Any]:
    raw = header.get(_SAFETENSORS_META_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: metadata is not a JSON object")
    return meta


def _torch_load(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol byte 0x80)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch checkpoint or safetensors file "
                              f"(it starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {_reason(e)}") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _plain_extras(obj: Mapping[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    """Top-level entries of a public-format checkpoint that are plain Python scalars (e.g. ``best_prec1``)."""
    return {k: v for k, v in obj.items()
            if k not in skip and isinstance(k, str) and isinstance(v, (str, int, float, bool, type(None)))}


def _split(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A loaded checkpoint object -> (state dict, meta)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise CheckpointError(f"checkpoint {path} has format version {version!r}; this instaprune reads "
                                  f"versions <= {VERSION} (upgrade instaprune)")
        state, meta = obj.get("model"), obj.get("meta", {})
        if not _is_state_dict(state):
            raise CheckpointError(f"checkpoint {path} is an instaprune checkpoint without model weights")
        if not isinstance(meta, Mapping):
            raise CheckpointError(f"checkpoint {path}: 'meta' is a {type(meta).__name__}, not a dict")
        return dict(state), dict(meta)
    for key in _STATE_KEYS:
        if key in obj and _is_state_dict(obj[key]):
            return dict(obj[key]), _plain_extras(obj, (key,))
    if _is_state_dict(obj):
        return dict(obj), {}
    keys = ", ".join(repr(k) for k in list(obj)[:8])
    raise CheckpointError(f"no state dict found in checkpoint {path} (top-level keys: {keys or 'none'})")


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    p = Path(path)
    _check_file(p)
    if _is_safetensors(p):
        state, meta = _read_safetensors(p)
        if not state:
            raise CheckpointError(f"checkpoint {p} holds no tensors")
        return state, meta, p
    state, meta = _split(_torch_load(p), p)
    return state, meta, p


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict as stored, meta) of any supported checkpoint, without a model (prefixes kept)."""
    state, meta, _ = _read(path)
    return state, meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's metadata dict (possibly empty), without needing a model.

    For safetensors only the header is read; torch files are loaded (CPU, weights only)."""
    p = Path(path)
    _check_file(p)
    if _is_safetensors(p):
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                header = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {p}: {_reason(e)}") from e
        return _safetensors_meta(p, header)
    return _split(_torch_load(p), p)[1]


def _strip_prefixes(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for pre in _PREFIXES:
            if (state and all(k.startswith(pre) for k in state)
                    and not any(k.startswith(pre) for k in model_keys)):
                state = {k[len(pre):]: v for k, v in state.items()}
                changed = True
    return state


def _listing(keys: list[str], what: str) -> str:
    shown = ", ".join(keys[:_SHOW])
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"{len(keys)} {what}: {shown}{more}"


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict[str, Any]:
    """Load the weights of a checkpoint at ``path`` into ``model`` (in place) and return its meta dict.

    ``strict=True``: any missing, unexpected or mis-shaped key raises :class:`CheckpointError` naming them
    (first five of each with the count of the rest). ``strict=False``: loads the keys that match by name and
    shape and logs a warning for the others (mis-shaped keys keep the model's values)."""
    state, meta, p = _read(path)
    target = model.state_dict()
    state = _strip_prefixes(state, set(target))
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    misshaped = [k for k in state if k in target and state[k].shape != target[k].shape]
    mistyped = [k for k in state if k in target and k not in misshaped
                and state[k].is_floating_point() != target[k].is_floating_point()]
    if mistyped:
        k = mistyped[0]
        raise CheckpointError(f"checkpoint {p}: tensor {k!r} has dtype {state[k].dtype}, the model expects "
                              f"{target[k].dtype}" + (f" (+{len(mistyped) - 1} more)" if len(mistyped) > 1 else ""))
    bad = [k for k in state
           if k in target and state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if bad:
        raise CheckpointError(f"checkpoint {p}: tensor {bad[0]!r} holds NaN or infinite values"
                              + (f" (+{len(bad) - 1} more tensors)" if len(bad) > 1 else "")
                              + ": refusing to use these weights")
    negvar = [k for k in state if k in target and k.endswith("running_var") and k not in misshaped
              and state[k].is_floating_point() and bool((state[k] < 0).any())]
    if negvar:  # a variance below zero: BatchNorm would take its square root (NaN outputs, evaluated silently)
        raise CheckpointError(f"checkpoint {p}: BatchNorm statistic {negvar[0]!r} holds negative variances: "
                              "refusing to use these weights")
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(_listing(missing, "missing keys"))
        if unexpected:
            parts.append(_listing(unexpected, "unexpected keys"))
        if misshaped:
            parts.append(_listing([f"{k} checkpoint {_shape(state[k])} vs model {_shape(target[k])}"
                                   for k in misshaped], "mis-shaped keys"))
        if not any(k in target for k in state):
            parts.append("no key in common: is the checkpoint for another architecture?")
        msg = f"checkpoint {p} does not match the model: " + "; ".join(parts)
        if strict:
            raise CheckpointError(msg)
        log.warning("%s (loading the matching keys only)", msg)
    # counters that old checkpoints lack: keep the model's own value
    sd = {k: v for k, v in state.items() if k in target and k not in misshaped}
    for k in target:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = target[k]
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied; the checks above catch name/shape issues
        raise CheckpointError(f"cannot load checkpoint {p} into the model: {_one_line(e)}") from e
    return meta


def _plain_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """``meta`` as plain JSON data (dataclasses via ``to_dict``, tuples -> lists, Paths -> str)."""
    if meta is None:
        return {}
    try:
        plain = json.loads(json.dumps(dict(meta), default=_json_default))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint meta must be JSON-serialisable: {_one_line(e)}") from e
    return plain


def _tensors(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = model.state_dict() if isinstance(model, nn.Module) else model
    return {k: v.detach().cpu() for k, v in state.items()}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, meta: Mapping[str, Any] | None = None) -> Path:
    """Write format (c) atomically: tensors and plain-JSON meta only, so ``weights_only`` loading works."""
    obj = {"format": FORMAT, "version": VERSION, "model": _tensors(model), "meta": _plain_meta(meta)}
    return atomic_torch_save(path, obj)


def save_safetensors(path: str | os.PathLike, model: nn.Module,
                     meta: Mapping[str, Any] | None = None) -> Path:
    """Write the model's tensors as safetensors (atomically) with ``meta`` JSON-encoded in the header."""
    from safetensors.torch import save

    # clone: safetensors refuses tensors that share storage (tied weights, views)
    tensors = {k: v.contiguous().clone() for k, v in _tensors(model).items()}
    header = {_SAFETENSORS_META_KEY: json.dumps(_plain_meta(meta))}
    data = save(tensors, metadata=header)
    return atomic_write(path, lambda f: f.write(data))
