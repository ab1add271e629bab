"""Implementations of the CLI subcommands: check the options, check the output directory, load and check the
files, call the library, render results. Only the ``cli`` package prints; the library returns data.

Order in every command: options become the library's validated configs first (a bad value is refused before any
data is loaded), then the output directory is checked (a file, not writable, or inside the input data: refused),
then inputs are loaded and checked; the output directory and its ``config.yaml`` are written only once the
inputs passed, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from instaprune.cli.progress import Progress
from instaprune.core.errors import ConfigError

__all__ = ["cmd_points", "cmd_train", "cmd_analyze", "cmd_calibrate", "cmd_evaluate", "cmd_benchmark", "cmd_demo",
           "cmd_export", "save_resolved", "default_batch", "train_config", "calibration_config",
           "posthoc_schedule"]

log = logging.getLogger("instaprune")


def _out(text: str = "") -> None:
    print(text)


def _warn(text: str) -> None:
    import sys

    print(f"instaprune: warning: {text}", file=sys.stderr)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def default_batch() -> int:
    from instaprune.core.config import field_default
    from instaprune.training.loop import TrainConfig

    return int(field_default(TrainConfig, "batch_size"))


# ---------------------------------------------------------------------------------------------- configs
def calibration_config(args: argparse.Namespace):
    from instaprune.method.calibration import CalibrationConfig
    from instaprune.method.thresholds import ThresholdConfig

    return CalibrationConfig(target=args.target, search=args.search, tolerance=args.tolerance,
                             thresholds=ThresholdConfig(args.mode, args.min_keep), search_images=args.search_images,
                             bn_recalibration=bool(getattr(args, "bn_recal", False)))


def train_config(args: argparse.Namespace):
    from instaprune.method.regularizer import FeatureDecayConfig
    from instaprune.training.loop import TrainConfig

    decay = FeatureDecayConfig(args.lam, args.penalty, args.weights)
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       label_smoothing=args.label_smoothing, augment=None if args.augment == "none" else args.augment,
                       amp=args.amp, accumulate=args.accumulate, seed=args.seed, decay=decay,
                       checkpoint_every=args.checkpoint_every, freeze_bn=args.freeze_bn, sync_bn=args.sync_bn,
                       distill=args.distill)


def posthoc_schedule(args: argparse.Namespace):
    from instaprune.pipeline.posthoc import PosthocSchedule

    return PosthocSchedule(prune_aware_epochs=args.prune_aware_epochs, prune_aware_lr=args.prune_aware_lr,
                           prune_aware_lam=args.prune_aware_lam,
                           prune_aware_control=args.prune_aware_control == "on",
                           prune_aware_ramp=args.prune_aware_ramp)


# ---------------------------------------------------------------------------------------------- files
def _inside(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _check_out_dir(args: argparse.Namespace, default: str, inputs: tuple[str | None, ...] = ()) -> Path:
    """The output directory, checked before any work (not created yet: see :func:`_begin_output`)."""
    out = Path(args.output_dir or default)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} exists and is not a directory")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and (not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK)):
        raise ConfigError(f"--output-dir {out}: {probe} is not a writable directory")
    for src in inputs:
        if src and Path(src).is_dir() and _inside(out, Path(src)):
            raise ConfigError(f"--output-dir {out} is inside the input data {src}: choose a directory outside it")
    return out


def _begin_output(args: argparse.Namespace, out: Path) -> Path:
    """Create ``out`` and write ``config.yaml`` (the inputs have been checked by now). What this call created is
    remembered, so a command that fails later leaves no output folder behind (:func:`undo_output`)."""
    created, had_config = not out.exists(), (out / "config.yaml").exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --output-dir {out}: {e.strerror or e}") from e
    save_resolved(args, out)
    args._began = (out, created, had_config)
    return out


def undo_output(args: argparse.Namespace) -> None:
    """After a failed command: remove the ``config.yaml`` it wrote (unless one was there before: a resumed run's),
    and its output folder if the command created it and nothing else was written there (partial results of a
    resumable run are kept)."""
    began = getattr(args, "_began", None)
    if began is None:
        return
    out, created, had_config = began
    if not had_config:
        (out / "config.yaml").unlink(missing_ok=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def save_resolved(args: argparse.Namespace, out_dir: str | Path) -> None:
    """The resolved options as ``config.yaml`` (``instaprune --config config.yaml`` re-runs the command)."""
    import yaml

    from instaprune.core.io import atomic_write_text

    d = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("config", "verbose")}
    atomic_write_text(Path(out_dir) / "config.yaml", yaml.safe_dump(d, sort_keys=True))


def _load(args: argparse.Namespace):
    from instaprune.pipeline.stages import load_model

    _check_sizes(args)
    return load_model(args.model, args.checkpoint, args.num_classes)


def _check_sizes(args: argparse.Namespace) -> None:
    if getattr(args, "batch_size", 1) < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_classes is not None and not 1 <= args.num_classes <= 1_000_000:
        raise ConfigError(f"--num-classes must be in [1, 1000000], got {args.num_classes}")
    for name in ("holdout", "max_images", "split_seed", "sample_seed"):
        if getattr(args, name, 0) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    size = getattr(args, "input_size", None)
    if size is not None and not 1 <= size <= 4096:
        raise ConfigError(f"--input-size must be in [1, 4096], got {size}")


def _points(args: argparse.Namespace, lm, input_size: int | None = None):
    from instaprune.pipeline.stages import discover

    pre = lm.pre if input_size is None else replace(lm.pre, input_size=input_size)
    return discover(lm.model, pre, args.include, args.exclude, args.shortcuts)


def _load_plan(args: argparse.Namespace):
    from instaprune.method.plan import Plan

    if not args.plan:
        return None
    plan = Plan.load(args.plan)
    if args.scale is not None:
        if not 0 <= args.scale < 1e6:
            raise ConfigError(f"--scale must be in [0, 1e6), got {args.scale}")
        plan = plan.with_scale(args.scale)
    return plan


def _check_plan_weights(args: argparse.Namespace, plan, model) -> None:
    if plan is None:
        return
    problem = plan.check_weights(model)
    if problem is None:
        return
    if getattr(args, "allow_other_weights", False):
        _warn(f"{problem} (--allow-other-weights)")
        return
    raise ConfigError(f"{problem}; use the checkpoint the plan was made with (calibrate or train writes it beside "
                      f"the plan) or pass --allow-other-weights")


def _sample(data, n: int, seed: int):
    """A stratified, seeded sample of at most ``n`` images (all of them when ``n`` is 0 or >= the set)."""
    if n and n < len(data):
        return data.sample(n, seed)
    return data


def _calibration_reporter(p: Progress):
    state = {"search": None}

    def report(d: dict[str, Any]) -> None:
        if d["search"] != state["search"]:
            state["search"] = d["search"]
            label = {"curve": "accuracy-vs-FLOPs curve", "bn_recalibration": "BatchNorm re-estimation"}.get(
                d["search"], f"{d['search']} search")
            p.stage(f"calibrate: {label}", unit="evaluations")
        p.update(1, reduction=f"{d['flops_reduction']:.3f}", top1=f"{d['top1']:.4f}")

    return report


def _calibration_summary(c: dict[str, Any]) -> str:
    rows = [f"  {k}: top-1 {r['top1']:.4f} at FLOPs reduction {r['flops_reduction']:.3f}"
            for k, r in c["results"].items()]
    return "\n".join(rows + [f"  kept {c['chosen']}: {c.get('reason', '')} ({c['evaluations']} evaluations, "
                             f"{c['seconds']:.0f}s)"])


class _Ticking:
    """A re-iterable view of ``batches`` that advances a progress bar by each batch's images."""

    def __init__(self, batches: list, p: Progress) -> None:
        self.batches, self.p = batches, p

    def __iter__(self):
        for b in self.batches:
            yield b
            self.p.update(len(b[1]))

    def __len__(self) -> int:
        return len(self.batches)


# ---------------------------------------------------------------------------------------------- commands
def cmd_points(args: argparse.Namespace) -> int:
    out = _check_out_dir(args, args.output_dir) if args.output_dir else None
    lm = _load(args)
    if getattr(args, "gates", False):
        return _gate_points(args, lm, out)
    rep = _points(args, lm, args.input_size)
    rows = [[p.name, p.kind, p.channels, f"{p.height}x{p.width}", f"{100 * p.macs / rep.dense_macs:.2f}%",
             p.source] for p in rep.points]
    _out(_table(rows, ["point", "kind", "C", "HxW", "MACs share", "reads output of"]))
    _out(f"\n{len(rep.points)} prune points; dense {rep.dense_macs:,} MACs ({2 * rep.dense_macs:,} FLOPs) per "
         f"image at {rep.input_shape[2]}x{rep.input_shape[3]}")
    return _reasons_and_listing(args, out, "points.json", {
        "model": args.model, "dense_macs": rep.dense_macs, "fingerprint": rep.fingerprint(),
        "points": [p.to_dict() for p in rep.points]},
        {"disabled": [(p.name, w) for p, w in rep.disabled], "skipped": list(rep.skipped)})


def _reasons_and_listing(args: argparse.Namespace, out: Path | None, filename: str, payload: dict[str, Any],
                         reasons: dict[str, list[tuple[str, str]]]) -> int:
    """Print a line per (name, reason) under each label; with --output-dir write ``payload`` plus the reasons
    (``[{"name", "reason"}]`` per label) as ``filename``."""
    width = max(len(label) for label in reasons) + 1
    for label, items in reasons.items():
        for name, why in items:
            _out(f"{(label.replace('_', ' ') + ':'):<{width}} {name}: {why}")
    if out is not None:
        from instaprune.core.io import atomic_write_json

        _begin_output(args, out)
        atomic_write_json(out / filename, {**payload, **{label: [{"name": n, "reason": w} for n, w in items]
                                                          for label, items in reasons.items()}})
    return 0


def _gate_points(args: argparse.Namespace, lm, out: Path | None) -> int:
    import torch

    from instaprune.method.gates import find_gates

    size = args.input_size or lm.pre.input_size
    rep = find_gates(lm.model, torch.zeros(1, len(lm.pre.mean), size, size), args.include, args.exclude)
    rows = [[s.name, " -> ".join(s.producers), s.channels, s.in_channels,
             f"{100 * (sum(s.producer_macs) + s.consumer_macs) / rep.dense_macs:.2f}%"] for s in rep]
    _out(_table(rows, ["gate (consumer)", "producer chain", "C", "predictor input C", "MACs it gates"]))
    _out(f"\n{len(rep)} gateable tensors; dense {rep.dense_macs:,} MACs per image at {size}x{size}")
    return _reasons_and_listing(args, out, "gates.json", {
        "model": args.model, "dense_macs": rep.dense_macs, "gates": [s.to_dict() for s in rep]},
        {"disabled": list(rep.disabled), "not_gateable": list(rep.not_gateable)})


def cmd_train(args: argparse.Namespace) -> int:
    """Also under ``torchrun``: one process group for the run; rank 0 alone reports and writes results."""
    from instaprune.core.distributed import init_from_env, shutdown

    env = init_from_env()
    ok = False
    try:
        code = _cmd_train(args, env)
        ok = True
        return code
    finally:
        shutdown(sync=ok)


def _gate_configs(args: argparse.Namespace):
    from instaprune.method.gates import GateConfig
    from instaprune.pipeline.gated import GateSchedule

    gcfg = GateConfig(selection=args.gate_selection, multiplier=args.gate_multiplier, predictor=args.gate_predictor,
                      min_keep=args.min_keep, fit=args.gate_fit, decay=args.gate_decay)
    schedule = GateSchedule(target=args.target, ramp=args.gate_ramp, warmup_batches=args.gate_warmup_batches,
                            allocation=args.gate_allocation, slim_off=args.gate_slim_off,
                            static_target=args.static_target, include=tuple(args.include) if args.include else None,
                            exclude=tuple(args.exclude))
    return gcfg, schedule


def _step_reporter(p: Progress, labels: dict[str, str]):
    state = {"phase": None}

    def report(d: dict[str, Any]) -> None:
        phase = d.get("phase", "train")
        if phase != state["phase"]:
            state["phase"] = phase
            total = d["steps"] * d["epochs"] if "epochs" in d else None
            p.stage(labels.get(phase) or labels.get("*", "") + phase, total=total, unit="steps")
            if d.get("global_step", 1) > 1 and total:  # resumed: count the steps already done
                p.update(min(d["epoch"] * d["steps"] + d["step"], total))
        post = {"epoch": d["epoch"] + 1, "loss": f"{d['loss']:.3f}"}
        if "decay" in d:
            post["decay"] = f"{d['decay']:.3f}"
        p.update(1, **post)

    return report


def _cmd_train(args: argparse.Namespace, env) -> int:
    import torch

    from instaprune.core.io import atomic_write_json
    from instaprune.pipeline.posthoc import run_posthoc
    from instaprune.pipeline.stages import load_split
    from instaprune.training.checkpoint import save_checkpoint, save_safetensors
    from instaprune.training.loop import evaluate_top1

    cfg = train_config(args)  # every option checked before anything is loaded
    gates = bool(getattr(args, "gates", False) or getattr(args, "static_target", 0))
    cfg = replace(cfg, distill=cfg.distill_weight(teacher=gates))  # gates and static distil from the dense model
    if gates:
        gate_cfgs = _gate_configs(args) if args.gates else None
    else:
        if args.distill:
            raise ConfigError("--distill needs --gates or --static-target (the post-hoc method has no teacher)")
        schedule = posthoc_schedule(args)
        ccfg = calibration_config(args) if schedule.prune_aware_epochs else None
        if schedule.prune_aware_epochs and not args.holdout:
            raise ConfigError("--prune-aware-epochs needs --holdout (the calibration split)")
        if cfg.epochs == 0 and not schedule.prune_aware_epochs:
            raise ConfigError("--epochs must be >= 1 (0 only with --prune-aware-epochs)")
        if not args.select.strip().startswith("plan:"):
            from instaprune.pipeline.stages import parse_selection

            parse_selection(args.select)
    out = _check_out_dir(args, "runs/train", (args.data_path,))
    torch.manual_seed(args.seed)  # random initialisation reproducible (and equal for 1 or N processes)
    with Progress(env.is_main) as p:
        p.stage("loading model and data")
        lm = _load(args)
        lm.model.to(env.device)
        data = load_split(args.data_path, lm.pre, args.holdout, "train", args.split_seed)
        val = load_split(args.data_path, lm.pre, args.holdout, "holdout", args.split_seed) if args.holdout else None
        lm.pre = replace(lm.pre, class_names=data.class_names)
        points = _points(args, lm)
        _begin_output(args, out)
        if gates:
            return _train_gated(args, env, lm, data, val, cfg, out, p, gate_cfgs)
        res = run_posthoc(lm, points, data, cfg, calib=val, calibration=ccfg, schedule=schedule,
                          selection=args.select, out_dir=out, val=val, resume=args.resume,
                          progress=_step_reporter(p, {"finetune": "train", "prune_aware": "train: prune-aware"}),
                          stage=None, calibration_progress=_calibration_reporter(p))
        if val is not None and env.is_main:
            p.stage("validating")
            val_top1 = evaluate_top1(lm.model, val, lm.pre)
    if not env.is_main:
        return 0
    metrics: dict[str, Any] = {"epochs": cfg.epochs, "seconds": res.finetune.seconds,
                               "history": res.finetune.history}
    if res.prune_aware is not None and res.plan is not None:
        res.plan.save(out / "plan.json")
        metrics["prune_aware_history"] = res.prune_aware.history
        metrics["calibration"] = res.plan.calibration
    metrics.update(world_size=res.finetune.world_size, global_batch=res.finetune.global_batch,
                   resumed_from=res.finetune.resumed_from)
    meta = {"model_name": args.model, "num_classes": lm.meta.get("num_classes") or _num_classes(lm.model),
            "preprocessing": lm.pre.to_dict(), "train_config": cfg.to_dict()}
    save_checkpoint(out / "model.pt", lm.model, meta)
    save_safetensors(out / "model.safetensors", lm.model, meta)
    if val is not None:
        metrics["val_top1"] = val_top1
    atomic_write_json(out / "metrics.json", metrics)
    seconds = res.finetune.seconds + (res.prune_aware.seconds if res.prune_aware is not None else 0.0)
    what = _plural(cfg.epochs, "epoch")
    if res.prune_aware is not None:
        what += f" + {_plural(res.prune_aware.epochs, 'prune-aware epoch')}"
    _out(f"trained {what} in {seconds:.0f}s -> {out / 'model.pt'}"
         + (f" (val top-1 {metrics['val_top1']:.4f})" if val is not None else ""))
    if res.prune_aware is not None and res.plan is not None:
        c = res.plan.calibration
        r = c["results"][c["chosen"]]
        _out(f"plan: {len(res.plan.taus)} points, holdout top-1 {r['top1']:.4f} at FLOPs reduction "
             f"{r['flops_reduction']:.3f} -> {out / 'plan.json'}")
        _out(_calibration_summary(c))
    return 0


def _train_gated(args: argparse.Namespace, env, lm, data, val, cfg, out: Path, p: Progress, gate_cfgs) -> int:
    from instaprune.core.io import atomic_write_json
    from instaprune.pipeline.gated import train_gated, train_static
    from instaprune.training.checkpoint import save_checkpoint, save_safetensors
    from instaprune.training.loop import evaluate_top1

    if not args.gates:  # --static-target alone: the static L1 baseline, slimmed, as one command
        static, metrics = train_static(lm, data, val, args.static_target, cfg, out, args.resume,
                                       progress=_step_reporter(p, {"train": "train (static)"}))
        if not env.is_main:
            return 0
        meta = {"model_name": args.model, "num_classes": lm.meta.get("num_classes") or _num_classes(lm.model),
                "preprocessing": lm.pre.to_dict(), "train_config": cfg.to_dict(), "static": static}
        save_checkpoint(out / "model.pt", lm.model, meta)
        save_safetensors(out / "model.safetensors", lm.model, meta)
        if val is not None:
            metrics["val_top1"] = evaluate_top1(lm.model, val, lm.pre)
        atomic_write_json(out / "metrics.json", metrics)
        _out(f"trained the static model ({metrics['flops_reduction']:.3f} FLOPs reduction, "
             f"{_plural(cfg.epochs, 'epoch')}) -> {out / 'model.pt'}")
        return 0
    gcfg, schedule = gate_cfgs
    plan, metrics = train_gated(lm, data, val, gcfg, schedule, cfg, out, args.resume,
                                _step_reporter(p, {"train": "train (gates)"}))
    if not env.is_main:
        return 0
    meta = {"model_name": args.model, "num_classes": lm.meta.get("num_classes") or _num_classes(lm.model),
            "preprocessing": lm.pre.to_dict(), "train_config": cfg.to_dict(), "gates": plan.gates.to_dict()}
    save_checkpoint(out / "model.pt", lm.model, meta)
    save_safetensors(out / "model.safetensors", lm.model, meta)
    plan.save(out / "plan.json")
    if val is not None:
        metrics["val_top1_dense"] = evaluate_top1(lm.model, val, lm.pre)
    atomic_write_json(out / "metrics.json", metrics)
    cal = metrics.get("calibration", {})
    _out(f"trained gates ({len(plan.gates.sites)} gates, {_plural(cfg.epochs, 'epoch')}) in "
         f"{metrics['seconds']:.0f}s -> {out / 'model.pt'}, {out / 'plan.json'}"
         + (f" (holdout top-1 {cal['top1']:.4f} at FLOPs reduction {cal['flops_reduction']:.3f})" if cal else ""))
    return 0


def _num_classes(model) -> int:
    import torch

    from instaprune.method.gates import GATES_ATTR

    last = [m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not n.startswith(GATES_ATTR)]
    return last[-1].out_features if last else 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from instaprune.core.io import atomic_write_json
    from instaprune.evaluation.report import write_plots
    from instaprune.pipeline.stages import analyze_and_select, cached_batches

    if args.max_images < 0:
        raise ConfigError(f"--max-images must be >= 0 (0 = all), got {args.max_images}")
    out = _check_out_dir(args, "runs/analyze", (args.data_path,))
    with Progress() as p:
        lm, data = _load_with_holdout(args, p)
        data = _sample(data, args.max_images, args.sample_seed)
        points = _points(args, lm)
        batches = cached_batches(data, lm.pre, args.batch_size)
        p.stage("analyze", total=len(data), unit="images")
        stats, _ = analyze_and_select(lm.model, points, _Ticking(batches, p))
    table = stats.table(points)
    _out(_table([[r["name"], r["channels"], f"{100 * r['macs_share']:.2f}%", f"{r['cv']:.3f}", r["dead"]]
                 for r in table], ["point", "C", "MACs share", "CV", "dead"]))
    _begin_output(args, out)
    atomic_write_json(out / "analysis.json", {"model": args.model, "images": stats.n, "points": table,
                                              "stats": stats.to_dict(), "max_images": args.max_images,
                                              "sample_seed": args.sample_seed})
    write_plots(out, cv_table=table)
    return 0


def _load_with_holdout(args: argparse.Namespace, p: Progress):
    """The model and the images analyze/calibrate work on: the --holdout part of --data-path (all without it)."""
    from instaprune.pipeline.stages import load_split

    p.stage("loading model and data")
    lm = _load(args)
    return lm, load_split(args.data_path, lm.pre, args.holdout, "holdout" if args.holdout else "all",
                          args.split_seed)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from instaprune.pipeline.stages import calibrate_plan, parse_selection

    ccfg = calibration_config(args)
    if not args.select.strip().startswith("plan:"):
        parse_selection(args.select)
    out = _check_out_dir(args, "runs/calibrate", (args.data_path,))
    with Progress() as p:
        lm, data = _load_with_holdout(args, p)
        if lm.meta.get("gates"):  # a gated checkpoint: its gates are calibrated to --target (no training)
            from instaprune.method.gates import GatePlan
            from instaprune.pipeline.gated import recalibrate_gates

            gplan = GatePlan.from_dict(lm.meta["gates"])
            if args.gate_slim_off:
                from instaprune.pipeline.gated import slim_off_plan

                p.stage("calibrate: gates, slimming the channels they do not use")
                plan = slim_off_plan(lm, gplan, data, ccfg.target, args.gate_slim_off, args.batch_size)
            else:
                p.stage("calibrate: gates")
                plan = recalibrate_gates(lm, gplan, data, ccfg.target, args.batch_size)
            _begin_output(args, out)
            if args.gate_slim_off:  # the plan belongs to the slim weights: save them with it
                from instaprune.training.checkpoint import save_checkpoint, save_safetensors

                meta = {**lm.meta, "model_name": args.model, "num_classes": _num_classes(lm.model),
                        "preprocessing": lm.pre.to_dict(), "gates": plan.gates.to_dict()}
                save_checkpoint(out / "model.pt", lm.model, meta)
                save_safetensors(out / "model.safetensors", lm.model, meta)
            plan.save(out / "plan.json")
            c = plan.calibration
            _out(f"plan: {len(plan.gates.sites)} gates ({c['selection']}), calibration top-1 {c['top1']:.4f} at "
                 f"FLOPs reduction {c['flops_reduction']:.3f} -> {out / 'plan.json'}"
                 + (f" (slim weights: {out / 'model.pt'}; static part {c['static_flops_reduction']:.3f})"
                    if args.gate_slim_off else ""))
            return 0
        points = _points(args, lm)
        p.stage("calibrate: analysing")
        plan, _ = calibrate_plan(lm, points, data, ccfg, args.select, args.batch_size,
                                 progress=_calibration_reporter(p))
    _begin_output(args, out)
    if args.bn_recal:  # the plan belongs to the re-estimated BatchNorm statistics: save those weights with it
        from instaprune.training.checkpoint import save_checkpoint

        save_checkpoint(out / "model.pt", lm.model, {**lm.meta, "model_name": args.model,
                                                     "num_classes": _num_classes(lm.model),
                                                     "preprocessing": lm.pre.to_dict()})
    plan.save(out / "plan.json")
    c = plan.calibration
    r = c["results"][c["chosen"]]
    _out(f"plan: {len(plan.taus)} points, {c['chosen']} search, calibration top-1 {r['top1']:.4f} "
         f"(dense {c['dense_top1']:.4f}) at FLOPs reduction {r['flops_reduction']:.3f} -> {out / 'plan.json'}"
         + (f" (weights with re-estimated BatchNorm statistics: {out / 'model.pt'})" if args.bn_recal else ""))
    _out(_calibration_summary(c))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from instaprune.pipeline.stages import evaluate_and_report, load_model, load_split
    from instaprune.training.loop import evaluate_top1

    if args.baseline_top1 is not None and not 0 <= args.baseline_top1 <= 1:
        raise ConfigError(f"--baseline-top1 must be in [0, 1], got {args.baseline_top1}")
    out = _check_out_dir(args, "runs/evaluate", (args.data_path,))
    plan = _load_plan(args)
    with Progress() as p:
        p.stage("loading model and data")
        lm = _load(args)
        if plan is not None:
            lm.pre = replace(lm.pre, mean=plan.preprocessing.mean, std=plan.preprocessing.std)
        points = _points(args, lm)
        if plan is not None:
            plan.check(points, args.model)
        _check_plan_weights(args, plan, lm.model)
        # with --holdout, evaluate on the remainder: never on the calibration images
        data = load_split(args.data_path, lm.pre, args.holdout, "train" if args.holdout else "all", args.split_seed)
        baseline = args.baseline_top1
        if args.baseline_checkpoint:
            base = load_model(args.model, args.baseline_checkpoint, args.num_classes)
            p.stage("evaluate: baseline", total=len(data), unit="images")
            baseline = evaluate_top1(base.model, data, lm.pre)
        _begin_output(args, out)
        p.stage("evaluate", total=len(data) * (2 if plan is not None else 1), unit="images")
        res = evaluate_and_report(lm, points, data, out, plan, baseline, batch_size=args.batch_size,
                                  extra={"model": args.model}, progress=p.update)
    m = res.metrics
    line = f"dense top-1 {m['dense_top1']:.4f}"
    if "top1" in m:
        line += (f", dynamic top-1 {m['top1']:.4f} at FLOPs reduction {m['flops_reduction']:.3f} "
                 f"(p10 {m['flops_reduction_p10']:.3f}, p90 {m['flops_reduction_p90']:.3f})")
    _out(line + f" on {m['images']} images -> {out / 'metrics.json'}")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{what} must be a comma-separated list of positive integers, got {text!r}")
    return values


def cmd_benchmark(args: argparse.Namespace) -> int:
    import torch

    from instaprune.core.io import atomic_write_json
    from instaprune.data.datasets import iterate_batches
    from instaprune.engine.bench import benchmark_plan, machine
    from instaprune.pipeline.stages import load_split

    batches, threads = _int_list(args.batches, "--batches"), _int_list(args.threads, "--threads")
    if args.pairs < 1 or args.max_images < 1:
        raise ConfigError(f"--pairs and --max-images must be >= 1, got {args.pairs}, {args.max_images}")
    out = _check_out_dir(args, "runs/benchmark", (args.data_path,))
    plan = _load_plan(args)
    with Progress() as p:
        p.stage("loading model and data")
        lm = _load(args)
        size = args.input_size or (plan.preprocessing.input_size if plan is not None else None) or lm.pre.input_size
        if plan is not None:
            lm.pre = replace(lm.pre, mean=plan.preprocessing.mean, std=plan.preprocessing.std)
        points = _points(args, lm, size)
        if plan is not None:
            plan.check(points, args.model)
        _check_plan_weights(args, plan, lm.model)
        n = max(max(batches), args.max_images if 1 in batches else 0)  # batch 1 times images one by one
        if args.data_path:
            data = load_split(args.data_path, replace(lm.pre, input_size=size), 0, "all", 0)
            if len(data) < n:
                raise ConfigError(f"{args.data_path} has {len(data)} images; the benchmark needs {n}")
            data = _sample(data, n, args.sample_seed)  # stratified: not the first n in class order
            x = next(iterate_batches(data, n, lm.pre.mean, lm.pre.std))[0]
        else:
            x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
        lm.model.eval()
        p.stage(f"benchmark ({len(batches) * len(threads)} rows)")
        rows = benchmark_plan(lm.model, points, plan, x, batches, threads, args.pairs, args.clock, args.max_images)
    for r in rows:
        r.update(model=args.model, level="model-real" if args.data_path else "model", input_size=size)
    _begin_output(args, out)
    atomic_write_json(out / "benchmark.json", {"rows": rows, "machine": machine(), "plan": args.plan,
                                               "inputs": "images" if args.data_path else "random",
                                               "sample_seed": args.sample_seed})
    table = [[r["batch"], r["threads"], r["dense_variant"], f"{r['dense_ms']:.3f}", f"{r['dynamic_ms']:.3f}",
              f"{r['measured_speedup']:.2f}", f"{r['theoretical_speedup']:.2f}", f"{r['efficiency']:.2f}"]
             for r in rows]
    _out(_table(table, ["batch", "threads", "dense", "dense ms", "dynamic ms", "speedup", "theoretical",
                        "efficiency"]))
    _out(f"-> {out / 'benchmark.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from instaprune.demo.run import DemoSchedule, run_demo
    from instaprune.method.calibration import CalibrationConfig

    CalibrationConfig(target=args.target)  # refused before anything runs
    schedule = DemoSchedule(method=args.method)
    out = _begin_output(args, _check_out_dir(args, args.output_dir))
    with Progress() as p:
        metrics = run_demo(out, seed=args.seed, target=args.target, schedule=schedule,
                           progress=lambda s: p.stage(f"demo: {s}"),
                           step_progress=_step_reporter(p, {"*": "demo: ", "finetune": "demo: fine-tuning with "
                                                            "feature decay", "prune_aware": "demo: prune-aware "
                                                            "fine-tuning"}))
    keys = ("method", "baseline_top1", "dense_top1", "top1", "flops_reduction", "per_image_flops_p90_over_p10",
            "spearman_difficulty_flops", "seconds")
    _out(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    _out(f"report: {out / 'report.md'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from instaprune.evaluation.export import EXPORT_FORMATS, export_model
    from instaprune.training.artifacts import plan_points, save_portable

    out = _check_out_dir(args, "runs/export")
    plan = _load_plan(args)
    lm = _load(args)
    size = args.input_size or (plan.preprocessing.input_size if plan is not None else lm.pre.input_size)
    if plan is not None:
        plan.check(plan_points(lm.model, plan, size), args.model)
    _check_plan_weights(args, plan, lm.model)
    _begin_output(args, out)
    formats = EXPORT_FORMATS if args.format == "all" else (args.format,)
    # standard-normal inputs (what normalised images look like): their masks differ from image to image
    gen = torch.Generator().manual_seed(0)
    probe = None if args.no_verify else torch.randn(4, 3, size, size, generator=gen)
    with Progress() as p:
        p.stage("export")
        res = export_model(lm.model, out, plan, size, formats=formats, return_active=args.return_active,
                           verify_inputs=probe)
    pre = plan.preprocessing if plan is not None else lm.pre
    meta = {"model_name": args.model, "num_classes": lm.meta.get("num_classes") or _num_classes(lm.model),
            "preprocessing": pre.to_dict()}
    written = save_portable(out, lm.model, plan, meta)
    files = [res.paths[k].name for k in ("pt2", "onnx") if k in res.paths]
    files += [p.name for p in written.values()]
    _out(f"exported {'dynamic' if plan is not None else 'dense'} {args.model} -> {out}: {', '.join(files)}")
    for fmt, diff in res.max_abs_diff.items():
        _out(f"  {fmt}: max |difference| to PyTorch on {len(probe)} test inputs = {diff:.3g}")
    return 0
