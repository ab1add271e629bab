"""The ``instaprune`` command line (also ``python -m instaprune``).

Every subcommand accepts ``--config FILE.yaml`` whose keys are the long option names (dashes or underscores);
explicit flags override the file, and the resolved configuration is saved as ``config.yaml`` in the output
directory. Bad input prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from instaprune import __version__
from instaprune.core.errors import ConfigError, InstapruneError

__all__ = ["main", "build_parser"]

log = logging.getLogger("instaprune")


def _common_model(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--model", required=True, help="model name: resnet20/32/44/56/110, vgg16_bn_cifar, tiny_resnet, "
                   "or any torchvision classification model (random init)")
    p.add_argument("--checkpoint", help="weights: public CIFAR ResNet .th, a plain state dict, an instaprune "
                   "checkpoint (.pt) or .safetensors; always loaded with weights_only=True")
    p.add_argument("--num-classes", type=int, help="number of classes (default: from the checkpoint, else 10 for "
                   "CIFAR models and 1000 for torchvision models)")
    if data:
        p.add_argument("--data-path", required=True, help="ImageFolder directory (<class>/<image>) or a CIFAR "
                       "python-batches directory (cifar-10-batches-py); local only")
        p.add_argument("--holdout", type=int, default=0, help="size N of a stratified held-out split of "
                       "--data-path: train/evaluate use the rest, analyze/calibrate use the N held-out images "
                       "(so nothing is chosen on the images it is evaluated on); 0 = use everything")
        p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--output-dir", default=None, help="directory for results (created; outputs written "
                   "atomically)")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="batch size (per process)")


def _points_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", action="append", help="fnmatch pattern of prune points to include (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="fnmatch pattern of points to exclude")
    p.add_argument("--shortcuts", action="store_true", help="also prune at downsampling shortcut convs")


def _calib_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=float, default=0.5, help="mean FLOPs reduction to reach, in (0, 1)")
    p.add_argument("--search", choices=("greedy", "shared"), default="greedy",
                   help="greedy per-point thresholds (default; never worse than shared on the calibration "
                   "split) or one shared tau found by bisection")
    p.add_argument("--mode", choices=("max", "mean", "one"), default="max",
                   help="threshold reference: s > tau*max_c(s), s > tau*mean_c(s) or s > tau (absolute)")
    p.add_argument("--min-keep", type=float, default=0.05, help="fraction of channels always kept per point")
    p.add_argument("--select", default="all", help="prune points: 'all', 'kappa:<CV threshold>', 'topk:<k>' or "
                   "'plan:<plan.json>' (the points that plan selected)")
    p.add_argument("--search-images", type=int, default=1024, help="images per greedy search step")
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed |achieved - target| on calibration")
    p.add_argument("--bn-recal", action="store_true", help="after the search, re-estimate BatchNorm running "
                   "statistics on the calibration images with the masks applied, then re-hit the target (changes "
                   "the weights: calibrate saves them as model.pt beside plan.json)")


def _gate_opts(p: argparse.ArgumentParser) -> None:
    from instaprune.method.gates import GATE_MULTIPLIERS, GATE_PREDICTORS, GATE_SELECTIONS, GateConfig
    from instaprune.pipeline.gated import GateSchedule

    g, s = GateConfig(), GateSchedule()
    grp = p.add_argument_group("predicted gates (--gates; docs/method.md section 9)")
    grp.add_argument("--gates", action="store_true", help="train predicted gates instead of the post-hoc rule: "
                     "each image's channels are chosen from the block's input before they are computed, and the "
                     "network trains under its masks (--target sets the FLOPs reduction)")
    grp.add_argument("--gate-selection", choices=GATE_SELECTIONS, default=g.selection,
                     help="topk: the same budget for every image; threshold: per-image budgets (default: %(default)s)")
    grp.add_argument("--gate-multiplier", choices=GATE_MULTIPLIERS, default=g.multiplier,
                     help="kept channels x1 (hard), x1 with a straight-through gradient (ste) or x g (value) "
                     "(default: %(default)s)")
    grp.add_argument("--gate-predictor", choices=GATE_PREDICTORS, default=g.predictor,
                     help="pool + linear, or a two-layer bottleneck (default: %(default)s)")
    grp.add_argument("--gate-fit", type=float, default=g.fit, help="weight of the predictors' fit to the saliency "
                     "while training (default: %(default)s)")
    grp.add_argument("--gate-decay", type=float, default=g.decay, help="feature-decay lambda on the gated "
                     "features (default: %(default)s)")
    grp.add_argument("--gate-ramp", type=float, default=s.ramp, help="fraction of training over which the kept "
                     "fraction ramps from 1.0 to its budget (default: %(default)s)")
    grp.add_argument("--gate-warmup-batches", type=int, default=s.warmup_batches, help="batches of predictor "
                     "fitting with the network frozen before training (default: %(default)s)")
    grp.add_argument("--static-target", type=float, default=s.static_target, help="slim statically (L1 filter "
                     "pruning) to this FLOPs reduction first, then gate the rest (default: %(default)s = off)")
    grp.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the dense starting "
                     "model, in [0, 1] (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instaprune", description="Instance-wise dynamic channel pruning: "
                                     "feature decay, CV layer selection, calibrated per-image thresholds.")
    parser.add_argument("--version", action="version", version=f"instaprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("points", help="list the prune points of a model")
    _common_model(p, data=False)
    _points_opts(p)
    p.add_argument("--input-size", type=int, help="input resolution (default: the model's)")

    p = sub.add_parser("train", help="train or fine-tune with feature decay (and an optional prune-aware phase)")
    _common_model(p)
    _points_opts(p)
    p.add_argument("--epochs", type=int, default=10, help="epochs")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine schedule)")
    p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=5e-4, help="weight decay")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Nesterov)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up epochs")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing")
    p.add_argument("--augment", choices=("cifar", "flip", "none"), default="cifar",
                   help="cifar: random crop (pad 4) + flip; flip: flip only")
    p.add_argument("--lam", type=float, default=0.0, help="feature-decay strength lambda (>= 0; 0 = plain "
                   "training)")
    p.add_argument("--penalty", choices=("l21", "l1l2", "l1max"), default="l1l2",
                   help="l21: paper's l2,1; l1l2 and l1max: scale-invariant variants (default l1l2: the "
                   "CIFAR-10 study's choice, RESULTS.md)")
    p.add_argument("--weights", choices=("uniform", "flops"), default="uniform",
                   help="per-point weights: 1/C or share of MACs per channel")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", help="resume from a checkpoint.pt written by a previous run ('auto': "
                   "<output-dir>/checkpoint.pt if it exists; torchrun elastic restarts do this by themselves)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N optimizer steps "
                   "(atomically; a crash loses at most N steps; 0 = at epoch ends only)")
    p.add_argument("--freeze-bn", action="store_true", help="keep BatchNorm in eval mode while training "
                   "(frozen running statistics)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes under torchrun "
                   "(CUDA/nccl only)")
    p.add_argument("--prune-aware-epochs", type=int, default=0, help="extra epochs with calibrated masks "
                   "applied in the forward pass (needs --target and --holdout for calibration)")
    p.add_argument("--prune-aware-lr", type=float, default=None, help="learning rate of the "
                   "prune-aware phase (default: --lr / 10)")
    p.add_argument("--prune-aware-lam", type=float, default=0.0, help="lambda during the prune-aware phase")
    p.add_argument("--prune-aware-control", choices=("on", "off"), default="on", help="on: hold the training "
                   "batches' FLOPs reduction at --target by adjusting the global threshold scale after every step, "
                   "ramping the target up from 0 (default); off: the calibrated thresholds stay fixed")
    p.add_argument("--prune-aware-ramp", type=float, default=0.3, help="fraction of the prune-aware phase over "
                   "which the controlled target ramps linearly from 0 to --target")
    _calib_opts(p)
    _gate_opts(p)

    p = sub.add_parser("analyze", help="saliency statistics and coefficient of variation per prune point")
    _common_model(p)
    _points_opts(p)
    p.add_argument("--max-images", type=int, default=0, help="use at most this many images (0 = all)")

    p = sub.add_parser("calibrate", help="select points by CV and calibrate thresholds to a FLOPs target")
    _common_model(p)
    _points_opts(p)
    _calib_opts(p)

    p = sub.add_parser("evaluate", help="evaluate the dense model and, with --plan, the dynamic model")
    _common_model(p)
    _points_opts(p)
    p.add_argument("--plan", help="plan.json from 'instaprune calibrate'")
    p.add_argument("--scale", type=float, help="override the plan's global threshold scale")
    p.add_argument("--baseline-top1", type=float, help="accuracy of the model before feature decay")
    p.add_argument("--baseline-checkpoint", help="checkpoint of the model before feature decay (evaluated)")

    p = sub.add_parser("export", help="export the dynamic model (a plan's per-image masks) with torch.export "
                       "and to ONNX, plus portable weights (safetensors) and the plan")
    _common_model(p, data=False)
    p.add_argument("--plan", help="plan.json from 'instaprune calibrate' (checked against the model; without "
                   "it the dense model is exported)")
    p.add_argument("--scale", type=float, help="override the plan's global threshold scale (baked in)")
    p.add_argument("--format", choices=("all", "pt2", "onnx"), default="all", help="torch.export program "
                   "(model.pt2), ONNX (model.onnx) or both")
    p.add_argument("--input-size", type=int, help="input resolution (default: the plan's, else the model's)")
    p.add_argument("--return-active", action="store_true", help="second output: kept channels per image and "
                   "selected point")
    p.add_argument("--no-verify", action="store_true", help="skip running the exported files against PyTorch")

    p = sub.add_parser("benchmark", help="latency of the fast dynamic engine against the fastest dense model "
                       "(BN-folded or not, NCHW or channels_last), on real images or random inputs")
    _common_model(p, data=False)
    _points_opts(p)
    p.add_argument("--plan", help="plan.json from 'instaprune calibrate' (without it: the BN-folded dense engine)")
    p.add_argument("--scale", type=float, help="override the plan's global threshold scale")
    p.add_argument("--data-path", help="images to time (ImageFolder or CIFAR batches); default: random inputs")
    p.add_argument("--input-size", type=int, help="input resolution (default: the plan's, else the model's)")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--threads", default="1", help="comma-separated thread counts")
    p.add_argument("--pairs", type=int, default=7, help="dense/dynamic alternations per batched row (>= 1)")
    p.add_argument("--max-images", type=int, default=200, help="images timed one by one at batch 1")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="auto: CPU time at 1 thread (robust to other processes), wall time above")

    p = sub.add_parser("demo", help="the whole pipeline on a generated dataset, no files needed")
    p.add_argument("--output-dir", default="instaprune-demo", help="run directory")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--target", type=float, default=None, help="FLOPs reduction target (default: recipe's)")
    return parser


def _apply_yaml(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse with ``--config FILE`` values as defaults under the explicit flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    if known.config:
        import yaml

        path = Path(known.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse config {path}: {str(e).splitlines()[0]}") from e
        if not isinstance(cfg, dict):
            raise ConfigError(f"config {path} must be a mapping of option names to values")
        subs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
        command = next((a for a in rest if a in subs), None)
        if command is None:
            raise ConfigError(f"give the command ({', '.join(subs)}) with --config")
        sub = subs[command]
        actions = {a.dest: a for a in sub._actions}
        norm = {str(k).replace("-", "_"): v for k, v in cfg.items() if k != "command"}
        unknown = sorted(set(norm) - set(actions))
        if unknown:
            raise ConfigError(f"unknown option(s) in {path} for '{command}': {', '.join(unknown)}")
        for dest in norm:
            actions[dest].required = False  # supplied by the file; a flag still overrides it
        sub.set_defaults(**norm)
    args = parser.parse_args(rest)
    args.config = known.config
    return args


def save_resolved(args: argparse.Namespace, out_dir: str | Path) -> None:
    import yaml

    from instaprune.core.io import atomic_write_text

    d = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    atomic_write_text(Path(out_dir) / "config.yaml", yaml.safe_dump(d, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = _apply_yaml(parser, argv)
    except InstapruneError as e:
        print(f"instaprune: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from instaprune.cli import commands

    try:
        return int(getattr(commands, f"cmd_{args.command}")(args) or 0)
    except InstapruneError as e:
        print(f"instaprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("instaprune: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("instaprune: error: out of memory (try a smaller -b or --max-images)", file=sys.stderr)
        return 2

