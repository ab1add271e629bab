"""Latency of the fast dynamic engine (``instaprune.engine``) against the fastest honest dense model.

Rows (``results/engine_latency.json``, key ``rows``):

- ``layer``: one consumer conv (BN folded, ReLU fused) of ResNet-18/50 and MobileNetV2 at 224x224 and CIFAR
  ResNet-56 at 32x32; dynamic = saliency + threshold + sparse conv (``DynamicConv2d``) with masks forced to
  keep exactly round(keep*C) channels per instance, drawn independently (the saliency is still computed
  and paid), on the layout ``to_dynamic`` uses (NCHW at batch 1, channels_last above); dense = the
  folded conv, the faster of NCHW and channels_last.
- ``model``: whole networks, every prune point selected, the same kind of forced masks; dense = the fastest
  of {eager, BN-folded} x {NCHW, channels_last}; dynamic = ``to_dynamic`` (NCHW engine, ``auto`` strategy).
- ``model-real``: CIFAR ResNet-20/56 with their public checkpoints, a plan calibrated (shared tau, target
  FLOPs reduction 0.5) on 1000 test images and timed on 500 others (the engine computes its own masks):
  per-image latency p50/p90/p99 at batch 1, per-batch time at batch 32, flips against the reference.

Dense and dynamic alternate in ``--pairs`` rounds (>= 7) of ``torch.utils.benchmark.Timer``; medians are
kept. Each row also times every forced strategy briefly (3 rounds) to check ``auto`` against the best, and
profiles the dynamic forward for a saliency / gather / conv / other breakdown.

    PYTHONPATH=src python benchmarks/engine_latency.py [--quick] [--parts layer,model,real] [--clock auto]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from instaprune.engine import to_dynamic
from instaprune.engine_bench import (
    breakdown,
    clock_for,
    dense_candidates,
    dense_models,
    machine,
    per_call_latency,
    time_alternating,
)
from instaprune.engine_modules import DynamicConv2d, EngineContext, FoldedConv2d
from instaprune.io import atomic_write_json, atomic_write_text
from instaprune.kernels import SparseInputConv2d, fold_bn
from instaprune.masked import MaskedModel, ThresholdConfig
from instaprune.models import build_model
from instaprune.plan import Plan
from instaprune.points import find_prune_points

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHECKPOINTS = {"resnet20": SHARED / "models" / "resnet20-cifar10.th",
               "resnet56": ROOT / ".data" / "models" / "resnet56-cifar10.th"}
CIFAR_TEST = SHARED / "data" / "cifar10-test-jpeg"
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
    for name, size in MODELS[:: 3 if args.quick else 1]:
        model = build_model(name).eval()
        rep = find_prune_points(model, torch.zeros(1, 3, size, size))
        plan = Plan(name, rep.fingerprint(), Plan.signature(rep), {n: 0.5 for n in rep.names()}, CFG)
        engine = to_dynamic(model, rep, plan)
        engine._ctx.forced_pays_saliency = True
        channels = {p.name: p.channels for p in rep.points}
        for n in batches:
            if args.quick and n > 1 and size > 32:
                continue
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(n, 3, size, size, generator=gen)
            dense = dense_candidates(model, rep, x)
            for keep in KEEPS:
                engine.forced = random_masks(channels, n, keep, gen)

                def run_dyn(engine=engine, x=x):
                    return engine(x)

                if keep == KEEPS[0]:  # the fastest dense form, chosen once per (model, batch, threads)
                    pick = time_alternating(dense, 2 if n == 1 else 1, threads, args.clock, min_seconds=0.02)
                    best = min(pick, key=lambda k: med(pick[k]))
                t = time_alternating({best: dense[best], "dynamic": run_dyn}, args.pairs, threads, args.clock,
                                     min_seconds=0.02)
                s = engine.summary()
                row = {"level": "model", "model": name, "batch": n, "threads": threads, "keep": keep,
                       "strategy": s["strategies"], "flops_reduction": s["flops_reduction"],
                       "executed_flops_reduction": s["executed_flops_reduction"]}
                finish_row(row, {best: t[best]}, t["dynamic"], s["theoretical_speedup"])
                row["dense_candidates_ms"] = {k: med(v) for k, v in pick.items()}
                swept = n == 1 or size == 32 or name == "mobilenet_v2" or keep == 0.5
                if keep < 1.0 and swept and threads == 1:
                    row.update(sweep(run_dyn, lambda st, e=engine: setattr(e, "strategy", st), SWEEP, threads,
                                     args.clock, rounds=2 if n > 1 and size > 32 else 5))
                frac = breakdown(engine, x, reps=3 if n == 1 else 1)
                row["breakdown_ms"] = {k: v * row["dynamic_ms"] for k, v in frac.items()}
                rows.append(row)
                log(row)
    return rows


# ---------------------------------------------------------------- real plans on real images
def real_rows(args) -> list[dict]:
    from instaprune.calibrate import CalibrationConfig, calibrate
    from instaprune.checkpoint import load_weights
    from instaprune.data import iterate_batches, load_dataset
    from instaprune.models import default_preprocessing

    rows: list[dict] = []
    if not CIFAR_TEST.is_dir():
        log({"skipped": f"no CIFAR test data at {CIFAR_TEST}"})
        return rows
    pre = default_preprocessing("resnet20")
    data = load_dataset(CIFAR_TEST, size=pre.input_size, resize=pre.resize)
    _, held = data.split(1500, seed=0)
    calib, timed = held.split(500, seed=1)  # 1000 images calibrate, 500 others are timed
    n_timed = 100 if args.quick else 500
    x_all = torch.cat([x for x, _, _ in iterate_batches(timed, 500, pre.mean, pre.std)])[:n_timed]
    y_all = torch.cat([y for _, y, _ in iterate_batches(timed, 500, pre.mean, pre.std)])[:n_timed]
    for name, ckpt in CHECKPOINTS.items():
        if not ckpt.is_file():
            log({"skipped": f"{name}: no checkpoint at {ckpt}"})
            continue
        model = build_model(name).eval()
        load_weights(model, ckpt)
        rep = find_prune_points(model, torch.zeros(1, 3, 32, 32))
        batches = [(x, y) for x, y, _ in iterate_batches(calib, 250, pre.mean, pre.std)]
        t0 = time.perf_counter()
        plan = calibrate(model, rep, batches, CalibrationConfig(target=0.5, search="shared", thresholds=CFG),
                         model_name=name)
        base = {"level": "model-real", "model": name, "keep": None, "plan_target": 0.5,
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
        for threads in (1, 2):
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


def log(obj) -> None:
    keys = ("level", "model", "layer", "batch", "threads", "keep", "dense_ms", "dynamic_ms", "efficiency",
            "auto_over_best", "skipped")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in obj.items() if k in keys}),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few rows, 3 pairs: a smoke test")
    ap.add_argument("--parts", default="layer,model,real")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"])
    ap.add_argument("--all-threads", action="store_true", help="every layer shape at 2 threads too")
    ap.add_argument("--out", default=str(ROOT / "results" / "engine_latency"))
    ap.add_argument("--render-only", action="store_true", help="re-render the .md and .png from the .json")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine the rows of runs made part by part "
                    "(each keeps its own meta under meta.parts) into --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        meta = {"parts": [r["meta"] for r in runs], **{k: runs[0]["meta"][k] for k in ("cpu", "torch", "cores")},
                "date": max(r["meta"]["date"] for r in runs), "pairs": min(r["meta"]["pairs"] for r in runs),
                "loaded": any(r["meta"].get("loaded") for r in runs),
                "load_avg_at_start": max((r["meta"]["load_avg_at_start"] for r in runs), key=lambda v: v[0]),
                "load_avg_at_end": max((r["meta"]["load_avg_at_end"] for r in runs), key=lambda v: v[0]),
                "command": " + ".join(r["meta"]["command"] for r in runs)}
        rows = [row for r in runs for row in r["rows"]]
        atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})
        args.render_only = True
    if args.render_only:
        data = json.loads(out.with_suffix(".json").read_text())
        md, png = render(data["meta"], data["rows"], out)
        atomic_write_text(out.with_suffix(".md"), md)
        print(f"wrote {out.with_suffix('.md')}, {png}")
        return 0
    if args.quick:
        args.pairs = min(args.pairs, 3)
    elif args.pairs < 7:
        ap.error("--pairs must be >= 7 (use --quick for a smoke test)")
    parts = args.parts.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    start = time.time()
    meta = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain", "-uno")),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "pairs": args.pairs, "clock": {t: clock_for(t, args.clock) for t in threads},
            "cpu": _cpu_name(), **machine()}
    meta["load_avg_at_start"] = meta.pop("load_avg")
    rows: list[dict] = []
    for t in threads:
        if "layer" in parts:
            rows += layer_rows(args, t, batches)
        if "model" in parts:
            rows += model_rows(args, t, batches)
    if "real" in parts:
        rows += real_rows(args)
    meta["load_avg_at_end"] = list(os.getloadavg())
    meta["elapsed_s"] = round(time.time() - start, 1)
    meta["loaded"] = max(meta["load_avg_at_start"][0], meta["load_avg_at_end"][0]) > 1.5
    atomic_write_json(out.with_suffix(".json"), {"meta": meta, "rows": rows})
    md, png = render(meta, rows, out)
    atomic_write_text(out.with_suffix(".md"), md)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {png}")
    return 0


# ---------------------------------------------------------------- report
def _f(v, nd: int = 2) -> str:
    return "" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _bd(r: dict) -> str:
    b = r.get("breakdown_ms") or {}
    return "/".join(f"{b.get(k, 0):.1f}" for k in ("saliency", "gather", "conv", "other"))


def _strat(r: dict) -> str:
    s = r.get("strategy")
    return " ".join(f"{k}:{v}" for k, v in s.items()) if isinstance(s, dict) else str(s)


def goals(rows: list[dict]) -> list[str]:
    out = []
    for n, goal in ((1, 0.75), (32, 0.6)):
        for r in rows:
            if r["level"] == "model" and r["model"] in ("resnet18", "resnet50") and r["batch"] == n \
                    and r["keep"] == 0.5:
                ok = "meets" if r["efficiency"] >= goal else "BELOW"
                out.append(f"- {r['model']} batch {n}, {r['threads']} thread(s), keep 0.5: efficiency "
                           f"{r['efficiency']:.2f} ({ok} the goal {goal}; measured "
                           f"{r['measured_speedup']:.2f}x of {r['theoretical_speedup']:.2f}x)")
    for level in ("model", "layer"):
        ratios = sorted(r["time_ratio"] for r in rows if r["level"] == level and r["keep"] == 1.0)
        if ratios:
            q3 = statistics.quantiles(ratios, n=4, method="inclusive")[2] if len(ratios) > 1 else ratios[0]
            verdict = "meets" if q3 <= 1.05 else "ABOVE"
            out.append(f"- keep 1.0, {level} level: upper quartile of dynamic/dense time ratios {q3:.3f} "
                       f"over {len(ratios)} rows ({verdict} the goal 1.05; max {ratios[-1]:.3f})")
    c56 = [r for r in rows if r["level"] == "model" and r["model"] == "resnet56" and r["keep"] == 0.5]
    for r in c56:
        out.append(f"- CIFAR ResNet-56 batch {r['batch']}, {r['threads']} thread(s), keep 0.5: efficiency "
                   f"{r['efficiency']:.2f}")
    swept = [r for r in rows if "auto_over_best" in r]
    if swept:
        ok = sum(r["auto_over_best"] <= 1.10 for r in swept)
        ok_med = sum(r["auto_over_best_median"] <= 1.10 for r in swept)
        out.append(f"- auto within 10% of the best strategy measured for the row: {ok} of {len(swept)} rows "
                   f"by minimum times ({ok_med} by medians)")
        for r in swept:
            if r["auto_over_best"] > 1.10:
                out.append(f"  - {r['level']} {r['model']} {r.get('layer', '')} batch {r['batch']} keep "
                           f"{r['keep']}: auto {r['auto_over_best']:.2f}x the best "
                           f"({r['best_strategy']}; auto ran {_strat(r)})")
    return out


def render(meta: dict, rows: list[dict], out: Path) -> tuple[str, Path]:
    lines = ["# Engine latency (instaprune.engine vs the fastest dense model)", "",
             "```", json.dumps(meta), "```", ""]
    if meta.get("loaded"):
        lines += [f"**The machine was loaded** (load average {meta['load_avg_at_start'][0]:.2f} at start, "
                  f"{meta['load_avg_at_end'][0]:.2f} at end, on {meta['cores']} cores): other processes "
                  "shared the cores; single-thread rows use CPU time (robust to preemption, not to cache "
                  "and memory "
                  "bandwidth contention), 2-thread rows use wall time and are the noisiest.", ""]
    lines += ["Efficiency = measured speedup / theoretical speedup (dense MACs / (mask-required MACs + "
              "saliency overhead)). Dense = fastest of eager and BN-folded, NCHW and channels_last, same "
              "threads. "
              "Breakdown columns: saliency/gather/conv/other in ms (profiler fractions scaled to the "
              "median).", "",
              "## Goals", "", *goals(rows), ""]
    head = "| model | batch | thr | keep | dense | dense ms | dyn ms | speedup | theor. | eff. | " \
           "exec. red. | strategies | sal/gath/conv/other ms | auto/best |"
    lines += ["## Model level (forced independent masks; saliency paid)", "", head, "|" + "---|" * 14]
    for r in (r for r in rows if r["level"] == "model"):
        lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {r['keep']} | {r['dense_variant']} | "
                     f"{_f(r['dense_ms'])} | {_f(r['dynamic_ms'])} | {_f(r['measured_speedup'])} | "
                     f"{_f(r['theoretical_speedup'])} | {_f(r['efficiency'])} | "
                     f"{_f(r.get('executed_flops_reduction'), 3)} | {_strat(r)} | {_bd(r)} | "
                     f"{_f(r.get('auto_over_best'))} |")
    real = [r for r in rows if r["level"] == "model-real"]
    if real:
        lines += ["", "## Real calibrated plans on real images (CIFAR-10 test JPEGs, engine computes its "
                  "masks)", "",
                  "| model | batch | thr | dense ms (p50/p90/p99) | dyn ms (p50/p90/p99) | speedup | "
                  "theor. | "
                  "eff. | FLOPs red. | exec. red. | flips / decisions | top-1 dense / ref / engine |",
                  "|" + "---|" * 12]
        for r in real:
            def pct(d):
                return "/".join(f"{d[k]:.2f}" for k in ("p50", "p90", "p99")) if d else ""
            dl = pct(r.get("dense_latency_ms")) or _f(r["dense_ms"])
            yl = pct(r.get("dynamic_latency_ms")) or _f(r["dynamic_ms"])
            lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {dl} | {yl} | "
                         f"{_f(r['measured_speedup'])} | {_f(r['theoretical_speedup'])} | "
                         f"{_f(r['efficiency'])} | {_f(r['flops_reduction'], 3)} | "
                         f"{_f(r.get('executed_flops_reduction'), 3)} | "
                         f"{r['flips']} / {r['channel_decisions']} | {r['top1_dense']:.3f} / "
                         f"{r['top1_reference']:.3f} / {r['top1_engine']:.3f} |")
    lines += ["", "## Layer level (one consumer conv; forced independent masks; saliency paid)", "",
              "| model | layer | batch | thr | keep | dense | dense ms | dyn ms | speedup | theor. | eff. "
              "| auto | best | auto/best | sal/gath/conv/other ms |", "|" + "---|" * 15]
    for r in (r for r in rows if r["level"] == "layer"):
        lines.append(f"| {r['model']} | {r['layer']} | {r['batch']} | {r['threads']} | {r['keep']} | "
                     f"{r['dense_variant']} | {_f(r['dense_ms'], 3)} | {_f(r['dynamic_ms'], 3)} | "
                     f"{_f(r['measured_speedup'])} | {_f(r['theoretical_speedup'])} | "
                     f"{_f(r['efficiency'])} | {r['strategy']} | {r.get('best_strategy', '')} | "
                     f"{_f(r.get('auto_over_best'))} | {_bd(r)} |")
    lines += ["", "## What limits the efficiency (mechanisms measured while building the engine)", "",
              *LIMITS]
    png = out.with_suffix(".png")
    _plot(rows, png)
    lines += ["", f"![efficiency]({png.name})", ""]
    return "\n".join(lines), png


LIMITS = [
    "- Saliency + threshold per prune point: the norm kernel itself is ~4 us on a 16x32x32 input, the whole "
    "mask step ~11 us in isolation and ~20-25 us inside the network (dispatch, numpy/torch transitions, "
    "cache and branch-predictor effects on the following conv). On CIFAR layers (50-110 us convs at batch "
    "1) this alone is 20-35 % of a layer: the floor of ResNet-20/56 at batch 1. At batch 32 the norm is "
    "memory-bound.",
    "- Work that does not shrink: adds, ReLUs, pads, pools and the un-pruned stem/shortcut/classifier "
    "(Amdahl); in CIFAR ResNets the element-wise ops are a quarter of the dense time at batch 1.",
    "- Convs on k gathered channels do not scale exactly with k: oneDNN blocks channels by 16 and reorders "
    "the (gathered, hence new) weights at every call; the output write and bias are fixed costs; PyTorch "
    "switches backend at 20480 input elements (the engine keeps the dense conv's backend).",
    "- Batches with independent masks: the union of 32 instances is nearly every channel, per-instance "
    "convs (loop) gather and reorder weights 32 times and lose oneDNN's batched efficiency, and the grouped "
    "conv of ``padded`` (groups = N) is slow in oneDNN; so executed MACs exceed the required ones "
    "(``exec. red.`` column) or per-MAC speed drops.",
    "- What lowers the floor: a fused saliency+threshold kernel in the producing conv's epilogue (one "
    "C++/inductor op instead of ~5 dispatches), graph capture of the static parts, fewer and larger prune "
    "points (the CV selection), bucketing instances whose masks correlate (real plans), and prepacked "
    "per-channel-block weights (no per-call reorder).",
    "- 2-thread rows: wall-clock time on a shared 2-core machine; with other processes running they mostly "
    "measure contention.",
]


def _plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, n in zip(axes, (1, 32), strict=True):
        for name, _ in MODELS:
            for t, style in ((1, "-o"), (2, "--s")):
                pts = sorted((r["keep"], r["efficiency"]) for r in rows if r["level"] == "model"
                             and r["model"] == name and r["batch"] == n and r["threads"] == t)
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{name} {t}t")
        ax.axhline(0.75 if n == 1 else 0.6, color="grey", lw=0.8, ls=":")
        ax.set_title(f"model level, batch {n}")
        ax.set_xlabel("keep ratio")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("efficiency (measured / theoretical speedup)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _git(*a: str) -> str:
    try:
        done = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
