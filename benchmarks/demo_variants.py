"""Demo schedule variants (issue 2's demo goals): the same generated data and recipe, one change at a time.

Each variant runs ``instaprune.demo.run_demo`` with a modified :class:`DemoSchedule` and writes its metrics to
``results/demo_variants/<variant>_s<seed>_t<threads>.json`` (schedule, recipe, command, commit, torch, cores,
date inside; the first four files, of session 6, predate the schedule/recipe fields: their overrides are the
variant's entry in ``VARIANTS``); the
markdown table ``results/demo_variants/demo_variants.md`` is regenerated from every JSON there.

    python benchmarks/demo_variants.py --variants default,one,one_nofc --threads 1
    python benchmarks/demo_variants.py --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from _common import ROOT, run_meta

OUT = ROOT / "results" / "demo_variants"

#: variant -> (what it changes, DemoSchedule overrides; the key ``recipe`` holds DemoRecipe overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "default": ("the post-hoc rule as shipped before gates (max mode, greedy search, controller off)",
                {"method": "posthoc"}),
    "gates": ("predicted gates, top-k (hard, no distillation, 8 epochs like the baseline branch)",
              {"method": "gates", "gates": {"selection": "topk"}}),
    "gates_thr": ("gates with per-image budgets (threshold selection), no static part: the demo until 2026-12-06",
                  {"method": "gates", "gates": {"selection": "threshold"}}),
    "gates_distill": ("gates (top-k) distilled from the pre-trained model (weight 0.5)",
                      {"method": "gates", "gates": {"selection": "topk", "distill": 0.5}}),
    "gates_thr_distill": ("gates, threshold selection, distillation 0.5",
                          {"method": "gates", "gates": {"selection": "threshold", "distill": 0.5}}),
    "gates_value_distill": ("gates, kept channels multiplied by g, distillation 0.5",
                            {"method": "gates", "gates": {"selection": "topk", "multiplier": "value", "distill": 0.5}}),
    "gates_value": ("gates, top-k, kept channels multiplied by g (the study's holdout choice on ResNet-20)",
                    {"method": "gates", "gates": {"selection": "topk", "multiplier": "value"}}),
    "gates_thr_value": ("gates, threshold selection, kept channels multiplied by g",
                        {"method": "gates", "gates": {"selection": "threshold", "multiplier": "value"}}),
    "gates_static_distill": ("half the target slimmed statically first, distillation 0.5",
                             {"method": "gates",
                              "gates": {"selection": "topk", "static_share": 0.5, "distill": 0.5}}),
    "gates_static": ("half the target slimmed statically first (static L1), then top-k gates; no distillation",
                     {"method": "gates", "gates": {"selection": "topk", "static_share": 0.5}}),
    "gates_static_thr": (("half the target slimmed statically first, threshold gates (per-image budgets), lr 0.05: "
                          "the demo until 2026-12-06"),
                         {"method": "gates", "gates": {"selection": "threshold", "static_share": 0.5}}),
    "gates_static_thr_lr01": ("half static, threshold gates (the demo until 2026-12-06), lr 0.1",
                              {"method": "gates", "gates": {"selection": "threshold", "static_share": 0.5, "lr": 0.1}}),
    "gates_static_thr_lr02": ("half static, threshold gates (the demo until 2026-12-06), lr 0.2",
                              {"method": "gates", "gates": {"selection": "threshold", "static_share": 0.5, "lr": 0.2}}),
    "gates_thr_lr01": ("threshold gates alone (no static part) at learning rate 0.1",
                       {"method": "gates", "gates": {"selection": "threshold", "lr": 0.1}}),
    "gates_static_thr_lr015": ("half static, threshold gates (the demo until 2026-12-06), lr 0.15",
                               {"method": "gates",
                                "gates": {"selection": "threshold", "static_share": 0.5, "lr": 0.15}}),
    "gates_static75_thr_lr01": ("three quarters static, threshold gates, lr 0.1: the shipped demo",
                                {"method": "gates",
                                 "gates": {"selection": "threshold", "static_share": 0.75, "lr": 0.1}}),
    "gates_static_thr_ramp06": ("half static, threshold gates, keep ramp over 60% of training (not 30%)",
                                {"method": "gates",
                                 "gates": {"selection": "threshold", "static_share": 0.5, "ramp": 0.6}}),
    "gates_static75": ("three quarters of the target slimmed statically first, then top-k gates; no distillation",
                       {"method": "gates", "gates": {"selection": "topk", "static_share": 0.32 / 0.42}}),
    "gates_w24_distill": ("gates on a wider network (width 24), distillation 0.5",
                          {"method": "gates", "recipe": {"width": 24},
                           "gates": {"selection": "topk", "distill": 0.5}}),
    "nofc": ("the classifier's input is not masked", {"exclude": ("fc",)}),
    "one": ("absolute thresholds (mode one)", {"threshold_mode": "one"}),
    "one_nofc": ("mode one, classifier input not masked", {"threshold_mode": "one", "exclude": ("fc",)}),
    "mean_nofc": ("mode mean, classifier input not masked", {"threshold_mode": "mean", "exclude": ("fc",)}),
    "ctl_nofc": ("FLOPs-target controller on in the prune-aware phase, classifier input not masked",
                 {"prune_aware_control": True, "exclude": ("fc",)}),
    "one_ctl_nofc": ("mode one, controller on, classifier input not masked",
                     {"threshold_mode": "one", "prune_aware_control": True, "exclude": ("fc",)}),
    "distill_nofc": ("the method branch also learns from the baseline branch's soft targets (weight 0.5, "
                     "fine-tune and prune-aware phases), classifier input not masked",
                     {"distill": 0.5, "exclude": ("fc",)}),
    "lam02_nofc": ("weaker feature decay (lambda 0.2 instead of 0.5), classifier input not masked",
                   {"recipe": {"decay_lam": 0.2}, "exclude": ("fc",)}),
    "w24_nofc": ("a wider network (width 24 instead of 16: 2.25x the MACs), classifier input not masked",
                 {"recipe": {"width": 24}, "exclude": ("fc",)}),
    "w32_nofc": ("a wider network (width 32 instead of 16: 4x the MACs), classifier input not masked",
                 {"recipe": {"width": 32}, "exclude": ("fc",)}),
    "distill_lam02_nofc": ("distillation 0.5 and lambda 0.2, classifier input not masked",
                           {"distill": 0.5, "recipe": {"decay_lam": 0.2}, "exclude": ("fc",)}),
}


def _sp(v: float | None) -> str:
    return "n/a (same FLOPs for every image)" if v is None else f"{v:+.2f}"


def write_table(out: Path = OUT) -> Path:
    from instaprune.core.io import atomic_write_text

    rows = ["# Demo schedule variants", "",
            "`python benchmarks/demo_variants.py`: `instaprune demo` (seed, threads as listed) with one schedule "
            "change (post-hoc rule unless the variant says gates); goal: top1 within 1 point of baseline_top1 at "
            ">= 40% FLOPs reduction, p90/p10 >= 1.3.", "",
            "| variant | what | seed | threads | baseline | dense | top1 | drop (points) | reduction | p90/p10 "
            "| Spearman(difficulty, FLOPs) | s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(out.glob("*.json")):
        r = json.loads(f.read_text())
        m = r["metrics"]
        sp = m.get("per_image_flops_p90_over_p10")
        rows.append(f"| {r['variant']} | {VARIANTS.get(r['variant'], ('?',))[0]} | {r['seed']} | "
                    f"{r['meta']['threads']} | {m['baseline_top1']:.4f} | {m['dense_top1']:.4f} | {m['top1']:.4f} | "
                    f"{100 * (m['baseline_top1'] - m['top1']):+.2f} | {m['flops_reduction']:.3f} | "
                    f"{'' if sp is None else f'{sp:.2f}'} | {_sp(m.get('spearman_difficulty_flops'))} "
                    f"| {m['seconds']:.0f} |")
    return atomic_write_text(out / "demo_variants.md", "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="default", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        print(f"demo_variants: unknown variant(s) {', '.join(bad)}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if not a.table_only:
        import torch

        from instaprune.core.io import atomic_write_json
        from instaprune.demo.run import DEMO_RECIPE, DemoSchedule, run_demo

        torch.set_num_threads(a.threads)
        OUT.mkdir(parents=True, exist_ok=True)
        for v in names:
            over = {"method": "posthoc", **VARIANTS[v][1]}  # variants without a method are the post-hoc rule's
            recipe = replace(DEMO_RECIPE, **over.pop("recipe", {}))
            base = DemoSchedule()
            if "gates" in over:
                # a variant names its static part and lr; none means none and 0.05 (the gated branch's lr until
                # 2026-12-06), so that every variant reproduces as recorded whatever the shipped defaults
                over["gates"] = replace(base.gates, **{"static_share": 0.0, "lr": 0.05, **over["gates"]})
            sched = replace(base, **over)
            with tempfile.TemporaryDirectory() as tmp:
                m = run_demo(tmp, seed=a.seed, schedule=sched, recipe=recipe)
            atomic_write_json(OUT / f"{v}_s{a.seed}_t{a.threads}.json",
                              {"variant": v, "seed": a.seed, "metrics": {k: m.get(k) for k in m if not
                                                                         isinstance(m.get(k), (list, dict))},
                               "schedule": asdict(sched), "recipe": m.get("recipe"),
                               "meta": run_meta("demo_variants.py", argv, threads=a.threads)})
    write_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
