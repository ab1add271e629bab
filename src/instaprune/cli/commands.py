"""Implementations of the CLI subcommands: load files, call the library, render results.

Only this module and ``cli.py`` print; the library returns data.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from instaprune.core.errors import ConfigError

__all__ = ["cmd_points", "cmd_train", "cmd_analyze", "cmd_calibrate", "cmd_evaluate", "cmd_demo",
           "cmd_export"]


def _out(text: str = "") -> None:
    print(text)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _bar(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None if enabled else True,
                dynamic_ncols=True)


def _load(args: argparse.Namespace):
    from instaprune.pipeline.stages import load_model

    return load_model(args.model, args.checkpoint, args.num_classes)


def _points(args: argparse.Namespace, lm, input_size: int | None = None):
    from instaprune.pipeline.stages import discover

    pre = lm.pre if input_size is None else replace(lm.pre, input_size=input_size)
    return discover(lm.model, pre, args.include, args.exclude, args.shortcuts)


def _out_dir(args: argparse.Namespace, default: str) -> Path:
    from instaprune.cli.main import save_resolved

    out = Path(args.output_dir or default)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(args, out)
    return out


def _calib_cfg(args: argparse.Namespace):
    from instaprune.method.calibration import CalibrationConfig
    from instaprune.method.thresholds import ThresholdConfig

    return CalibrationConfig(target=args.target, search=args.search, tolerance=args.tolerance,
                             thresholds=ThresholdConfig(args.mode, args.min_keep), search_images=args.search_images,
                             bn_recalibration=bool(getattr(args, "bn_recal", False)))


def cmd_points(args: argparse.Namespace) -> int:
    lm = _load(args)
    rep = _points(args, lm, args.input_size)
    rows = [[p.name, p.kind, p.channels, f"{p.height}x{p.width}", f"{100 * p.macs / rep.dense_macs:.2f}%",
             p.source] for p in rep.points]
    _out(_table(rows, ["point", "kind", "C", "HxW", "MACs share", "reads output of"]))
    _out(f"\n{len(rep.points)} prune points; dense {rep.dense_macs:,} MACs ({2 * rep.dense_macs:,} FLOPs) per "
         f"image at {rep.input_shape[2]}x{rep.input_shape[3]}")
    for p, why in rep.disabled:
        _out(f"disabled: {p.name}: {why}")
    for name, why in rep.skipped:
        _out(f"skipped:  {name}: {why}")
    if args.output_dir:
        from instaprune.core.io import atomic_write_json

        out = _out_dir(args, args.output_dir)
        atomic_write_json(out / "points.json", {
            "model": args.model, "dense_macs": rep.dense_macs, "fingerprint": rep.fingerprint(),
            "points": [p.to_dict() for p in rep.points],
            "disabled": [{"name": p.name, "reason": w} for p, w in rep.disabled],
            "skipped": [{"name": n, "reason": w} for n, w in rep.skipped]})
    return 0


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


def _cmd_train(args: argparse.Namespace, env) -> int:
    import torch

    from instaprune.core.io import atomic_write_json
    from instaprune.method.regularizer import FeatureDecayConfig
    from instaprune.pipeline.stages import calibrate_plan, load_split
    from instaprune.training.checkpoint import save_checkpoint, save_safetensors
    from instaprune.training.loop import TrainConfig, evaluate_top1, train

    torch.manual_seed(args.seed)  # random initialisation reproducible (and equal for 1 or N processes)
    lm = _load(args)
    lm.model.to(env.device)
    out = _out_dir(args, "runs/train")
    data = load_split(args.data_path, lm.pre, args.holdout, "train", args.split_seed)
    val = load_split(args.data_path, lm.pre, args.holdout, "holdout", args.split_seed) if args.holdout else None
    lm.pre = replace(lm.pre, class_names=data.class_names)
    points = _points(args, lm)
    decay = FeatureDecayConfig(args.lam, args.penalty, args.weights)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      label_smoothing=args.label_smoothing, augment=None if args.augment == "none" else args.augment,
                      amp=args.amp, accumulate=args.accumulate, seed=args.seed, decay=decay,
                      checkpoint_every=args.checkpoint_every, freeze_bn=args.freeze_bn, sync_bn=args.sync_bn)
    if getattr(args, "gates", False) or getattr(args, "static_target", 0):
        return _train_gated(args, env, lm, data, val, cfg, out)
    if args.prune_aware_epochs and not args.holdout:
        raise ConfigError("--prune-aware-epochs needs --holdout (the calibration split)")
    bar = _bar(cfg.epochs * max(len(data) // (cfg.batch_size * env.world_size), 1), "train", env.is_main)

    def progress(d: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(epoch=d["epoch"] + 1, loss=f"{d['loss']:.3f}", decay=f"{d['decay']:.3f}")

    res = train(lm.model, data, cfg, points, lm.pre, out, val, args.resume, progress=progress)
    bar.close()
    metrics: dict[str, Any] = {"epochs": cfg.epochs, "seconds": res.seconds, "history": res.history}
    if args.prune_aware_epochs:
        from instaprune.method.masked import MaskedModel
        from instaprune.method.prune_aware import PruneAwareConfig, TargetController

        ccfg = _calib_cfg(args)
        control = args.prune_aware_control == "on"
        # with the controller the scale follows the target anyway, so the starting thresholds only need their
        # per-point shape: the fast shared-tau bisection (the final recalibration below uses --search)
        plan, _ = calibrate_plan(lm, points, val, replace(ccfg, search="shared") if control else ccfg, args.select)
        if env.is_main:
            plan.save(out / "prune_aware" / "start_plan.json")  # the points and thresholds the phase starts from
        masked = MaskedModel(lm.model, points, plan.taus, plan.thresholds)
        ctl = TargetController(masked, PruneAwareConfig(args.target, args.prune_aware_ramp)) if control else None
        pa = replace(cfg, epochs=args.prune_aware_epochs, lr=args.prune_aware_lr or args.lr * 0.1,
                     decay=replace(decay, lam=args.prune_aware_lam))
        res2 = train(lm.model, data, pa, points, lm.pre, out / "prune_aware", val, args.resume, masked=masked,
                     controller=ctl)
        masked.remove()
        # recalibrate the thresholds for the trained weights on the points the phase trained with: selecting
        # anew (CV top-k on the new weights) would mask points the network never learnt to lose
        plan, _ = calibrate_plan(lm, points, val, ccfg, plan.selected)
        if env.is_main:
            plan.save(out / "plan.json")
        metrics["prune_aware_history"] = res2.history
        metrics["calibration"] = plan.calibration
    if not env.is_main:
        return 0
    metrics.update(world_size=res.world_size, global_batch=res.global_batch, resumed_from=res.resumed_from)
    meta = {"model_name": args.model, "num_classes": lm.meta.get("num_classes") or _num_classes(lm.model),
            "preprocessing": lm.pre.to_dict(), "train_config": cfg.to_dict()}
    save_checkpoint(out / "model.pt", lm.model, meta)
    save_safetensors(out / "model.safetensors", lm.model, meta)
    if val is not None:
        metrics["val_top1"] = evaluate_top1(lm.model, val, lm.pre)
    atomic_write_json(out / "metrics.json", metrics)
    _out(f"trained {cfg.epochs} epochs in {res.seconds:.0f}s -> {out / 'model.pt'}"
         + (f" (val top-1 {metrics['val_top1']:.4f})" if val is not None else ""))
    return 0


def _train_gated(args: argparse.Namespace, env, lm, data, val, cfg, out: Path) -> int:
    from instaprune.core.io import atomic_write_json
    from instaprune.method.gates import GateConfig
    from instaprune.pipeline.gated import GateSchedule, train_gated, train_static
    from instaprune.training.checkpoint import save_checkpoint, save_safetensors
    from instaprune.training.loop import evaluate_top1

    if not args.gates:  # --static-target alone: the static L1 baseline, slimmed, as one command
        cfg = replace(cfg, distill=args.distill)
        static, metrics = train_static(lm, data, val, args.static_target, cfg, out, args.resume)
        if not env.is_main:
            return 0
        meta = {"model_name": args.model, "num_classes": lm.meta.get("num_classes") or _num_classes(lm.model),
                "preprocessing": lm.pre.to_dict(), "train_config": cfg.to_dict(), "static": static}
        save_checkpoint(out / "model.pt", lm.model, meta)
        save_safetensors(out / "model.safetensors", lm.model, meta)
        if val is not None:
            metrics["val_top1"] = evaluate_top1(lm.model, val, lm.pre)
        atomic_write_json(out / "metrics.json", metrics)
        _out(f"trained the static model ({metrics['flops_reduction']:.3f} FLOPs reduction, {cfg.epochs} epochs) "
             f"-> {out / 'model.pt'}")
        return 0
    gcfg = GateConfig(selection=args.gate_selection, multiplier=args.gate_multiplier, predictor=args.gate_predictor,
                      min_keep=args.min_keep, fit=args.gate_fit, decay=args.gate_decay)
    schedule = GateSchedule(target=args.target, ramp=args.gate_ramp, warmup_batches=args.gate_warmup_batches,
                            static_target=args.static_target, include=tuple(args.include) if args.include else None,
                            exclude=tuple(args.exclude))
    cfg = replace(cfg, distill=args.distill)
    bar = _bar(cfg.epochs * max(len(data) // (cfg.batch_size * env.world_size), 1), "train (gates)", env.is_main)

    def progress(d: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(epoch=d["epoch"] + 1, loss=f"{d['loss']:.3f}")

    plan, metrics = train_gated(lm, data, val, gcfg, schedule, cfg, out, args.resume, progress)
    bar.close()
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
    _out(f"trained gates ({len(plan.gates.sites)} gates, {cfg.epochs} epochs) in {metrics['seconds']:.0f}s -> "
         f"{out / 'model.pt'}, {out / 'plan.json'}"
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
    from instaprune.pipeline.stages import analyze_and_select, cached_batches, load_split

    lm = _load(args)
    out = _out_dir(args, "runs/analyze")
    data = load_split(args.data_path, lm.pre, args.holdout, "holdout" if args.holdout else "all", args.split_seed)
    if args.max_images and args.max_images < len(data):
        data = data.subset(list(range(args.max_images)))
    points = _points(args, lm)
    stats, _ = analyze_and_select(lm.model, points, cached_batches(data, lm.pre, args.batch_size))
    table = stats.table(points)
    _out(_table([[r["name"], r["channels"], f"{100 * r['macs_share']:.2f}%", f"{r['cv']:.3f}", r["dead"]]
                 for r in table], ["point", "C", "MACs share", "CV", "dead"]))
    atomic_write_json(out / "analysis.json", {"model": args.model, "images": stats.n, "points": table,
                                              "stats": stats.to_dict()})
    write_plots(out, cv_table=table)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from instaprune.pipeline.stages import calibrate_plan, load_split

    lm = _load(args)
    out = _out_dir(args, "runs/calibrate")
    data = load_split(args.data_path, lm.pre, args.holdout, "holdout" if args.holdout else "all", args.split_seed)
    points = _points(args, lm)
    plan, _ = calibrate_plan(lm, points, data, _calib_cfg(args), args.select, args.batch_size)
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
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from instaprune.method.plan import Plan
    from instaprune.pipeline.stages import evaluate_and_report, load_model, load_split
    from instaprune.training.loop import evaluate_top1

    lm = _load(args)
    plan = Plan.load(args.plan) if args.plan else None
    if plan is not None:
        if args.scale is not None:
            plan = plan.with_scale(args.scale)
        lm.pre = replace(lm.pre, mean=plan.preprocessing.mean, std=plan.preprocessing.std)
    out = _out_dir(args, "runs/evaluate")
    # with --holdout, evaluate on the remainder: never on the calibration images
    data = load_split(args.data_path, lm.pre, args.holdout, "train" if args.holdout else "all", args.split_seed)
    points = _points(args, lm)
    if plan is not None:
        plan.check(points, args.model)
    baseline = args.baseline_top1
    if args.baseline_checkpoint:
        base = load_model(args.model, args.baseline_checkpoint, args.num_classes)
        baseline = evaluate_top1(base.model, data, lm.pre)
    res = evaluate_and_report(lm, points, data, out, plan, baseline, batch_size=args.batch_size,
                              extra={"model": args.model})
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
    from instaprune.method.plan import Plan
    from instaprune.pipeline.stages import load_split

    batches, threads = _int_list(args.batches, "--batches"), _int_list(args.threads, "--threads")
    if args.pairs < 1 or args.max_images < 1:
        raise ConfigError(f"--pairs and --max-images must be >= 1, got {args.pairs}, {args.max_images}")
    lm = _load(args)
    plan = Plan.load(args.plan) if args.plan else None
    size = args.input_size or (plan.preprocessing.input_size if plan is not None else None) or lm.pre.input_size
    if plan is not None:
        if args.scale is not None:
            plan = plan.with_scale(args.scale)
        lm.pre = replace(lm.pre, mean=plan.preprocessing.mean, std=plan.preprocessing.std)
    points = _points(args, lm, size)
    if plan is not None:
        plan.check(points, args.model)
    n = max(max(batches), args.max_images if 1 in batches else 0)  # batch 1 times images one by one
    if args.data_path:
        data = load_split(args.data_path, replace(lm.pre, input_size=size), 0, "all", 0)
        if len(data) < n:
            raise ConfigError(f"{args.data_path} has {len(data)} images; the benchmark needs {n}")
        x = next(iterate_batches(data, n, lm.pre.mean, lm.pre.std))[0]
    else:
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = _out_dir(args, "runs/benchmark")
    lm.model.eval()
    rows = benchmark_plan(lm.model, points, plan, x, batches, threads, args.pairs, args.clock, args.max_images)
    for r in rows:
        r.update(model=args.model, level="model-real" if args.data_path else "model", input_size=size)
    atomic_write_json(out / "benchmark.json", {"rows": rows, "machine": machine(), "plan": args.plan,
                                               "inputs": "images" if args.data_path else "random"})
    table = [[r["batch"], r["threads"], r["dense_variant"], f"{r['dense_ms']:.3f}", f"{r['dynamic_ms']:.3f}",
              f"{r['measured_speedup']:.2f}", f"{r['theoretical_speedup']:.2f}", f"{r['efficiency']:.2f}"]
             for r in rows]
    _out(_table(table, ["batch", "threads", "dense", "dense ms", "dynamic ms", "speedup", "theoretical",
                        "efficiency"]))
    _out(f"-> {out / 'benchmark.json'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from instaprune.demo.run import run_demo

    _out_dir(args, args.output_dir)
    bar = _bar(0, "demo")

    def progress(stage: str) -> None:
        bar.set_description(f"demo: {stage}")
        bar.refresh()

    metrics = run_demo(args.output_dir, seed=args.seed, target=args.target, progress=progress)
    bar.close()
    keys = ("baseline_top1", "dense_top1", "top1", "flops_reduction", "per_image_flops_p90_over_p10",
            "spearman_difficulty_flops", "seconds")
    _out(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    _out(f"report: {Path(args.output_dir) / 'report.md'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from instaprune.evaluation.export import EXPORT_FORMATS, export_model
    from instaprune.method.plan import Plan
    from instaprune.training.artifacts import plan_points, save_portable

    lm = _load(args)
    plan = Plan.load(args.plan) if args.plan else None
    if plan is not None and args.scale is not None:
        plan = plan.with_scale(args.scale)
    size = args.input_size or (plan.preprocessing.input_size if plan is not None else lm.pre.input_size)
    if plan is not None:
        plan.check(plan_points(lm.model, plan, size), args.model)
    out = _out_dir(args, "runs/export")
    formats = EXPORT_FORMATS if args.format == "all" else (args.format,)
    # standard-normal inputs (what normalised images look like): their masks differ from image to image
    gen = torch.Generator().manual_seed(0)
    probe = None if args.no_verify else torch.randn(4, 3, size, size, generator=gen)
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
