"""Seed replicates of CIFAR-10 study stages: how much of a row is the training run's luck?

Re-runs finished prune-aware stages (same starting weights, points, schedule, holdout and target) with another
``--seed`` (batch order and augmentation), evaluates each on the test split and tabulates them beside the study's
seed-0 rows. Two lanes, one thread each, as in the study; resumable (step checkpoints, finished parts are kept).

    python benchmarks/seed_replicate.py --model resnet56 --stages pa_l1l2_0.5_one_all_0.6,pa_l1l2_0.5_one_rand_0.6
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

from _common import ROOT, Stage, recorded_args, run_meta, run_stage


def _replicate(w: Path, stage: str, seed: int, out: Path) -> None:
    args = recorded_args(w / stage)
    if "--seed" in args:
        i = args.index("--seed")
        del args[i:i + 2]
    tr = Stage(f"{stage}_seed{seed}", [*args, "--seed", str(seed)], out / "train", "model.safetensors")
    if not tr.done():
        run_stage(tr, 1, False)
    ev_args = recorded_args(w / f"ev_{stage}")
    ev_args[ev_args.index("--checkpoint") + 1] = str(tr.out / "model.safetensors")
    ev_args[ev_args.index("--plan") + 1] = str(tr.out / "plan.json")
    ev = Stage(f"ev_{stage}_seed{seed}", ev_args, out / "evaluate", "metrics.json")
    if (tr.out / "done.json").is_file() and not ev.done():
        run_stage(ev, 1, False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56", choices=("resnet20", "resnet56"))
    ap.add_argument("--stages", required=True, help="comma-separated finished pa_... stage names")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default="results/study")
    ap.add_argument("--out", default="results/seed_replicate")
    a = ap.parse_args(argv)
    os.chdir(ROOT)  # stage commands use repository-relative paths: no machine path in the records
    w = Path(a.work) / a.model
    stages = [s for s in a.stages.split(",") if s]
    for s in stages:
        if not (w / s / "done.json").is_file() or not (w / f"ev_{s}" / "done.json").is_file():
            print(f"seed_replicate: {w / s} or its evaluation is not a finished study stage", file=sys.stderr)
            return 2
    base = Path(a.out) / a.model
    lanes = [threading.Thread(target=_replicate, args=(w, s, a.seed, base / f"{s}_seed{a.seed}")) for s in stages]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()

    def metrics(d: Path) -> dict:
        f = d / "metrics.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    rows = []
    for s in stages:
        m0, m1 = metrics(w / f"ev_{s}"), metrics(base / f"{s}_seed{a.seed}" / "evaluate")
        rows.append({"stage": s, "seed0_top1": m0.get("top1"), "seed0_flops_reduction": m0.get("flops_reduction"),
                     f"seed{a.seed}_top1": m1.get("top1"), f"seed{a.seed}_flops_reduction": m1.get("flops_reduction")})
    from instaprune.core.io import atomic_write_json, atomic_write_text

    res = {"meta": run_meta("seed_replicate.py", sys.argv[1:] if argv is None else argv), "model": a.model,
           "seed": a.seed, "rows": rows}
    atomic_write_json(base / f"seed{a.seed}.json", res)
    md = [f"# Seed replicates of study stages ({a.model}, test split)", "", "```", json.dumps(res["meta"]), "```", "",
          f"| stage | seed 0 (study) top-1 | reduction | seed {a.seed} top-1 | reduction |", "|---|---|---|---|---|"]
    for r in rows:
        f = [r["seed0_top1"], r["seed0_flops_reduction"], r[f"seed{a.seed}_top1"], r[f"seed{a.seed}_flops_reduction"]]
        cells = ["not run" if v is None else f"{v:.4f}" if i % 2 == 0 else f"{v:.3f}" for i, v in enumerate(f)]
        md.append(f"| {r['stage']} | " + " | ".join(cells) + " |")
    atomic_write_text(base / f"seed{a.seed}.md", "\n".join(md) + "\n")
    print((base / f"seed{a.seed}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
