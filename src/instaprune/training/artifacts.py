"""What a run leaves on disk and reads back: crash-safe training checkpoints and portable weights + plan.

Training checkpoints (``checkpoint.pt``, format ``instaprune-checkpoint`` version 1, readable by
:func:`instaprune.checkpoint.load_weights`) hold tensors and plain containers only, so they load with
``torch.load(..., weights_only=True)``. They record the model and optimizer state, ``epoch`` (completed
epochs), ``step`` (batches done in the current epoch; 0 at an epoch end), ``global_step`` (optimizer steps),
the sampler position (seed, epoch, offset, global batch), every rank's RNG states and running sums of the
current epoch's metrics, the config and the history. The learning-rate schedule is a pure function of the
position (no scheduler state) and bf16 autocast needs no gradient scaler. Writes go through
:func:`instaprune.io.atomic_write` (temp file, fsync, rename), so the latest ``checkpoint.pt`` is always a
complete earlier checkpoint, never a torn one. :class:`StopOnSignal` turns SIGINT/SIGTERM into a request to
checkpoint and stop at the next optimizer step.

Fault injection for tests (read by :func:`faults_from_env`; they fire only in a run that did not resume, so
the resumed run gets past the same step):

- ``INSTAPRUNE_FAULT_STEP=k``: the process exits (``os._exit(75)``, no cleanup, like a crash) right after
  optimizer step ``k`` (and after the checkpoint of step ``k``, if one is due);
- ``INSTAPRUNE_FAULT_IN_CHECKPOINT=k``: the first checkpoint written at a step ``>= k`` dies half-way through
  writing its temp file (a partial ``.checkpoint.pt.*.tmp`` stays behind; ``checkpoint.pt`` keeps the
  previous version);
- ``INSTAPRUNE_FAULT_RANK=r``: the rank that crashes (default 0);
- ``INSTAPRUNE_FAULT_DELAY=s``: sleep ``s`` seconds after every step (so an external kill lands mid-run).

Portable artifacts: :func:`save_portable` writes ``model.safetensors`` (with the meta, including the prune
points' fingerprint, in its header) and ``plan.json``; :func:`load_portable` loads them into a model and says
exactly what differs when weights or plan belong to another model.
"""

from __future__ import annotations

import io
import logging
import os
import random
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from instaprune.core.errors import CheckpointError, ConfigError, PlanMismatchError
from instaprune.core.io import atomic_write
from instaprune.method.plan import Plan
from instaprune.method.points import PointReport, find_prune_points
from instaprune.training.checkpoint import FORMAT, VERSION, load_weights, save_safetensors

__all__ = [
    "FAULT_EXIT_CODE",
    "Faults",
    "faults_from_env",
    "capture_rng",
    "restore_rng",
    "write_training_checkpoint",
    "read_training_checkpoint",
    "remove_partial_writes",
    "StopOnSignal",
    "Portable",
    "save_portable",
    "load_portable",
    "plan_points",
]

log = logging.getLogger(__name__)

FAULT_EXIT_CODE = 75


@dataclass(frozen=True)
class Faults:
    step: int | None = None
    in_checkpoint: int | None = None
    rank: int = 0
    delay: float = 0.0


def _env_num(name: str, kind: type) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError as e:
        raise ConfigError(f"environment variable {name} must be a number, got {raw!r}") from e


def faults_from_env() -> Faults:
    """The fault-injection settings of the environment (all off by default)."""
    return Faults(step=_env_num("INSTAPRUNE_FAULT_STEP", int),
                  in_checkpoint=_env_num("INSTAPRUNE_FAULT_IN_CHECKPOINT", int),
                  rank=_env_num("INSTAPRUNE_FAULT_RANK", int) or 0,
                  delay=_env_num("INSTAPRUNE_FAULT_DELAY", float) or 0.0)


# ---------------------------------------------------------------- RNG states (weights_only-safe containers)

def capture_rng() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), Python and NumPy RNG states as tensors and plain lists."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "python": [version, list(state), gauss],
        "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (missing parts are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "python" in state:
        version, st, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in st), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))


# ---------------------------------------------------------------- training checkpoints

def write_training_checkpoint(path: str | os.PathLike, state: Mapping[str, Any],
                              die_midway: bool = False) -> Path:
    """Atomically write a training checkpoint (``state`` gets ``format``/``version`` added).

    ``die_midway`` (fault injection) writes half of the serialised bytes to the temp file, fsyncs and exits
    the process with :data:`FAULT_EXIT_CODE`, leaving the previous ``path`` untouched."""
    obj = {"format": FORMAT, "version": VERSION, **state}

    def writer(f) -> None:
        if not die_midway:
            torch.save(obj, f)
            return
        buf = io.BytesIO()
        torch.save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        log.error("fault injection: dying in the middle of writing %s", path)
        os._exit(FAULT_EXIT_CODE)

    return atomic_write(path, writer)


