"""The command line's options, generated from the library's config dataclasses.

Every option that sets a config field is declared with ``bind=(Class, "field")``: its default, type and (where the
library has a tuple of choices) its choices come from the library, so a default is written once. The bindings are
kept on the argparse actions (``action.config_field``) for the test that checks every CLI default against its
dataclass. Help shows every default.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from instaprune.core.config import field_default

__all__ = ["InstapruneParser", "DefaultsFormatter", "add", "finite_float", "fn_default", "common_model",
           "points_opts", "calib_opts", "train_opts", "gate_opts", "global_opts"]


class InstapruneParser(argparse.ArgumentParser):
    """argparse with the project's error rule: one line on stderr, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        sys.stderr.write(f"instaprune: error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose default is not empty."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        d = action.default
        empty = d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (list, tuple)) and not d)
        if "%(default)" in h or not action.option_strings or empty:
            return h
        return h + " (default: %(default)s)"


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _scalar_type(cls: type, name: str) -> Any:
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def fn_default(fn: Callable[..., Any], name: str) -> Any:
    """Default of parameter ``name`` of ``fn`` (for options that map to a function argument)."""
    return inspect.signature(fn).parameters[name].default


def add(group: Any, *flags: str, bind: tuple[type, str] | None = None,
        to_cli: Callable[[Any], Any] | None = None, **kw: Any) -> argparse.Action:
    """``group.add_argument`` with the default (and type) of the bound dataclass field."""
    if bind is not None:
        cls, name = bind
        default = field_default(cls, name)
        kw.setdefault("default", to_cli(default) if to_cli is not None else default)
        tp = _scalar_type(cls, name)
        if tp is bool and "action" not in kw and "choices" not in kw:
            kw["action"] = "store_true"
        elif "action" not in kw and "type" not in kw and "choices" not in kw:
            kw["type"] = {float: finite_float, int: _int}.get(tp, tp)
    elif "type" in kw and kw["type"] is float:
        kw["type"] = finite_float
    elif "type" in kw and kw["type"] is int:
        kw["type"] = _int
    act = group.add_argument(*flags, **kw)
    act.config_field = (bind, to_cli) if bind is not None else None  # type: ignore[attr-defined]
    return act


