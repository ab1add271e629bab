"""The ``instaprune`` command line (also ``python -m instaprune``).

Every subcommand accepts ``--config FILE.yaml`` whose keys are the long option names (dashes or underscores);
explicit flags override the file, and the resolved configuration is saved as ``config.yaml`` in the output
directory. ``-v`` and ``--config`` work before or after the command. Bad input prints one line on stderr and
exits with code 2. Options are generated from the library's config dataclasses (:mod:`instaprune.cli.options`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instaprune import __version__
from instaprune.cli import commands
from instaprune.cli.options import (
    DefaultsFormatter,
    InstapruneParser,
    add,
    calib_opts,
    common_model,
    fn_default,
    gate_opts,
    gated_calib_opts,
    global_opts,
    points_opts,
    train_opts,
)
from instaprune.core.errors import ConfigError, InstapruneError

__all__ = ["main", "build_parser", "save_resolved"]

log = logging.getLogger("instaprune")
save_resolved = commands.save_resolved


def build_parser() -> argparse.ArgumentParser:
    from instaprune.demo.run import DEMO_METHODS, DEMO_TARGET, DemoSchedule, run_demo
    from instaprune.engine.bench import CLOCKS, benchmark_plan
    from instaprune.evaluation.export import EXPORT_FORMATS

    parser = InstapruneParser(prog="instaprune", formatter_class=DefaultsFormatter,
                              description="Instance-wise dynamic channel pruning: feature decay, CV layer "
                              "selection, calibrated per-image thresholds.")
    parser.add_argument("--version", action="version", version=f"instaprune {__version__}")
    global_opts(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=InstapruneParser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=DefaultsFormatter)
        global_opts(p, top=False)
        return p

    weights_help = ("use the plan with weights other than the ones it was calibrated on (its thresholds and FLOPs "
                    "reduction are then not what it says): a warning instead of an error")

    p = command("points", "list the prune points of a model (with --gates: its gateable tensors)")
    common_model(p, data=False)
    points_opts(p)
    g = p.add_argument_group("points")
    add(g, "--input-size", type=int, help="input resolution (default: the model's)")
    add(g, "--gates", action="store_true", help="list the tensors predicted gates can sit on (producer chain, "
        "channels, MACs they gate) and the reason for every other conv input")

    p = command("train", "train or fine-tune with feature decay (and an optional prune-aware phase)")
    common_model(p)
    points_opts(p)
    train_opts(p)
    calib_opts(p)
    gate_opts(p)

    p = command("analyze", "saliency statistics and coefficient of variation per prune point")
    common_model(p)
    points_opts(p)
    g = p.add_argument_group("sampling")
    add(g, "--max-images", type=int, default=0, help="a stratified, seeded sample of at most this many images "
        "(0 = all)")
    add(g, "--sample-seed", type=int, default=0, help="seed of the --max-images sample")

    p = command("calibrate", "select points by CV and calibrate thresholds to a FLOPs target")
    common_model(p)
    points_opts(p)
    calib_opts(p)
    gated_calib_opts(p)

    p = command("evaluate", "evaluate the dense model and, with --plan, the dynamic model")
    common_model(p)
    points_opts(p)
    g = p.add_argument_group("plan and baseline")
    add(g, "--plan", help="plan.json from 'instaprune calibrate' (or train)")
    add(g, "--scale", type=float, help="override the plan's global threshold scale")
    add(g, "--allow-other-weights", action="store_true", help=weights_help)
    add(g, "--baseline-top1", type=float, help="accuracy of the model before feature decay")
    add(g, "--baseline-checkpoint", help="checkpoint of the model before feature decay (evaluated)")

    p = command("export", "export the dynamic model (a plan's per-image masks) with torch.export and to ONNX, "
                "plus portable weights (safetensors) and the plan")
    common_model(p, data=False)
    g = p.add_argument_group("export")
    add(g, "--plan", help="plan.json from 'instaprune calibrate' (checked against the model; without it the dense "
        "model is exported)")
    add(g, "--scale", type=float, help="override the plan's global threshold scale (baked in)")
    add(g, "--allow-other-weights", action="store_true", help=weights_help)
    add(g, "--format", choices=("all", *EXPORT_FORMATS), default="all", help="torch.export program (model.pt2), "
        "ONNX (model.onnx) or both")
    add(g, "--input-size", type=int, help="input resolution (default: the plan's, else the model's)")
    add(g, "--return-active", action="store_true", help="second output: kept channels per image and selected "
        "point")
    add(g, "--no-verify", action="store_true", help="skip running the exported files against PyTorch")

    p = command("benchmark", "latency of the fast dynamic engine against the fastest dense model (BN-folded or "
                "not, NCHW or channels_last), on real images or random inputs")
    common_model(p, data=False, batch_default=commands.default_batch())
    points_opts(p)
    g = p.add_argument_group("benchmark")
    add(g, "--plan", help="plan.json from 'instaprune calibrate' (without it: the BN-folded dense engine)")
    add(g, "--scale", type=float, help="override the plan's global threshold scale")
    add(g, "--allow-other-weights", action="store_true", help=weights_help)
    add(g, "--data-path", help="images to time (ImageFolder or CIFAR batches); default: random inputs")
    add(g, "--input-size", type=int, help="input resolution (default: the plan's, else the model's)")
    add(g, "--batches", default=",".join(map(str, fn_default(benchmark_plan, "batch_sizes"))),
        help="comma-separated batch sizes")
    add(g, "--threads", default=",".join(map(str, fn_default(benchmark_plan, "threads"))),
        help="comma-separated thread counts")
    add(g, "--pairs", type=int, default=fn_default(benchmark_plan, "pairs"), help="dense/dynamic alternations "
        "per batched row (>= 1)")
    add(g, "--max-images", type=int, default=fn_default(benchmark_plan, "max_images"), help="images timed one by "
        "one at batch 1 (a stratified, seeded sample of --data-path)")
    add(g, "--sample-seed", type=int, default=0, help="seed of the image sample")
    add(g, "--clock", choices=("auto", *CLOCKS), default=fn_default(benchmark_plan, "clock"),
        help="auto: CPU time at 1 thread (robust to other processes), wall time above")

    p = command("demo", "the whole pipeline on a generated dataset, no files needed")
    g = p.add_argument_group("demo")
    add(g, "--output-dir", default=fn_default(run_demo, "out_dir"), help="run directory")
    add(g, "--seed", type=int, default=fn_default(run_demo, "seed"), help="random seed")
    add(g, "--target", type=float, default=DEMO_TARGET, help="FLOPs reduction target")
    add(g, "--method", choices=DEMO_METHODS, default=DemoSchedule.method, help="the method branch: predicted "
        "gates or the paper's post-hoc rule")
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def _yaml_error(path: Path, e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [""])[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"cannot parse config {path}{where}: {problem}"


def _check_yaml_value(action: argparse.Action, value: Any, path: Path, key: str) -> Any:
    """A YAML value checked like the command line would check it; returns the value to use."""
    where = f"config {path}: option '{key}'"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        if value is None:
            return action.default
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{where}: expected a string or a list of strings, got {value!r}")
        return items
    if value is None:
        if action.required:
            raise ConfigError(f"{where}: a value is required")
        return None
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a single value, got a {type(value).__name__}")
    if action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None
    elif isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{where}: expected {'a number' if action.type else 'a string'}, got {value!r}")
    elif action.type is None:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


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
            raise ConfigError(_yaml_error(path, e)) from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(cfg, dict):
            raise ConfigError(f"config {path} must be a mapping of option names to values")
        subs = _subparsers(parser)
        command = next((a for a in rest if a in subs), None)
        if command is None and isinstance(cfg.get("command"), str) and cfg["command"] in subs:
            command = cfg["command"]
            rest = [command, *rest]
        if command is None:
            raise ConfigError(f"give the command ({', '.join(subs)}) with --config")
        sub = subs[command]
        actions = {a.dest: a for a in sub._actions if a.dest != "help"}
        norm = {str(k).replace("-", "_"): v for k, v in cfg.items() if k not in ("command", "config")}
        unknown = sorted(set(norm) - set(actions))
        if unknown:
            raise ConfigError(f"unknown option(s) in {path} for '{command}': {', '.join(unknown)}")
        values = {dest: _check_yaml_value(actions[dest], v, path, dest.replace("_", "-")) for dest, v in norm.items()}
        for dest in values:
            actions[dest].required = False  # supplied by the file; a flag still overrides it
        sub.set_defaults(**values)
    args = parser.parse_args(rest)
    args.config = known.config
    args.verbose = bool(getattr(args, "verbose", False))
    return args


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
    try:
        return int(getattr(commands, f"cmd_{args.command}")(args) or 0)
    except InstapruneError as e:
        commands.undo_output(args)  # a failed command leaves no half-written output folder
        print(f"instaprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("instaprune: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("instaprune: error: out of memory (try a smaller -b or --max-images)", file=sys.stderr)
        return 2
