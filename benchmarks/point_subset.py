"""Side study of the CIFAR-10 study: is a point set's score in its trained weights or in the points themselves?

On ResNet-56 at 60% FLOPs reduction the random-points ablation (44 of 55 points, its own prune-aware phase) scored
0.693 on the test split, above the method's all-points row (0.584). This script swaps the two rows' weights and point
sets and recalibrates each pair to the same target on the same holdout (``instaprune calibrate --select plan:...``),
then evaluates on the test split:

- ``allw_randpts``: the all-points row's weights, masked only at the random row's points;
- ``randw_allpts``: the random row's weights, masked at all points;
- ``allw_nolinear``: the all-points plan without its classifier-input point (not recalibrated: that point's MACs
  are 0.0005% of the model), since the random draw left the classifier input out.

If the swapped rows follow their weights, the gap is learnt in the prune-aware phase; if they follow the points,
it is in where the masks are.

    python benchmarks/point_subset.py --model resnet56 --target 0.6
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import yaml

from _common import ROOT, Stage, run_meta, run_stage

TEST = "../shared/data/cifar10-test-jpeg"


def _calibrate_args(cfg: dict, model: str, checkpoint: Path, plan: Path) -> list[str]:
    return ["calibrate", "--model", model, "--data-path", cfg["data_path"], "--holdout", str(cfg["holdout"]),
            "-b", "256", "--target", str(cfg["target"]), "--mode", cfg["mode"], "--search", cfg["search"],
            "--min-keep", str(cfg["min_keep"]), "--tolerance", str(cfg["tolerance"]), "--checkpoint",
            str(checkpoint), "--select", f"plan:{plan}"]


def _evaluate_args(model: str, checkpoint: Path, plan: Path, baseline: Path) -> list[str]:
    return ["evaluate", "--model", model, "--data-path", TEST, "--checkpoint", str(checkpoint), "--plan", str(plan),
            "--baseline-checkpoint", str(baseline)]


def _cell(name: str, out: Path, model: str, weights: Path, plan: Path, baseline: Path, cfg: dict | None) -> None:
    """Recalibrate ``weights`` on ``plan``'s points (when ``cfg`` is given), then evaluate on the test split."""
    if cfg is not None:
        cal = Stage(f"{name}_cal", _calibrate_args(cfg, model, weights, plan), out / "calibrate", "plan.json")
        if not cal.done():
            run_stage(cal, 1, False)
        plan = cal.out / "plan.json"
    ev = Stage(f"{name}_ev", _evaluate_args(model, weights, plan, baseline), out / "evaluate", "metrics.json")
    if plan.is_file() and not ev.done():
        run_stage(ev, 1, False)


def main(argv: list[str] | None = None) -> int:
    import os

    os.chdir(ROOT)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56", choices=("resnet20", "resnet56"))
    ap.add_argument("--target", default="0.6", help="the study's target whose rows are swapped")
    ap.add_argument("--work", default="results/study", help="the study's stage directories")
    ap.add_argument("--out", default="results/point_subset")
    a = ap.parse_args(argv)
    w = Path(a.work) / a.model  # relative to the repository (stages run there): no machine path in the records
    all_st, rand_st = w / f"pa_l1l2_0.5_one_all_{a.target}", w / f"pa_l1l2_0.5_one_rand_{a.target}"
    for st in (all_st, rand_st):
        if not (st / "done.json").is_file():
            print(f"point_subset: {st} is not a finished study stage; run the study first", file=sys.stderr)
            return 2
    out = Path(a.out) / a.model / a.target
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((all_st / "config.yaml").read_text())
    baseline = w / "adapt" / "model.safetensors"
    all_plan = json.loads((all_st / "plan.json").read_text())
    rand_plan = json.loads((rand_st / "plan.json").read_text())
    from instaprune.core.io import atomic_write_json, atomic_write_text

    nolin = {**all_plan, "selected": [p for p in all_plan["selected"] if p != "linear"],
             "taus": {k: v for k, v in all_plan["taus"].items() if k != "linear"}}
    atomic_write_json(out / "plan_all_without_linear.json", nolin)
    # weights as instaprune train writes them; the random row's are not committed (results/weights.json says how
    # to restore them), so the cells re-run only with that file in place
    cells = [("allw_randpts", all_st / "model.safetensors", rand_st / "plan.json", cfg),
             ("randw_allpts", rand_st / "model.safetensors", all_st / "plan.json", cfg)]
    cells.append(("allw_nolinear", all_st / "model.safetensors", out / "plan_all_without_linear.json", None))
    lanes = [threading.Thread(target=lambda cs=cs: [_cell(n, out / n, a.model, wt, pl, baseline, c)
                                                    for n, wt, pl, c in cs]) for cs in (cells[::2], cells[1::2])]
    for t in lanes:  # two lanes, one thread each, as in the study
        t.start()
    for t in lanes:
        t.join()

    def ev(d: Path) -> dict | None:
        f = d / "metrics.json"
        return json.loads(f.read_text()) if f.is_file() else None

    rows = [("all-points row (study)", "all points", "all points", ev(w / f"ev_{all_st.name}"), len(all_plan["taus"])),
            ("random-points row (study)", "random points", "random points", ev(w / f"ev_{rand_st.name}"),
             len(rand_plan["taus"])),
            ("allw_randpts", "all points", "random points", ev(out / "allw_randpts" / "evaluate"),
             len(rand_plan["taus"])),
            ("randw_allpts", "random points", "all points", ev(out / "randw_allpts" / "evaluate"),
             len(all_plan["taus"])),
            ("allw_nolinear", "all points", "all points but the classifier input",
             ev(out / "allw_nolinear" / "evaluate"), len(nolin["taus"]))]
    res = {"meta": run_meta("point_subset.py", sys.argv[1:] if argv is None else argv),
           "model": a.model, "target": float(a.target),
           "random_excluded": sorted(set(all_plan["taus"]) - set(rand_plan["taus"])),
           "rows": [{"cell": c, "weights_trained_with": wt, "masked_points": pt, "points": n,
                     "top1": m and m["top1"], "flops_reduction": m and m["flops_reduction"]}
                    for c, wt, pt, m, n in rows]}
    atomic_write_json(out / "point_subset.json", res)
    md = [f"# Weights vs point set at {float(a.target):.0%} FLOPs reduction ({a.model}, test split)", "",
          "```", json.dumps(res["meta"]), "```", "",
          "Points the random draw left out: " + ", ".join(res["random_excluded"]) + ".", "",
          "| cell | weights from the prune-aware phase with | masked at | points | FLOPs reduction | top-1 |",
          "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        fr = "" if r["flops_reduction"] is None else f"{r['flops_reduction']:.3f}"
        t1 = "not run" if r["top1"] is None else f"{r['top1']:.4f}"
        md.append(f"| {r['cell']} | {r['weights_trained_with']} | {r['masked_points']} | {r['points']} | {fr} | {t1} |")
    md += ["", "Reading: each set of weights scores best on the points its prune-aware phase trained with; when the "
           "swapped rows fall far below both study rows, the random row's lead is learnt in its phase (its train "
           "top-1 under the masks), not a property of the points at inference. One random draw, one seed."]
    atomic_write_text(out / "point_subset.md", "\n".join(md) + "\n")
    print((out / "point_subset.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