def global_opts(p: argparse.ArgumentParser, top: bool) -> None:
    """``-v`` and ``--config``, accepted before and after the command."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO level)", **d)
    p.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file (keys: the long option names, "
                   "dashes or underscores; explicit flags win); the resolved options are saved as config.yaml in "
                   "--output-dir", **d)


def common_model(p: argparse.ArgumentParser, data: bool = True, batch_default: int | None = None) -> None:
    from instaprune.training.loop import TrainConfig

    g = p.add_argument_group("model and data")
    add(g, "--model", required=True, help="model name: resnet20/32/44/56/110, vgg16_bn_cifar, tiny_resnet, or any "
        "torchvision classification model (random init)")
    add(g, "--checkpoint", help="weights: public CIFAR ResNet .th, a plain state dict, an instaprune checkpoint "
        "(.pt) or .safetensors; always loaded with weights_only=True and checked (shapes, dtypes, finite values)")
    add(g, "--num-classes", type=int, help="number of classes (default: from the checkpoint, else 10 for CIFAR "
        "models and 1000 for torchvision models)")
    if data:
        add(g, "--data-path", required=True, help="ImageFolder directory (<class>/<image>) or a CIFAR "
            "python-batches directory (cifar-10-batches-py/train or /test); local only")
        add(g, "--holdout", type=int, default=0, help="size N of a stratified held-out split of --data-path: "
            "train/evaluate use the rest, analyze/calibrate use the N held-out images (nothing is chosen on the "
            "images it is evaluated on); 0 = use everything")
        add(g, "--split-seed", type=int, default=0, help="seed of the held-out split")
    add(g, "--output-dir", default=None, help="directory for results (checked before any work; created; outputs "
        "written atomically)")
    if batch_default is None:
        add(g, "-b", "--batch-size", bind=(TrainConfig, "batch_size"), help="batch size (per process)")
    else:
        add(g, "-b", "--batch-size", type=int, default=batch_default, help="batch size")


def points_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prune points")
    add(g, "--include", action="append", help="fnmatch pattern of prune points to include (repeatable)")
    add(g, "--exclude", action="append", default=[], help="fnmatch pattern of points to exclude (repeatable)")
    add(g, "--shortcuts", action="store_true", help="also prune at downsampling shortcut convs")


def calib_opts(p: argparse.ArgumentParser) -> None:
    from instaprune.method.calibration import SEARCHES, CalibrationConfig
    from instaprune.method.thresholds import THRESHOLD_MODES, ThresholdConfig

    g = p.add_argument_group("calibration (thresholds to a FLOPs target, on the held-out split)")
    add(g, "--target", bind=(CalibrationConfig, "target"), help="mean FLOPs reduction to reach, in (0, 1)")
    add(g, "--search", bind=(CalibrationConfig, "search"), choices=SEARCHES,
        help="shared: one tau for every point, found by bisection (won 4/4 against greedy on the study's holdouts "
        "at ~1/20 of the evaluations); greedy: per-point thresholds, kept only if they beat shared")
    add(g, "--mode", bind=(ThresholdConfig, "mode"), choices=THRESHOLD_MODES,
        help="threshold reference: s > tau*max_c(s), s > tau*mean_c(s) or s > tau (absolute)")
    add(g, "--min-keep", bind=(ThresholdConfig, "min_keep"), help="fraction of channels always kept per point")
    add(g, "--select", default="all", help="prune points: 'all', 'kappa:<CV threshold>', 'topk:<k>' or "
        "'plan:<plan.json>' (the points that plan selected)")
    add(g, "--search-images", bind=(CalibrationConfig, "search_images"), help="images per greedy search step")
    add(g, "--tolerance", bind=(CalibrationConfig, "tolerance"), help="allowed |achieved - target| on calibration")
    add(g, "--bn-recal", bind=(CalibrationConfig, "bn_recalibration"), help="after the search, re-estimate "
        "BatchNorm running statistics on the calibration images with the masks applied, then re-hit the target "
        "(changes the weights: calibrate saves them as model.pt beside plan.json)")


def gated_calib_opts(p: argparse.ArgumentParser) -> None:
    from instaprune.pipeline.gated import GateSchedule

    g = p.add_argument_group("gated checkpoints (from train --gates)")
    add(g, "--gate-slim-off", bind=(GateSchedule, "slim_off"), help="remove the channels the gates keep for fewer "
        "than this fraction of the calibration images (saves the slim weights as model.pt and model.safetensors "
        "beside plan.json; top-k keeps its k per image; 0 = off)")


def train_opts(p: argparse.ArgumentParser) -> None:
    from instaprune.method.regularizer import PENALTIES, WEIGHTINGS, FeatureDecayConfig
    from instaprune.pipeline.posthoc import PosthocSchedule
    from instaprune.training.loop import AUGMENTS, TrainConfig

    g = p.add_argument_group("training (SGD, cosine schedule)")
    add(g, "--epochs", bind=(TrainConfig, "epochs"), help="epochs of the (decay) fine-tune (>= 1; 0 only with "
        "--prune-aware-epochs)")
    add(g, "--lr", bind=(TrainConfig, "lr"), help="peak learning rate (cosine schedule); fine-tuning a trained "
        "model usually wants less, e.g. 0.01")
    add(g, "--wd", "--weight-decay", dest="weight_decay", bind=(TrainConfig, "weight_decay"), help="weight decay")
    add(g, "--momentum", bind=(TrainConfig, "momentum"), help="SGD momentum (Nesterov)")
    add(g, "--warmup-epochs", bind=(TrainConfig, "warmup_epochs"), help="linear warm-up epochs")
    add(g, "--label-smoothing", bind=(TrainConfig, "label_smoothing"), help="label smoothing")
    add(g, "--augment", bind=(TrainConfig, "augment"), choices=(*AUGMENTS, "none"),
        to_cli=lambda v: "none" if v is None else v, help="cifar: random crop (pad 4) + flip; flip: flip only")
    add(g, "--amp", bind=(TrainConfig, "amp"), help="bf16 autocast")
    add(g, "--accumulate", bind=(TrainConfig, "accumulate"), help="gradient accumulation steps")
    add(g, "--seed", bind=(TrainConfig, "seed"), help="random seed")
    add(g, "--resume", help="resume from a checkpoint.pt written by a previous run ('auto': <output-dir>/"
        "checkpoint.pt if it exists; torchrun elastic restarts do this by themselves)")
    add(g, "--checkpoint-every", bind=(TrainConfig, "checkpoint_every"), help="also checkpoint every N optimizer "
        "steps (atomically; a crash loses at most N steps; 0 = at epoch ends only)")
    add(g, "--freeze-bn", bind=(TrainConfig, "freeze_bn"), help="keep BatchNorm in eval mode while training "
        "(frozen running statistics)")
    add(g, "--sync-bn", bind=(TrainConfig, "sync_bn"), help="SyncBatchNorm across processes under torchrun "
        "(CUDA/nccl only)")
    g = p.add_argument_group("feature decay")
    add(g, "--lam", bind=(FeatureDecayConfig, "lam"), help="feature-decay strength lambda (>= 0; 0 = plain "
        "training)")
    add(g, "--penalty", bind=(FeatureDecayConfig, "penalty"), choices=PENALTIES,
        help="l21: paper's l2,1; l1l2 and l1max: scale-invariant variants (l1l2: the CIFAR-10 study's choice)")
    add(g, "--weights", bind=(FeatureDecayConfig, "weights"), choices=WEIGHTINGS,
        help="per-point weights: 1/C or share of MACs per channel")
    g = p.add_argument_group("prune-aware phase (masks on, then recalibration; needs --holdout)")
    add(g, "--prune-aware-epochs", bind=(PosthocSchedule, "prune_aware_epochs"), help="extra epochs with "
        "calibrated masks applied in the forward pass (needs --target and --holdout for calibration)")
    add(g, "--prune-aware-lr", bind=(PosthocSchedule, "prune_aware_lr"), help="learning rate of the prune-aware "
        "phase (default: --lr / 10)")
    add(g, "--prune-aware-lam", bind=(PosthocSchedule, "prune_aware_lam"), help="lambda during the prune-aware "
        "phase")
    add(g, "--prune-aware-control", bind=(PosthocSchedule, "prune_aware_control"), choices=("on", "off"),
        to_cli=lambda v: "on" if v else "off", help="on: hold the training batches' FLOPs reduction at --target by "
        "adjusting the global threshold scale after every step, ramping the target up from 0; off: the calibrated "
        "thresholds stay fixed")
    add(g, "--prune-aware-ramp", bind=(PosthocSchedule, "prune_aware_ramp"), help="fraction of the prune-aware "
        "phase over which the controlled target ramps linearly from 0 to --target")


def gate_opts(p: argparse.ArgumentParser) -> None:
    from instaprune.method.gates import GATE_MULTIPLIERS, GATE_PREDICTORS, GATE_SELECTIONS, GateConfig
    from instaprune.pipeline.gated import STATIC_SHARE, GateSchedule
    from instaprune.training.loop import DISTILL_WITH_TEACHER, TrainConfig

    g = p.add_argument_group("predicted gates (--gates; docs/method.md section 9)")
    add(g, "--gates", action="store_true", help="train predicted gates instead of the post-hoc rule: each image's "
        "channels are chosen from the block's input before they are computed, and the network trains under its "
        "masks (--target sets the FLOPs reduction)")
    add(g, "--gate-selection", bind=(GateConfig, "selection"), choices=GATE_SELECTIONS,
        help="topk: the same budget for every image; threshold: per-image budgets")
    add(g, "--gate-multiplier", bind=(GateConfig, "multiplier"), choices=GATE_MULTIPLIERS,
        help="kept channels x1 (hard), x1 with a straight-through gradient (ste) or x g (value)")
    add(g, "--gate-predictor", bind=(GateConfig, "predictor"), choices=GATE_PREDICTORS,
        help="pool + linear, or a two-layer bottleneck")
    add(g, "--gate-fit", bind=(GateConfig, "fit"), help="weight of the predictors' fit to the saliency while "
        "training")
    add(g, "--gate-decay", bind=(GateConfig, "decay"), help="feature-decay lambda on the gated features")
    add(g, "--gate-ramp", bind=(GateSchedule, "ramp"), help="fraction of training over which the kept fraction "
        "ramps from 1.0 to its budget")
    add(g, "--gate-warmup-batches", bind=(GateSchedule, "warmup_batches"), help="batches of predictor fitting with "
        "the network frozen before training")
    add(g, "--gate-allocation", bind=(GateSchedule, "allocation"), choices=("uniform", "greedy"),
        help="per-gate budgets: uniform, or greedy on the held-out split (kept only if it beats uniform there)")
    add(g, "--static-target", bind=(GateSchedule, "static_target"), help="slim statically (L1 filter pruning) to "
        f"this FLOPs reduction first, then gate the rest (default: {STATIC_SHARE:g} x --target; 0 = gates only); "
        "alone, without --gates: the static baseline")
    add(g, "--gate-slim-off", bind=(GateSchedule, "slim_off"), help="after training, remove the channels kept for "
        "fewer than this fraction of the held-out images (a static part the gates found; needs --holdout; 0 = off)")
    add(g, "--distill", bind=(TrainConfig, "distill"), help="weight of distillation from the dense starting "
        f"model, in [0, 1] (default: {DISTILL_WITH_TEACHER} with --gates or --static-target, 0 = off; the post-hoc "
        "method has no teacher)")
