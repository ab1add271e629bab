"""Graph rewriting for the fast engine: fold BatchNorm into convs, fuse ReLU/ReLU6, swap in dynamic layers.

Primary path: ``torch.fx.symbolic_trace``. A ``Conv2d`` node whose output has exactly one user, an eval-mode
``BatchNorm2d`` with running statistics and matching width, gets the BN folded (``kernels.fold_bn``); a ReLU
/ ReLU6 (module, ``F.relu``, ``torch.relu``, ``.relu()``, ``F.relu6``) that is the only user of the result is
fused too. Nodes, not modules, are rewritten, so a ReLU module shared by several call sites (torchvision's
ResNet blocks) is handled per call. A conv module called more than once is left unfolded. Eval-mode dropout
nodes are removed; ``nn.MaxPool2d`` becomes :class:`FastMaxPool2d`.

Fallback (a model fx cannot trace): module replacement. One forward with hooks records, for every module,
the id of its input and output tensors; a BN whose input is exactly a conv's output, each called once, is
folded into that conv and replaced by ``nn.Identity``; activations are not fused. The caller compares the
rewritten model with the original on an example input (``check_equal``) and refuses a mismatch.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from instaprune.core.errors import ModelError

__all__ = ["rewrite", "check_equal", "FastMaxPool2d"]

log = logging.getLogger(__name__)

#: builds the replacement of one conv/linear: (name, module, bn or None, activation or None) -> module or None
Builder = Callable[[str, nn.Module, "nn.BatchNorm2d | None", "str | None"], "nn.Module | None"]

_RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}
_DROPOUT = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)


class FastMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` that pools an NCHW input through channels_last and back: PyTorch's NCHW CPU max pool
    is slow (ResNet's 3x3/2 pool of 64x112x112: 6-7 ms NCHW, 1.5 ms with both conversions, 0.35 ms on a
    channels_last input; measured, 1 thread). Exact (a max); used by the folded dense baseline too."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.is_contiguous() and not self.pool.return_indices:
            return self.pool(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return self.pool(x)


def _foldable_bn(m: nn.Module, conv: nn.Conv2d) -> bool:
    return (isinstance(m, nn.BatchNorm2d) and not m.training and m.track_running_stats
            and m.running_mean is not None and m.num_features == conv.out_channels)


def _activation(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU:
            return "relu"
        if type(m) is nn.ReLU6:
            return "relu6"
        if type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0:
            return "relu6"
    elif node.op == "call_function" and node.target in _RELU_FUNCS and len(node.args) == 1:
        return _RELU_FUNCS[node.target]
    elif node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu"
    return None


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _rewrite_fx(gm: fx.GraphModule, build: Builder) -> None:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, _DROPOUT) and not m.training:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        if type(m) is nn.MaxPool2d:
            _set_module(gm, node.target, FastMaxPool2d(m))
            continue
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or calls[node.target] != 1:
            continue
        tail, bn, act = node, None, None
        if isinstance(m, nn.Conv2d) and len(node.users) == 1:
            (user,) = node.users
            if user.op == "call_module" and _foldable_bn(modules[user.target], m) and len(user.args) == 1:
                bn, tail = modules[user.target], user
        if isinstance(m, nn.Conv2d) and len(tail.users) == 1:
            (user,) = tail.users
            act = _activation(user, modules)
            if act is not None:
                tail = user
        new = build(node.target, m, bn, act)
        if new is None:
            continue
        _set_module(gm, node.target, new)
        if tail is not node:
            tail.replace_all_uses_with(node)
            while tail is not node:  # erase act, then bn (each now unused)
                prev = tail.args[0]
                gm.graph.erase_node(tail)
                tail = prev
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _rewrite_modules(model: nn.Module, example: torch.Tensor, build: Builder) -> nn.Module:
    modules = dict(model.named_modules())
    seen: dict[str, list[tuple[int, int]]] = {}
    keep: list[torch.Tensor] = []

    def hook(name: str):
        def fn(m: nn.Module, args: tuple, out: object) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen.setdefault(name, []).append((id(args[0]), id(out)))
                keep.extend((args[0], out))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items() if n and not list(m.children())]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    by_input = {v[0][0]: n for n, v in seen.items() if len(v) == 1 and isinstance(modules[n], nn.BatchNorm2d)}
    for name, m in modules.items():
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or len(seen.get(name, ())) != 1:
            continue
        bn_name = by_input.get(seen[name][0][1]) if isinstance(m, nn.Conv2d) else None
        bn = modules[bn_name] if bn_name and _foldable_bn(modules[bn_name], m) else None
        new = build(name, m, bn, None)
        if new is None:
            continue
        _set_module(model, name, new)
        if bn is not None:
            _set_module(model, bn_name, nn.Identity())
    return model


def rewrite(model: nn.Module, example: torch.Tensor, build: Builder) -> tuple[nn.Module, str]:
    """A rewritten copy of ``model`` (eval) and the method used (``fx`` or ``modules``)."""
    model = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # any tracing failure: fall back to module replacement
        log.info("torch.fx cannot trace the model (%s: %s); using module replacement",
                 type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return _rewrite_modules(model, example, build), "modules"
    _rewrite_fx(gm, build)
    return gm, "fx"


def check_equal(reference: torch.Tensor, out: torch.Tensor, what: str) -> None:
    """Raise ModelError unless ``out`` equals ``reference`` to float32 tolerance (1e-4 x max |reference|)."""
    if not isinstance(out, torch.Tensor) or out.shape != reference.shape:
        raise ModelError(f"{what}: the rewritten model's output differs in shape or type from the original's")
    err = float((out - reference).abs().max()) if out.numel() else 0.0
    tol = 1e-4 * float(reference.abs().max()) + 1e-6 if reference.numel() else 0.0
    if not err <= tol:
        raise ModelError(f"{what}: the rewritten model differs from the original by {err:.3g} (> {tol:.3g})")

