"""Layer-level latency of ``SparseInputConv2d`` strategies vs the dense conv (METHOD.md section 8).

For representative conv shapes of ResNet-18/50 and MobileNetV2 at 224x224 and of CIFAR ResNet-56, keep ratios
0.25/0.5/0.75/1.0 (each instance keeps exactly round(keep*C) channels drawn independently), batch 1 and 32,
threads 1 and 2: dense = the BN-folded conv in the faster of NCHW and channels_last; dynamic = each strategy
on NCHW input. Dense and dynamic are timed alternately in >= 7 pairs (torch.utils.benchmark.Timer),
medians kept.

    PYTHONPATH=src python benchmarks/kernel_latency.py [--quick] [--all-threads] [--clock wall|cpu]

Threads > 1 run the 5 ``QUICK`` shapes only unless ``--all-threads`` (keeps the run near 10 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from instaprune.io import atomic_write_json, atomic_write_text
from instaprune.kernels import SparseInputConv2d

# name, C_in, C_out, kernel, stride, H (input), groups
SHAPES = [
    ("r18 3x3 64->64 @56", 64, 64, 3, 1, 56, 1),
    ("r18 3x3 128->128 @28", 128, 128, 3, 1, 28, 1),
    ("r18 3x3 256->256 @14", 256, 256, 3, 1, 14, 1),
    ("r18 3x3 512->512 @7", 512, 512, 3, 1, 7, 1),
    ("r50 1x1 256->64 @56", 256, 64, 1, 1, 56, 1),
    ("r50 1x1 1024->256 @14", 1024, 256, 1, 1, 14, 1),
    ("r50 1x1 512->2048 @7", 512, 2048, 1, 1, 7, 1),
    ("mbv2 1x1 expand 32->192 @28", 32, 192, 1, 1, 28, 1),
    ("mbv2 dw3x3 192 @28", 192, 192, 3, 1, 28, 192),
    ("mbv2 1x1 project 192->32 @28", 192, 32, 1, 1, 28, 1),
    ("c56 3x3 16->16 @32", 16, 16, 3, 1, 32, 1),
    ("c56 3x3 64->64 @8", 64, 64, 3, 1, 8, 1),
]
QUICK = {
    "r18 3x3 64->64 @56",
    "r18 3x3 512->512 @7",
    "r50 1x1 1024->256 @14",
    "mbv2 dw3x3 192 @28",
    "c56 3x3 64->64 @8",
}
REF = "dense reference"  # key of the reference conv among the timed functions (not the "dense" strategy)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "auto": None}
KEEPS = (0.25, 0.5, 0.75, 1.0)
CORRELATED = ("r18 3x3 256->256 @14", "r50 1x1 1024->256 @14", "c56 3x3 64->64 @8")


def make_mask(n: int, c: int, keep: float, gen: torch.Generator, correlated: bool = False) -> torch.Tensor:
    k = max(1, round(keep * c))
    score = torch.rand(n, c, generator=gen)
    if correlated:  # a shared channel ranking plus per-instance noise (like real saliencies)
        score = torch.rand(1, c, generator=gen) + 0.15 * score
    top = score.topk(k, dim=1).indices
    return torch.zeros(n, c, dtype=torch.bool).scatter_(1, top, True)


def _number(fn, target_s: float) -> int:
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-6)
    return max(1, min(1000, int(target_s / dt)))


def timed_rounds(fns: dict, pairs: int, target_s: float, threads: int, clock=time.perf_counter) -> dict[str, float]:
    """Median ms of each function. ``fns[REF]`` is the dense reference; every round times dense and each dynamic
    strategy once, the order rotated between rounds, so each dynamic timing has a dense timing next to it
    (``pairs`` rounds = ``pairs`` dense/dynamic pairs per strategy, with one shared dense per round)."""
    timers = {}
    for name, f in fns.items():
        t0 = time.perf_counter()
        f()  # warm-up, also sizes the number of calls per timing
        num = max(1, min(1000, int(target_s / max(time.perf_counter() - t0, 1e-6))))
        timers[name] = (Timer("f()", globals={"f": f}, num_threads=threads, timer=clock), num)
    names = list(fns)
    acc: dict[str, list[float]] = {n: [] for n in names}
    for r in range(pairs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            timer, num = timers[name]
            acc[name].append(timer.timeit(num).median * 1e3)
    return {n: statistics.median(v) for n, v in acc.items()}


def strategies_for(mask: torch.Tensor, correlated: bool) -> list[str]:
    """Strategies worth timing: ``union`` runs the very same ops as ``loop`` at batch 1 and as ``dense`` when
    the union covers every channel (independent masks at batch 32); ``bucket`` degenerates to ``loop`` when no
    two masks are close (independent masks). Those rows are not timed twice."""
    out = ["auto", "dense", "loop", "padded"]
    if (mask.shape[0] > 1 and not bool(mask.any(0).all())) or correlated:
        out.append("union")
    if correlated:
        out.append("bucket")
    return out


def dense_fn(ci, co, k, s, g, x, threads):
    """The faster of NCHW and channels_last for the plain (BN-folded) conv; returns (fn, format)."""
    w = torch.randn(co, ci // g, k, k)
    b = torch.randn(co)
    xc = x.contiguous(memory_format=torch.channels_last)
    wc = w.contiguous(memory_format=torch.channels_last)
    cands = {
        "nchw": lambda: F.conv2d(x, w, b, s, k // 2, 1, g),
        "channels_last": lambda: F.conv2d(xc, wc, b, s, k // 2, 1, g),
    }
    best = {}
    for name, f in cands.items():
        f()
        best[name] = Timer("f()", globals={"f": f}, num_threads=threads).blocked_autorange(min_run_time=0.05).median
    fmt = min(best, key=best.__getitem__)
    return cands[fmt], fmt, w, b


def run(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = []
    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK]
    quick = [s for s in SHAPES if s[0] in QUICK]
    t_start = time.time()
    for threads in args.threads:
        torch.set_num_threads(threads)
        clock = args.clock if args.clock != "auto" else ("cpu" if threads == 1 else "wall")
        clock_fn = CLOCKS[clock]
        for batch in args.batches:
            for name, ci, co, k, s, h, g in shapes if threads == 1 or args.all_threads else quick:
                x = torch.randn(batch, ci, h, h, generator=gen)
                dfn, fmt, w, b = dense_fn(ci, co, k, s, g, x, threads)
                mod = SparseInputConv2d(w, b, stride=s, padding=k // 2, groups=g)
                kinds = [("independent", False)] + (
                    [("correlated", True)] if batch > 1 and name in CORRELATED and threads == 1 else []
                )
                for mask_kind, corr in kinds:
                    for keep in KEEPS if not corr else (0.5,):
                        mask = make_mask(batch, ci, keep, gen, corr)
                        keep_real = mask.sum().item() / mask.numel()
                        strategies = strategies_for(mask, corr)
                        auto_pick = mod.pick(mask, (h, h))
                        fns = {REF: dfn}
                        for st in strategies:
                            fns[st] = lambda st=st, mask=mask, mod=mod, x=x: mod(x, mask, st)
                        ms = timed_rounds(fns, args.pairs, args.target_s, threads, clock_fn)
                        theo = 1.0 / keep_real
                        for st in strategies:
                            d_ms, y_ms = ms[REF], ms[st]
                            rows.append(
                                {
                                    "shape": name,
                                    "c_in": ci,
                                    "c_out": co,
                                    "kernel": k,
                                    "stride": s,
                                    "hw": h,
                                    "groups": g,
                                    "batch": batch,
                                    "threads": threads,
                                    "keep": keep,
                                    "keep_actual": round(keep_real, 4),
                                    "k_max": int(mask.sum(1).max()),
                                    "union": int(mask.any(0).sum()),
                                    "masks": mask_kind,
                                    "strategy": st,
                                    "auto_pick": auto_pick,
                                    "dense_format": fmt,
                                    "clock": clock,
                                    "dense_ms": round(d_ms, 4),
                                    "dynamic_ms": round(y_ms, 4),
                                    "measured_speedup": round(d_ms / y_ms, 4),
                                    "theoretical_speedup": round(theo, 4),
                                    "efficiency": round(d_ms / y_ms / theo, 4),
                                }
                            )
                        best = min(
                            (r for r in rows[-len(strategies) :] if r["strategy"] != "auto"),
                            key=lambda r: r["dynamic_ms"] / r["dense_ms"],
                        )
                        auto = rows[-len(strategies)]
                        print(
                            f"[{time.time() - t_start:6.0f}s] t{threads} b{batch} {name:30s} {mask_kind[:4]} "
                            f"keep {keep:.2f} auto={auto_pick:6s} eff {auto['efficiency']:.2f} | best "
                            f"{best['strategy']:6s} eff {best['efficiency']:.2f}",
                            file=sys.stderr,
                            flush=True,
                        )
    return {"rows": rows, "elapsed_s": round(time.time() - t_start, 1)}


def summarize(rows: list[dict]) -> tuple[list[dict], str]:
    """Per (shape, batch, threads, keep, masks): auto vs best strategy; markdown table of efficiencies."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["batch"], r["threads"], r["keep"], r["masks"]), []).append(r)
    summary = []
    for key, rs in groups.items():
        auto = next(r for r in rs if r["strategy"] == "auto")
        others = [r for r in rs if r["strategy"] != "auto"]
        best = min(others, key=lambda r: r["dynamic_ms"] / r["dense_ms"])
        ratio = (auto["dynamic_ms"] / auto["dense_ms"]) / (best["dynamic_ms"] / best["dense_ms"])
        summary.append(
            {
                "shape": key[0],
                "batch": key[1],
                "threads": key[2],
                "keep": key[3],
                "masks": key[4],
                "auto_pick": auto["auto_pick"],
                "auto_efficiency": auto["efficiency"],
                "best_strategy": best["strategy"],
                "best_efficiency": best["efficiency"],
                "auto_vs_best": round(ratio, 3),
                **{f"eff_{r['strategy']}": r["efficiency"] for r in others},
            }
        )
    lines = [
        "| shape | batch | thr | masks | keep | auto pick | auto eff | best | best eff | auto/best time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['shape']} | {s['batch']} | {s['threads']} | {s['masks']} | {s['keep']} | {s['auto_pick']} "
            f"| {s['auto_efficiency']:.2f} | {s['best_strategy']} | {s['best_efficiency']:.2f} "
            f"| {s['auto_vs_best']:.2f} |"
        )
    pivot = ["", "Efficiency (measured / theoretical speedup) of ``auto``, independent masks:", ""]
    cols = sorted({(s["batch"], s["threads"], s["keep"]) for s in summary if s["masks"] == "independent"})
    pivot.append("| shape | " + " | ".join(f"b{b} t{t} k{k}" for b, t, k in cols) + " |")
    pivot.append("|---" * (len(cols) + 1) + "|")
    by = {(s["shape"], s["batch"], s["threads"], s["keep"]): s for s in summary if s["masks"] == "independent"}
    for shape in dict.fromkeys(s["shape"] for s in summary):
        cells = [by.get((shape, *c)) for c in cols]
        pivot.append(f"| {shape} | " + " | ".join(f"{c['auto_efficiency']:.2f}" if c else "" for c in cells) + " |")
    within = sum(s["auto_vs_best"] <= 1.10 for s in summary)
    pivot += ["", f"auto within 10% of the best measured strategy in {within} of {len(summary)} rows.", ""]
    return summary, "\n".join(pivot + ["All rows:", ""] + lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 shapes only")
    ap.add_argument(
        "--all-threads", action="store_true", help="every shape at every thread count (default: 5 shapes beyond 1)"
    )
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--target-s", type=float, default=0.01, help="seconds per single timing (>= 1 call)")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="auto",
        help="wall time, process CPU time (robust on a loaded machine; meaningful for 1 thread only), or auto: "
        "CPU time at 1 thread, wall time above",
    )
    ap.add_argument("--out", default="results/kernel_latency.json")
    args = ap.parse_args()
    res = run(args)
    summary, table = summarize(res["rows"])
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "git_commit": commit or None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": res["elapsed_s"],
        "pairs": args.pairs,
        "clock": args.clock,
        "load_avg_at_end": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"meta": meta, "summary": summary, "rows": res["rows"]})
    atomic_write_text(out.with_suffix(".md"), f"# Kernel latency\n\n{json.dumps(meta)}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