def read_training_checkpoint(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """Load the model weights of a training checkpoint into ``model`` and return the whole checkpoint dict.

    Raises :class:`CheckpointError` (one line) for a missing, truncated or corrupt file, weights of another
    model, or a checkpoint that is not resumable."""
    p = Path(path)
    load_weights(model, p)  # validates file, format and every key/shape, with precise messages
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # changed between the two reads, or unreadable parts
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {msg}") from e
    if not isinstance(obj, dict) or "optimizer" not in obj or "epoch" not in obj:
        raise CheckpointError(f"{p} is not a resumable training checkpoint (no optimizer state)")
    bad = [k for k in ("epoch", "step", "global_step")
           if not isinstance(obj.get(k, 0), int) or obj.get(k, 0) < 0]
    if bad or not isinstance(obj["optimizer"], dict):
        what = ", ".join(bad) or "optimizer"
        raise CheckpointError(f"{p} is a damaged training checkpoint (invalid {what})")
    return obj


def remove_partial_writes(path: str | os.PathLike) -> list[Path]:
    """Delete temp files left next to ``path`` by interrupted atomic writes; returns what was removed."""
    p = Path(path)
    removed = []
    for tmp in p.parent.glob(f".{p.name}.*.tmp"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    if removed:
        log.warning("removed %d partial checkpoint write(s) left by an interrupted run: %s", len(removed),
                    ", ".join(t.name for t in removed))
    return removed


class StopOnSignal:
    """SIGINT/SIGTERM -> a flag (``signum``) that the training loop honours at its next optimizer step by
    writing a checkpoint and calling :meth:`exit`; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the next step, then stopping",
                    signal.Signals(signum).name)

    @contextmanager
    def installed(self, active: bool = True) -> Iterator[None]:
        """Install the handlers for the ``with`` block (only in the main thread; restored afterwards)."""
        if not active or threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def exit(self) -> None:
        """KeyboardInterrupt for SIGINT (the CLI exits 130), SystemExit(128 + signum) otherwise."""
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(self.signum or signal.SIGTERM))


# ---------------------------------------------------------------- portable weights + plan

@dataclass
class Portable:
    meta: dict[str, Any]
    plan: Plan | None
    points: PointReport | None


def plan_points(model: nn.Module, plan: Plan, input_size: int | None = None) -> PointReport:
    """Discover ``model``'s prune points restricted to the plan's point names (for :meth:`Plan.check`)."""
    size = input_size or plan.preprocessing.input_size
    x = torch.zeros(1, len(plan.preprocessing.mean), size, size)
    names = [p[0] for p in plan.points]
    return find_prune_points(model, x, include=[_escape(n) for n in names], shortcuts=True)


def _escape(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def save_portable(out_dir: str | os.PathLike, model: nn.Module, plan: Plan | None = None,
                  meta: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``model.safetensors`` (meta + the plan's model name and fingerprint in its header) and, with a
    plan, ``plan.json`` into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    m = dict(meta or {})
    if plan is not None:
        m.setdefault("model_name", plan.model_name)
        m["plan_fingerprint"] = plan.fingerprint
    paths = {"weights": save_safetensors(out / "model.safetensors", model, m)}
    if plan is not None:
        paths["plan"] = plan.save(out / "plan.json")
    return paths


def load_portable(model: nn.Module, weights: str | os.PathLike, plan: str | os.PathLike | Plan | None = None,
                  input_size: int | None = None) -> Portable:
    """Load ``weights`` (safetensors or any checkpoint) into ``model`` and validate ``plan`` against it.

    Weights that do not fit raise :class:`CheckpointError` naming the missing, unexpected and mis-shaped keys;
    a plan for another model raises :class:`PlanMismatchError` naming the points that differ; weights and plan
    recorded for different models (header fingerprint) raise :class:`PlanMismatchError` too."""
    meta = load_weights(model, weights)
    if plan is None:
        return Portable(meta, None, None)
    pl = plan if isinstance(plan, Plan) else Plan.load(plan)
    points = plan_points(model, pl, input_size)
    pl.check(points, meta.get("model_name"))
    recorded = meta.get("plan_fingerprint")
    if recorded is not None and recorded != pl.fingerprint:
        raise PlanMismatchError(f"weights {weights} were saved with a plan for other prune points "
                                f"(fingerprint {recorded}) than this plan's ({pl.fingerprint}, model "
                                f"{pl.model_name!r}): use the plan saved with the weights")
    return Portable(meta, pl, points)
