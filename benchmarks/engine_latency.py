"""Latency of the fast dynamic engine (``instaprune.engine``) against the fastest honest dense model.

Rows (``results/engine_latency.json``, key ``rows``):

- ``layer``: one consumer conv (BN folded, ReLU fused) of ResNet-18/50 and MobileNetV2 at 224x224 and CIFAR
  ResNet-56 at 32x32; dynamic = saliency + threshold + sparse conv (``DynamicConv2d``) with masks forced to
  keep exactly round(keep*C) channels per instance, drawn independently (the saliency is still computed
  and paid), on the layout ``to_dynamic`` uses (NCHW at batch 1, channels_last above); dense = the
  folded conv, the faster of NCHW and channels_last.
- ``model``: whole networks, every prune point selected, the same kind of forced masks; dense = the fastest
  of {eager, BN-folded} x {NCHW, channels_last}; dynamic = ``to_dynamic`` (``auto`` strategy). ResNet-56
  also gets a ``floor`` row (keep 0.0: every point keeps only its min_keep channels); keep-1.0 rows also time
  the engine with the saliency skipped (``no_saliency_ms``), which splits its overhead into saliency and the
  rest.
- ``model`` with ``method`` = ``gate``: predicted gates (``to_dynamic`` on a gated plan, top-k, hard) on
  ResNet-18/50 and MobileNetV2 at 224x224 and CIFAR ResNet-20/56 at 32x32, keep 1.0/0.5/0.3 per gate; masks
  forced per image (every image keeps the same k channels per gate, drawn independently: synthetic budgets;
  study 2's real calibrated plans are timed by ``cifar10_gates.py latency``), the predictors computed and paid;
  ``slim_ms`` = the statically slimmed model of the same MACs (``engine.bench.slim_gates``: the same k channels
  physically removed; the fastest of its eager / folded x NCHW / channels_last forms); dense, slim and dynamic
  alternate; ``tuned_ms`` = the engine's timed
  policies (``auto`` and each strategy forced on every gate, NCHW / channels_last) on its first call.
- ``model-real``: CIFAR ResNet-20/56 with their public checkpoints, a plan calibrated (shared tau, target
  FLOPs reduction 0.5) on ``--calib-images`` images of the CIFAR-10 train split (``--cifar-train``; when
  absent, on test images disjoint from the timed ones) and timed on ``--timed-images`` images of the test
  split (``--cifar-test``); the engine computes its own masks: per-image latency p50/p90/p99 at batch 1,
  per-batch time at batch 32, channel decisions that differ from the masked reference.

Dense and dynamic alternate in ``--pairs`` rounds (>= 7) of ``torch.utils.benchmark.Timer``; medians are
kept. Rows at one thread also time every forced strategy briefly (``auto`` against the best), and every row
profiles the dynamic forward for a saliency / gather / conv / other breakdown. Run it part by part on a quiet
machine (each part writes its own JSON), then ``--merge`` the parts into ``results/engine_latency.*``:

    python benchmarks/engine_latency.py --parts model --models resnet18,resnet50 --threads 1 --out part1
    python benchmarks/engine_latency.py --merge part1.json part2.json ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from _common import ROOT, run_meta
from engine_latency_report import render, update_readme
from instaprune.core.io import atomic_write_json, atomic_write_text
from instaprune.engine._kernels import SparseInputConv2d, fold_bn
from instaprune.engine._modules import DynamicConv2d, EngineContext, FoldedConv2d
from instaprune.engine.bench import (
    breakdown,
    clock_for,
    dense_candidates,
    dense_models,
    fastest,
    num_threads,
    per_call_latency,
    slim_gates,
    time_alternating,
)
from instaprune.engine.dynamic import to_dynamic
from instaprune.method.gates import GateConfig, GatePlan, attach_predictors, find_gates
from instaprune.method.masked import MaskedModel
from instaprune.method.plan import Plan
from instaprune.method.points import find_prune_points
from instaprune.method.thresholds import ThresholdConfig
from instaprune.models import build_model

DEFAULTS = {  # relative to the repository (../shared is the project's shared data directory)
    "cifar_test": "../shared/data/cifar10-test-jpeg",
    "cifar_train": ".data/cifar10-train-jpeg",
    "checkpoint_resnet20": "../shared/models/resnet20-cifar10.th",
    "checkpoint_resnet56": ".data/models/resnet56-cifar10.th",
}
# model, name, C_in, C_out, kernel, stride, H (input), groups
SHAPES = [
    ("resnet18", "3x3 64->64 @56", 64, 64, 3, 1, 56, 1),
    ("resnet18", "3x3 128->128 @28", 128, 128, 3, 1, 28, 1),
    ("resnet18", "3x3 256->256 @14", 256, 256, 3, 1, 14, 1),
    ("resnet18", "3x3 512->512 @7", 512, 512, 3, 1, 7, 1),
    ("resnet50", "1x1 256->64 @56", 256, 64, 1, 1, 56, 1),
    ("resnet50", "1x1 1024->256 @14", 1024, 256, 1, 1, 14, 1),
    ("resnet50", "1x1 512->2048 @7", 512, 2048, 1, 1, 7, 1),
    ("mobilenet_v2", "1x1 expand 32->192 @28", 32, 192, 1, 1, 28, 1),
    ("mobilenet_v2", "dw3x3 192 @28", 192, 192, 3, 1, 28, 192),
    ("mobilenet_v2", "1x1 project 192->32 @28", 192, 32, 1, 1, 28, 1),
    ("resnet56", "3x3 16->16 @32", 16, 16, 3, 1, 32, 1),
    ("resnet56", "3x3 64->64 @8", 64, 64, 3, 1, 8, 1),
]
MODELS = [("resnet18", 224), ("resnet50", 224), ("mobilenet_v2", 224), ("resnet56", 32)]
KEEPS = (0.25, 0.5, 0.75, 1.0)
CFG = ThresholdConfig("max", 0.05)
SWEEP = ("loop", "padded", "union", "dense")


def random_masks(channels: dict[str, int], n: int, keep: float,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, c in channels.items():
        k = max(CFG.floor(c), round(keep * c))
        idx = torch.rand(n, c, generator=gen).argsort(1)[:, :k]
        out[name] = torch.zeros(n, c, dtype=torch.bool).scatter_(1, idx, True)
    return out


def med(v: list[float]) -> float:
    return statistics.median(v)


def finish_row(row: dict, dense: dict[str, list[float]], dyn: list[float], theo: float) -> dict:
    best = min(dense, key=lambda k: med(dense[k]))
    row.update(dense_variant=best, dense_ms=med(dense[best]), dynamic_ms=med(dyn),
               dense_candidates_ms={k: med(v) for k, v in dense.items()}, theoretical_speedup=theo)
    row["measured_speedup"] = row["dense_ms"] / row["dynamic_ms"]
    row["efficiency"] = row["measured_speedup"] / theo
    row["time_ratio"] = row["dynamic_ms"] / row["dense_ms"]
    return row


def sweep(run, set_strategy, strategies, threads: int, clock: str, rounds: int = 5) -> dict:
    """Short alternating measurement of auto and every forced strategy: auto's time over the best's, from
    medians and from minima (contention only ever adds time, so the minimum is the steadier estimate of
    each strategy's own cost on a loaded machine)."""
    calls = {}
    for st in ("auto", *strategies):
        def call(st=st):
            set_strategy(st)
            return run()
        calls[st] = call
    t = time_alternating(calls, rounds, threads, clock, min_seconds=0.02)
    set_strategy("auto")
    ms = {k: med(v) for k, v in t.items()}
    mins = {k: min(v) for k, v in t.items()}
    best = min(ms, key=ms.__getitem__)
    best_min = min(mins, key=mins.__getitem__)
    return {"strategies_ms": ms, "strategies_min_ms": mins, "best_strategy": best_min,
            "best_strategy_median": best,
            "auto_over_best_median": ms["auto"] / ms[best], "auto_over_best": mins["auto"] / mins[best_min]}


# ---------------------------------------------------------------- layer level
def layer_rows(args, threads: int, batches) -> list[dict]:
    rows = []
    shapes = SHAPES if threads == 1 or args.all_threads else [s for s in SHAPES if s[1] in QUICK_THREADS2]
    for model, name, ci, co, k, stride, h, g in shapes[: 3 if args.quick else None]:
        gen = torch.Generator().manual_seed(ci * 7 + h)
        conv = nn.Conv2d(ci, co, k, stride, k // 2, groups=g, bias=False)
        bn = nn.BatchNorm2d(co).eval()
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        w, b = fold_bn(conv, bn)
        dense = FoldedConv2d(w, b, conv, "relu")
        ctx = EngineContext(forced_pays_saliency=True)
        dyn = DynamicConv2d("p", SparseInputConv2d(w, b, stride=stride, padding=k // 2, groups=g,
                                                   activation="relu"), 0.5, CFG, ctx)
        for n in batches:
            x = torch.relu(torch.randn(n, ci, h, h, generator=gen))
            xc = x.contiguous(memory_format=torch.channels_last)
            ho = (h + 2 * (k // 2) - k) // stride + 1
            mpc = co // g * k * k * ho * ho
            for keep in KEEPS:
                ctx.forced = random_masks({"p": ci}, n, keep, gen)
                with torch.inference_mode():
                    for _ in range(16):  # auto's tuning of this regime settles before any timing
                        dyn(x if n == 1 else xc)
                        if not dyn.tuning:
                            break

                def run_dyn(dyn=dyn, x=x if n == 1 else xc):  # the engine's layout rule (to_dynamic)
                    with torch.inference_mode():
                        return dyn(x)

                def dn(inp, dense=dense):
                    def f():
                        with torch.inference_mode():
                            return dense(inp)
                    return f

                t = time_alternating({"folded_nchw": dn(x), "folded_cl": dn(xc), "dynamic": run_dyn},
                                     args.pairs,
                                     threads, args.clock)
                kept = int(ctx.forced["p"].sum())
                theo = ci * mpc * n / (kept * mpc + n * (ci * h * h + ci))
                row = {"level": "layer", "model": model, "layer": name, "batch": n, "threads": threads,
                       "keep": keep, "flops_reduction": 1 - 1 / theo}
                finish_row(row, {k2: v for k2, v in t.items() if k2 != "dynamic"}, t["dynamic"], theo)
                run_dyn()
                row["strategy"] = dyn.last[0]
                if keep < 1.0:
                    row.update(sweep(run_dyn, lambda s, ctx=ctx: setattr(ctx, "strategy", s),
                                     (*SWEEP, "bucket"), threads, args.clock))
                frac = breakdown(dyn, x, run=run_dyn)  # x unused: run_dyn carries the input
                row["breakdown_ms"] = {k2: v * row["dynamic_ms"] for k2, v in frac.items()}
                rows.append(row)
                log(row)
    return rows


QUICK_THREADS2 = {"3x3 64->64 @56", "3x3 512->512 @7", "1x1 1024->256 @14", "dw3x3 192 @28", "3x3 64->64 @8"}


# ---------------------------------------------------------------- model level
def model_rows(args, threads: int, batches) -> list[dict]:
    rows = []
    models = [m for m in MODELS if not args.models or m[0] in args.models.split(",")]
    for name, size in models[:: 3 if args.quick else 1]:
        model = build_model(name).eval()
        rep = find_prune_points(model, torch.zeros(1, 3, size, size))
        plan = Plan(name, rep.fingerprint(), Plan.signature(rep), {n: 0.5 for n in rep.names()}, CFG)
        engine = to_dynamic(model, rep, plan)
        engine._ctx.forced_pays_saliency = True
        channels = {p.name: p.channels for p in rep.points}
        keeps = ((0.0,) if size == 32 else ()) + KEEPS  # 0.0: every point at its floor (min_keep)
        for n in batches:
            if args.quick and n > 1 and size > 32:
                continue
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(n, 3, size, size, generator=gen)
            dense = dense_candidates(model, rep, x)
            pick = time_alternating(dense, 2 if n == 1 else 1, threads, args.clock, min_seconds=0.02)
            best = min(pick, key=lambda k: med(pick[k]))  # the fastest dense form, once per (model, batch)
            for keep in keeps:
                engine.forced = random_masks(channels, n, keep, gen)
                warm = engine.warmup(x)  # auto's tuning of this regime settles before any timing

                def run_dyn(engine=engine, x=x):
                    return engine(x)

                fns = {best: dense[best], "dynamic": run_dyn}
                if keep == 1.0:  # the same engine with the saliency skipped: what the saliency costs
                    def no_sal(engine=engine, x=x):
                        engine._ctx.forced_pays_saliency = False
                        try:
                            return engine(x)
                        finally:
                            engine._ctx.forced_pays_saliency = True
                    fns["no_saliency"] = no_sal
                t = time_alternating(fns, args.pairs, threads, args.clock, min_seconds=0.02)
                engine(x)
                s = engine.summary()
                row = {"level": "model", "model": name, "batch": n, "threads": threads, "keep": keep,
                       "warmup_calls": warm, "points": len(channels), "strategy": s["strategies"],
                       "flops_reduction": s["flops_reduction"],
                       "executed_flops_reduction": s["executed_flops_reduction"]}
                finish_row(row, {best: t[best]}, t["dynamic"], s["theoretical_speedup"])
                row["dense_candidates_ms"] = {k: med(v) for k, v in pick.items()}
                if "no_saliency" in t:
                    row["no_saliency_ms"] = med(t["no_saliency"])
                swept = n == 1 or size == 32 or name == "mobilenet_v2" or keep == 0.5
                if 0.0 < keep < 1.0 and swept and threads == 1:
                    row.update(sweep(run_dyn, lambda st, e=engine: setattr(e, "strategy", st), SWEEP, threads,
                                     args.clock, rounds=2 if n > 1 and size > 32 else 5))
                frac = breakdown(engine, x, reps=3 if n == 1 else 1)
                row["breakdown_ms"] = {k: v * row["dynamic_ms"] for k, v in frac.items()}
                rows.append(row)
                log(row)
    return rows


# ---------------------------------------------------------------- predicted gates
GATE_MODELS = [("resnet18", 224), ("resnet50", 224), ("mobilenet_v2", 224), ("resnet20", 32), ("resnet56", 32)]
GATE_KEEPS = (1.0, 0.5, 0.3)
GATE_CFG = GateConfig(selection="topk", multiplier="hard")


def topk_masks(gates, n: int, keep: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per image, k = max(floor, round(keep * C)) channels of each gate drawn independently (top-k budgets)."""
    out = {}
    for s in gates:
        c = s.channels
        k = max(GATE_CFG.floor(c), min(c, round(keep * c)))
        idx = torch.rand(n, c, generator=gen).argsort(1)[:, :k]
        out[s.name] = torch.zeros(n, c, dtype=torch.bool).scatter_(1, idx, True)
    return out


def _fastest(cands: dict, threads: int, clock: str, rounds: int) -> str:
    return fastest(cands, rounds, threads, clock, min_seconds=0.02)[0]


def gate_rows(args, threads: int, batches) -> list[dict]:
    rows = []
    models = [m for m in GATE_MODELS if not args.models or m[0] in args.models.split(",")]
    for name, size in models:
        model = build_model(name).eval()
        x0 = torch.zeros(1, 3, size, size)
        gates = find_gates(model, x0)
        attach_predictors(model, gates, GATE_CFG)  # open predictors: the masks are forced, the cost is paid
        points = find_prune_points(model, x0)
        for n in batches:
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(n, 3, size, size, generator=gen)
            dense = dense_candidates(model, points, x)
            best = _fastest(dense, threads, args.clock, 2 if n == 1 else 1)
            for keep in args.keeps:
                keeps = dict.fromkeys(gates.names(), keep)
                gplan = GatePlan(GATE_CFG, tuple(gates.sites), keeps, {}, gates.dense_macs)
                plan = Plan(name, points.fingerprint(), Plan.signature(points), {}, gates=gplan)
                engine = to_dynamic(model, points, plan)
                engine._ctx.forced_pays_predictor = True
                # keep 1.0: the engine's own top-k keeps every channel and skips the predictors (what a top-k
                # plan at 1.0 runs); ``predictors_ms`` times the same engine with them computed
                engine.forced = topk_masks(gates, n, keep, gen) if keep < 1.0 else None
                slim = slim_gates(model, gates, keeps, GATE_CFG.min_keep)
                slim_c = dense_candidates(slim, find_prune_points(slim, x0), x)
                sbest = _fastest(slim_c, threads, args.clock, 2 if n == 1 else 1)
                with num_threads(threads):
                    t0 = time.perf_counter()
                    engine.warmup(x)  # a batch's policy is tuned on its first call, before any timing
                    warm = time.perf_counter() - t0

                def run_dyn(engine=engine, x=x):
                    return engine(x)

                fns = {"dense": dense[best], "slim": slim_c[sbest], "dynamic": run_dyn}
                if keep == 1.0:
                    open_masks = topk_masks(gates, n, 1.0, gen)

                    def with_predictors(engine=engine, x=x, masks=open_masks):
                        engine.forced = masks
                        try:
                            return engine(x)
                        finally:
                            engine.forced = None
                    fns["predictors"] = with_predictors
                t = time_alternating(fns, args.pairs, threads, args.clock, min_seconds=0.02)
                with num_threads(threads):
                    engine(x)  # the regime timed above (its tuned policy)
                s = engine.summary()
                slim_macs = float(engine.instance_macs().mean())
                row = {"level": "model", "method": "gate", "model": name, "batch": n, "threads": threads,
                       "keep": keep, "gates": len(gates), "selection": "topk (forced, independent per image)",
                       "strategy": s["strategies"], "flops_reduction": s["flops_reduction"],
                       "executed_flops_reduction": s["executed_flops_reduction"],
                       "slim_variant": sbest, "slim_ms": med(t["slim"]),
                       "slim_theoretical_speedup": s["dense_macs"] / slim_macs, "warmup_s": round(warm, 2)}
                finish_row(row, {best: t["dense"]}, t["dynamic"], s["theoretical_speedup"])
                row["slim_speedup"] = row["dense_ms"] / row["slim_ms"]
                if "predictors" in t:
                    row["predictors_ms"] = med(t["predictors"])
                row["ratio_to_slim"] = row["dynamic_ms"] / row["slim_ms"]
                if engine.tuned:
                    (key, tuned), = ((k, v) for k, v in engine.tuned.items() if k[0] == n and k[2] == threads)
                    row["tuned_ms"] = {k: 1e3 * v for k, v in tuned.items()}
                    pol = engine._policies[key]
                    row["policy"] = f"{pol[0]}/{'cl' if pol[1] else 'nchw'}"
                else:
                    row["policy"] = "auto/nchw"
                frac = breakdown(engine, x, reps=3 if n == 1 else 1)
                row["breakdown_ms"] = {k: v * row["dynamic_ms"] for k, v in frac.items()}
                rows.append(row)
                log(row)
                del engine, slim, slim_c
    return rows


# ---------------------------------------------------------------- real plans on real images
def _path(arg: str) -> Path:
    p = Path(arg)
    return p if p.is_absolute() else ROOT / p


def _rel(p: Path) -> str:
    try:
        return os.path.relpath(p, ROOT)
    except ValueError:
        return str(p)


def real_data(args) -> tuple[object, object, str, str]:
    """(calibration set, timed set, their descriptions): the timed images are a stratified subset of the test
    split; calibration uses the train split, or (absent) test images disjoint from the timed ones."""
    from instaprune.data.datasets import load_dataset
    from instaprune.models import default_preprocessing

    pre = default_preprocessing("resnet20")
    test_dir, train_dir = _path(args.cifar_test), _path(args.cifar_train)
    test = load_dataset(test_dir, size=pre.input_size, resize=pre.resize)
    rest, timed = test.split(args.timed_images, seed=0)
    timed_note = f"{len(timed)} images of the CIFAR-10 test split ({_rel(test_dir)}), stratified, seed 0"
    if train_dir.is_dir():
        _, calib = load_dataset(train_dir, size=pre.input_size, resize=pre.resize).split(args.calib_images, 0)
        note = f"{len(calib)} images of the CIFAR-10 train split ({_rel(train_dir)}), stratified, seed 0"
    else:
        _, calib = rest.split(args.calib_images, seed=1)
        note = (f"FALLBACK (no train split at {_rel(train_dir)}): {len(calib)} test-split images disjoint "
                "from the timed ones")
    return calib, timed, note, timed_note


def real_rows(args) -> list[dict]:
    from instaprune.data.datasets import iterate_batches
    from instaprune.method.calibration import CalibrationConfig, calibrate
    from instaprune.models import default_preprocessing
    from instaprune.training.checkpoint import load_weights

    rows: list[dict] = []
    if not _path(args.cifar_test).is_dir():
        log({"skipped": f"no CIFAR test data at {args.cifar_test}"})
        return rows
    pre = default_preprocessing("resnet20")
    calib, timed, calib_note, timed_note = real_data(args)
    n_timed = min(100 if args.quick else args.timed_images, len(timed))
    xy = [(x, y) for x, y, _ in iterate_batches(timed, 500, pre.mean, pre.std)]
    x_all, y_all = torch.cat([x for x, _ in xy])[:n_timed], torch.cat([y for _, y in xy])[:n_timed]
    batches = [(x, y) for x, y, _ in iterate_batches(calib, 250, pre.mean, pre.std)]
    for name, ckpt in (("resnet20", _path(args.checkpoint_resnet20)), ("resnet56", _path(args.checkpoint_resnet56))):
        if not ckpt.is_file():
            log({"skipped": f"{name}: no checkpoint at {_rel(ckpt)}"})
            continue
        model = build_model(name).eval()
        load_weights(model, ckpt)
        rep = find_prune_points(model, torch.zeros(1, 3, 32, 32))
        t0 = time.perf_counter()
        plan = calibrate(model, rep, batches, CalibrationConfig(target=0.5, search="shared", thresholds=CFG),
                         model_name=name)
        base = {"level": "model-real", "model": name, "keep": None, "plan_target": 0.5,
                "checkpoint": _rel(ckpt), "calibration_data": calib_note, "timed_data": timed_note,
                "calibration_s": round(time.perf_counter() - t0, 1),
                "calibration": plan.calibration["results"]["shared"]}
        engine = to_dynamic(model, rep, plan)
        ref = MaskedModel(model, rep, plan.taus, plan.thresholds, record_masks=True)
        with torch.no_grad():
            ref_logits = ref(x_all)
        ref_masks = ref.masks
        ref.remove()
        dyn_logits = engine(x_all)  # the engine's own masks vs the reference's, on real images
        base["flips"] = sum(int((engine.last_masks()[k] != ref_masks[k]).sum()) for k in ref_masks)
        base["channel_decisions"] = sum(int(m.numel()) for m in ref_masks.values())
        base["top1_reference"] = float((ref_logits.argmax(1) == y_all).float().mean())
        base["top1_engine"] = float((dyn_logits.argmax(1) == y_all).float().mean())
        base["top1_dense"] = float((_inf(model, x_all).argmax(1) == y_all).float().mean())
        base["flops_reduction"] = engine.summary()["flops_reduction"]
        dense = dense_models(model, rep)
        theo, exe = [], []
        for i in range(n_timed):  # per-image accounting at batch 1 (what each timed call executes)
            engine(x_all[i:i + 1])
            s = engine.summary()
            theo.append(s["theoretical_speedup"])
            exe.append(s["executed_flops_reduction"])
        for threads in [int(t) for t in args.threads.split(",")]:
            one = x_all[:1]
            pick = time_alternating({k: (lambda f=f, one=one: f(one)) for k, f in dense.items()}, 3, threads,
                                    args.clock)
            best = min(pick, key=lambda k: med(pick[k]))
            lat = per_call_latency({"dense": dense[best], "dynamic": engine},
                                   [x_all[i:i + 1] for i in range(n_timed)], threads, args.clock)
            row = {**base, "batch": 1, "threads": threads, "images": n_timed, "dense_variant": best,
                   "dense_candidates_ms": {k: med(v) for k, v in pick.items()},
                   "dense_ms": lat["dense"]["mean"], "dynamic_ms": lat["dynamic"]["mean"],
                   "dense_latency_ms": lat["dense"], "dynamic_latency_ms": lat["dynamic"],
                   "theoretical_speedup": statistics.fmean(theo),
                   "executed_flops_reduction": statistics.fmean(exe)}
            row["measured_speedup"] = row["dense_ms"] / row["dynamic_ms"]
            row["efficiency"] = row["measured_speedup"] / row["theoretical_speedup"]
            row["time_ratio"] = row["dynamic_ms"] / row["dense_ms"]
            engine(one)
            row["strategy"] = engine.summary()["strategies"]
            frac = breakdown(engine, one)
            row["breakdown_ms"] = {k: v * row["dynamic_ms"] for k, v in frac.items()}
            rows.append(row)
            log(row)
            xb = x_all[:32]
            engine.warmup(xb)
            t = time_alternating({**{k: (lambda f=f, xb=xb: f(xb)) for k, f in dense.items()},
                                  "dynamic": lambda e=engine, xb=xb: e(xb)}, args.pairs, threads, args.clock)
            engine(xb)
            s = engine.summary()
            row32 = {**base, "batch": 32, "threads": threads, "strategy": s["strategies"],
                     "flops_reduction": s["flops_reduction"],
                     "executed_flops_reduction": s["executed_flops_reduction"]}
            finish_row(row32, {k: v for k, v in t.items() if k != "dynamic"}, t["dynamic"],
                       s["theoretical_speedup"])
            frac = breakdown(engine, xb)
            row32["breakdown_ms"] = {k: v * row32["dynamic_ms"] for k, v in frac.items()}
            rows.append(row32)
            log(row32)
    return rows


def _inf(model, x):
    with torch.inference_mode():
        return model(x)


#: where :func:`log` keeps every finished row of this run (``--out`` + ``.partial.json``), so an interrupted run
#: keeps its rows (``--merge`` takes the file; its meta says ``partial``)
_PARTIAL: dict = {}


def log(obj) -> None:
    if "level" in obj:
        obj["procs_running"] = procs_running()
        if _PARTIAL:
            _PARTIAL["rows"].append(obj)
            atomic_write_json(_PARTIAL["path"], {"meta": {**_PARTIAL["meta"], "partial": True},
                                                 "rows": _PARTIAL["rows"]})
    keys = ("level", "method", "model", "layer", "batch", "threads", "keep", "dense_ms", "slim_ms", "dynamic_ms",
            "efficiency", "ratio_to_slim", "policy", "auto_over_best", "skipped", "procs_running")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in obj.items() if k in keys}),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few rows, 3 pairs: a smoke test")
    ap.add_argument("--parts", default="layer,model,real", help="comma-separated: layer, model, gate, real")
    ap.add_argument("--models", default="", help="model-level rows for these models only (comma-separated)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--keeps", default=",".join(map(str, GATE_KEEPS)),
                    help="gate rows: kept fraction per gate (comma-separated)")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"])
    ap.add_argument("--all-threads", action="store_true", help="every layer shape at 2 threads too")
    for key, default in DEFAULTS.items():
        ap.add_argument("--" + key.replace("_", "-"), default=default, help=f"(default: {default}, relative to "
                        "the repository)")
    ap.add_argument("--calib-images", type=int, default=1000, help="real rows: calibration images")
    ap.add_argument("--timed-images", type=int, default=500, help="real rows: timed test images")
    ap.add_argument("--note", default="", help="recorded in the results (e.g. how the machine was kept quiet)")
    ap.add_argument("--out", default=str(ROOT / "results" / "engine_latency"))
    ap.add_argument("--render-only", action="store_true", help="re-render the .md and .png from the .json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine the rows of runs made part by part "
                    "(each keeps its own meta under meta.parts) into --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        # a file merged before (results/engine_latency.json) contributes the parts it was merged from
        metas = [m for r in runs for m in (r["meta"]["parts"] if "parts" in r["meta"] else [r["meta"]])]
        meta = {"command": " && ".join(m["command"] for m in metas),
                **{k: metas[0][k] for k in ("cpu", "torch", "cores")},
                "git_commits": sorted({m["git_commit"] for m in metas}),
                "date": max(m["date"] for m in metas), "pairs": min(m["pairs"] for m in metas),
                "max_procs_running": max(m.get("max_procs_running", 0) for m in metas),
                "loaded": any(m.get("loaded") for m in metas), "parts": metas}
        keyed: dict[tuple, dict] = {}  # a row measured again in a later part replaces the earlier one
        for row in (row for r in runs for row in r["rows"]):
            keyed[tuple(row.get(k) for k in ("level", "method", "model", "layer", "batch", "threads",
                                             "keep"))] = row
        rows = list(keyed.values())
        atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})
        args.render_only = True
    if args.render_only:
        data = json.loads(out.with_suffix(".json").read_text())
        print("wrote " + ", ".join(map(str, _write_reports(data["meta"], data["rows"], out))))
        return 0
    if args.quick:
        args.pairs = min(args.pairs, 3)
    elif args.pairs < 7:
        ap.error("--pairs must be >= 7 (use --quick for a smoke test)")
    parts = args.parts.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    try:
        args.keeps = [float(k) for k in args.keeps.split(",")]
    except ValueError:
        ap.error(f"--keeps: not a comma-separated list of numbers: {args.keeps!r}")
    if any(not 0 < k <= 1 for k in args.keeps):
        ap.error("--keeps: every kept fraction must be in (0, 1]")
    start = time.time()
    meta = run_meta("engine_latency.py", argv if argv is not None else sys.argv[1:],
                    config={k: v for k, v in vars(args).items() if k not in ("merge", "render_only")},
                    pairs=args.pairs, clock={t: clock_for(t, args.clock) for t in threads},
                    load_avg=list(os.getloadavg()))
    meta["git_commit"] = meta.pop("commit")
    meta["load_avg_at_start"] = meta.pop("load_avg")
    rows: list[dict] = []
    _PARTIAL.update(path=out.with_suffix(".partial.json"), meta=meta, rows=[])
    for t in threads:
        if "layer" in parts:
            rows += layer_rows(args, t, batches)
        if "model" in parts:
            rows += model_rows(args, t, batches)
        if "gate" in parts:
            rows += gate_rows(args, t, batches)
    if "real" in parts:
        rows += real_rows(args)
    meta["load_avg_at_end"] = list(os.getloadavg())
    meta["elapsed_s"] = round(time.time() - start, 1)
    meta["max_procs_running"] = max((r.get("procs_running", 0) for r in rows), default=0)
    # other processes competed for the cores (runnable processes beyond this run's threads, or a load average
    # above them at the start): the report then says so above every table
    meta["loaded"] = (meta["max_procs_running"] > max(threads) + 1
                      or meta["load_avg_at_start"][0] > max(threads) + 0.5)
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    _PARTIAL["path"].unlink(missing_ok=True)
    _PARTIAL.clear()
    print("wrote " + ", ".join(map(str, [out.with_suffix(".json"), *_write_reports(meta, rows, out)])))
    return 0


def _write_reports(meta: dict, rows: list[dict], out: Path) -> list[Path]:
    """The markdown report and plot beside ``out``; README's gate table too when ``out`` is the committed
    results file (a run into another path never touches README)."""
    md, png = render(meta, rows, out)
    written = [atomic_write_text(out.with_suffix(".md"), md), png]
    readme = ROOT / "README.md"
    if out.resolve() == (ROOT / "results" / "engine_latency").resolve() and update_readme(readme, rows):
        written.append(readme)
    return written


def procs_running() -> int:
    """Runnable processes right now (``/proc/stat``; this benchmark included): > threads + 1 means other
    processes competed for the cores."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
