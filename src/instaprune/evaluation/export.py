"""Export the dynamic (per-instance masked) model with ``torch.export`` and to ONNX.

:class:`DynamicExport` is a stateless twin of :class:`~instaprune.masked.MaskedModel`: forward pre-hooks on
the plan's consumers compute each instance's mask inside the graph, so the exported program decides per input
which channels to drop. What becomes data-dependent graph ops (ONNX names):

- saliency ``s = sqrt(mean_hw(x^2))``: ``Pow`` + ``ReduceMean`` + ``Sqrt`` (``Abs`` for a Linear input);
- the per-instance reference ``max_c s`` / ``mean_c s``: ``ReduceMax`` / ``ReduceMean`` (none for ``one``);
- the threshold comparison ``s > tau * scale * ref``: ``Mul`` + ``Greater``;
- the ``min_keep`` floor (the k strongest channels always kept): ``TopK`` + ``ScatterElements``;
- applying the mask: ``Cast`` + ``Mul`` on the consumer's input.

What falls back to masking: the *skipping* itself. The consumer conv/linear still runs densely on an input
whose dropped channels are zero; a graph with per-instance channel gathers has data-dependent shapes that
neither ``torch.export`` (static shapes between ops) nor ONNX Runtime kernels turn into less work. So the
exported model reproduces the masked reference's outputs exactly, not the fast engine's speed. Taus and the
global scale are baked in as constants (re-export for another ``--scale``). The batch dimension is dynamic.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaprune.core.errors import ConfigError, ModelError
from instaprune.core.io import atomic_write_json
from instaprune.method.plan import Plan
from instaprune.method.thresholds import ThresholdConfig, keep_mask, saliency

__all__ = ["EXPORT_FORMATS", "DATA_DEPENDENT_OPS", "DynamicExport", "GatedExport", "ExportResult", "onnx_missing",
           "export_model", "run_onnx", "load_program"]

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("pt2", "onnx")
# ONNX ops the mask computation lowers to (ReduceSum: only for the ``active`` counts output)
DATA_DEPENDENT_OPS = ("Pow", "ReduceMean", "Sqrt", "Abs", "ReduceMax", "Greater", "TopK", "ScatterElements",
                      "Cast", "Mul", "ReduceSum")
_MAX_BATCH = 1 << 16


class DynamicExport(nn.Module):
    """``model`` with the plan's per-instance channel masks computed in the forward (no Python state).

    ``return_active``: the forward returns ``(logits, active)`` with ``active`` (N, P) int64 the number of
    channels each instance keeps at each of the plan's selected points (in plan order)."""

    def __init__(self, model: nn.Module, plan: Plan | None = None, return_active: bool = False) -> None:
        super().__init__()
        self.model = model
        self.return_active = return_active
        self.thresholds = plan.thresholds if plan is not None else ThresholdConfig()
        self.taus = {n: float(plan.taus[n]) * plan.scale for n in plan.selected} if plan is not None else {}
        self._active: list[torch.Tensor] | None = None
        modules = dict(model.named_modules())
        missing = [n for n in self.taus if n not in modules]
        if missing:
            raise ModelError(f"the plan's points are not modules of this model: {', '.join(missing[:5])}")
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.taus]

    @property
    def selected(self) -> list[str]:
        return list(self.taus)

    def _hook(self, name: str):
        tau = self.taus[name]

        def hook(m: nn.Module, args: tuple) -> tuple:
            x = args[0]
            keep = keep_mask(saliency(x.float()), tau, self.thresholds)
            if self._active is not None:
                self._active.append(keep.sum(dim=1))
            shape = keep.shape + (1,) * (x.dim() - 2)
            return (x * keep.view(shape).to(x.dtype),) + tuple(args[1:])

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        self._active = [] if self.return_active else None
        try:
            logits = self.model(x)
            if not self.return_active:
                return logits
            act = self._active or [torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)]
            return logits, torch.stack(act, dim=1)
        finally:
            self._active = None

    def remove(self) -> nn.Module:
        """Detach the hooks and return the plain model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.model


class GatedExport(nn.Module):
    """The reference gated model (:class:`~instaprune.method.gates.GatedModel`) of a plan with gates, in the
    export's calling convention: ``logits`` or ``(logits, active)``, ``active`` (N, G) int64 the kept channels of
    each gate (plan order). The predictors, top-k / threshold and masks are graph ops (``ReduceMean``, ``Gemm``,
    ``Relu``, ``TopK`` / ``Greater``, ``ScatterElements``, ``Mul``); the skipping itself falls back to masking,
    as for post-hoc points."""

    def __init__(self, model: nn.Module, plan: Plan, input_size: int, channels: int = 3,
                 return_active: bool = False) -> None:
        super().__init__()
        from instaprune.method.gates import find_gates, gated_from_plan

        gates = find_gates(model, torch.zeros(1, channels, input_size, input_size))
        self.gated = gated_from_plan(model, gates, plan.gates, plan.scale).eval()
        self.return_active = return_active
        self.thresholds = plan.thresholds

    @property
    def selected(self) -> list[str]:
        return self.gated.gates.names()

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits = self.gated(x)
        if not self.return_active:
            return logits
        return logits, torch.stack([self.gated.active[n] for n in self.selected], dim=1)

    def remove(self) -> nn.Module:
        return self.gated.remove()


@dataclass
class ExportResult:
    paths: dict[str, Path]
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # format -> vs eager PyTorch on test inputs
    onnx_ops: list[str] = field(default_factory=list)


def onnx_missing() -> str | None:
    """Why ONNX export/verification cannot run here (a pip hint), or None when it can."""
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return f"ONNX export needs the packages {', '.join(missing)} (pip install onnx onnxscript)"
    return None


def load_program(path: str | os.PathLike) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(str(path))
    except Exception as e:
        raise ConfigError(f"cannot load exported program {path}: {type(e).__name__}: {e}") from e


def run_onnx(path: str | os.PathLike, x: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported ONNX file with onnxruntime (CPU) on ``x``; returns every output as a tensor."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError("running ONNX needs onnxruntime (pip install onnxruntime)")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})
    return [torch.from_numpy(o) for o in outs]


def _max_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((u.float() - v.float()).abs().max()) if u.numel() else 0.0
               for u, v in zip(a, b, strict=True))


def _as_list(y: Any) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (tuple, list)) else [y]


def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    plan: Plan | None = None,
    input_size: int | None = None,
    channels: int = 3,
    formats: Sequence[str] = EXPORT_FORMATS,
    return_active: bool = False,
    verify_inputs: torch.Tensor | None = None,
    example_batch: int = 2,
) -> ExportResult:
    """Export ``model`` (with ``plan``'s dynamic masks; dense without a plan) to ``out_dir``.

    Writes ``model.pt2`` (``torch.export.save``) and/or ``model.onnx`` (``torch.onnx.export(dynamo=True)``),
    both with a dynamic batch dimension, plus ``export.json`` describing inputs, outputs and ONNX ops. With
    ``verify_inputs``, each exported artifact is run on them and compared with eager PyTorch
    (``max_abs_diff``). The caller checks that the plan matches the model (:meth:`Plan.check`)."""
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad or not formats:
        raise ConfigError(f"export formats must be among {', '.join(EXPORT_FORMATS)}, got {list(formats)}")
    if "onnx" in formats and (why := onnx_missing()):
        raise ConfigError(why)
    size = input_size or (plan.preprocessing.input_size if plan is not None else None)
    if not size:
        raise ConfigError("export needs an input size (give --input-size or a plan)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    wrapper: DynamicExport | GatedExport
    if plan is not None and plan.gates is not None:
        wrapper = GatedExport(model, plan, size, channels, return_active=return_active).eval()
    else:
        wrapper = DynamicExport(model, plan, return_active=return_active).eval()
    try:
        x = torch.randn(example_batch, channels, size, size)
        batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
        with torch.no_grad():
            ep = torch.export.export(wrapper, (x,), dynamic_shapes={"x": {0: batch}}, strict=False)
        res = ExportResult(paths={})
        outputs = ["logits"] + (["active"] if return_active else [])
        if "pt2" in formats:
            res.paths["pt2"] = out / "model.pt2"
            torch.export.save(ep, str(res.paths["pt2"]))
        if "onnx" in formats:
            res.paths["onnx"] = out / "model.onnx"
            prog = torch.onnx.export(ep, (x,), str(res.paths["onnx"]), dynamo=True, input_names=["input"],
                                     output_names=outputs, verbose=False)
            if prog is not None:
                res.onnx_ops = sorted({n.op_type for n in prog.model_proto.graph.node})
        if verify_inputs is not None:
            with torch.no_grad():
                ref = _as_list(wrapper(verify_inputs))
                if "pt2" in res.paths:
                    res.max_abs_diff["pt2"] = _max_diff(_as_list(load_program(res.paths["pt2"]).module()(
                        verify_inputs)), ref)
            if "onnx" in res.paths and importlib.util.find_spec("onnxruntime") is not None:
                res.max_abs_diff["onnx"] = _max_diff(run_onnx(res.paths["onnx"], verify_inputs), ref)
    finally:
        wrapper.remove()
        model.train(was_training)
    info = {
        "input": {"name": "input", "shape": ["batch", channels, size, size], "dtype": "float32",
                  "preprocessing": plan.preprocessing.to_dict() if plan is not None else None},
        "outputs": outputs, "dynamic": plan is not None,
        "selected_points": wrapper.selected, "method": "gates" if isinstance(wrapper, GatedExport) else (
            "post-hoc" if plan is not None else "dense"), "scale": plan.scale if plan is not None else None,
        "thresholds": {"mode": wrapper.thresholds.mode, "min_keep": wrapper.thresholds.min_keep},
        "files": {k: p.name for k, p in res.paths.items()}, "onnx_ops": res.onnx_ops,
        "data_dependent_ops": [op for op in DATA_DEPENDENT_OPS if op in res.onnx_ops],
        "falls_back_to_masking": "consumer convs/linears run densely on zeroed channels (nothing skipped)",
        "verification_max_abs_diff": res.max_abs_diff, "torch": torch.__version__,
    }
    res.paths["info"] = atomic_write_json(out / "export.json", json.loads(json.dumps(info)))
    log.info("exported %s to %s", ", ".join(formats), out)
    return res
