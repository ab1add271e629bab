"""Repair of the CIFAR-10 study's prune-aware stages with a CV top-k selection (run once, 2026-12-03).

Until commit "prune-aware phase recalibrates on the points it trained", ``instaprune train --prune-aware-epochs``
selected its points twice: before the phase (CV top-k on the fine-tuned weights; the masks it trains with) and
again for the final recalibration (CV top-k on the *trained* weights). When the two selections differ, the final
plan masks points the network never learnt to lose: ResNet-56's CV row held 0.58 holdout top-1 under the phase's
masks at 60% and 0.29 with the re-selected plan. Stages with ``--select all`` (the method, ablation 3, random
points via ``--include``) are unaffected. The trained weights are right; only the final plan is redone here:

1. the phase's starting selection, reproduced: ``instaprune calibrate`` on the fine-tuned weights with the stage's
   own options (same holdout, same batch size 256 as the training command's internal calibration);
2. the final recalibration on the trained weights with ``--select plan:<that plan>``;
3. the stage's test evaluation again (its old plan is kept as ``plan_reselected.json``, its old evaluation as
   ``ev_..._reselected``), with ``repair.json`` recording the commands and how the two selections differ.

    python benchmarks/repair_pa_selection.py --model resnet56 --stage pa_l1l2_0.5_one_cv_0.6
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from _common import ROOT, Stage, recorded_args, run_stage


def sh(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(time.strftime("%H:%M:%S ") + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run([sys.executable, "-m", "instaprune", *cmd], check=True, stdout=f, stderr=subprocess.STDOUT,
                       cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--stage", required=True, help="a pa_..._cv_<target> stage directory name")
    ap.add_argument("--work", default="results/study")
    a = ap.parse_args()
    w = Path(a.work) / a.model
    st = w / a.stage
    cfg = yaml.safe_load((st / "config.yaml").read_text())
    if not (st / "done.json").is_file() or not str(cfg["select"]).startswith(("topk:", "kappa:")):
        print(f"repair_pa_selection: {st} is not a finished stage with a CV selection", file=sys.stderr)
        return 2
    if (st / "repair.json").is_file():
        print(f"repair_pa_selection: {st} was repaired already", file=sys.stderr)
        return 2
    common = ["--model", a.model, "--data-path", cfg["data_path"], "--holdout", str(cfg["holdout"]), "-b", "256",
              "--target", str(cfg["target"]), "--mode", cfg["mode"], "--search", cfg["search"],
              "--min-keep", str(cfg["min_keep"]), "--tolerance", str(cfg["tolerance"])]
    log = st.parent / f"{st.name}.repair.log"
    start, recal = st / "prune_aware" / "start", st / "prune_aware" / "recal"
    c1 = ["calibrate", *common, "--checkpoint", cfg["checkpoint"], "--select", str(cfg["select"]),
          "--output-dir", str(start)]
    c2 = ["calibrate", *common, "--checkpoint", str(st / "model.safetensors"), "--select",
          f"plan:{start / 'plan.json'}", "--output-dir", str(recal)]
    t0 = time.perf_counter()
    sh(c1, log)
    sh(c2, log)
    old = json.loads((st / "plan.json").read_text())
    new = json.loads((recal / "plan.json").read_text())
    shutil.copy(st / "plan.json", st / "plan_reselected.json")
    shutil.copy(recal / "plan.json", st / "plan.json")
    ev_name = "ev_" + st.name
    ev = w / ev_name
    recorded = recorded_args(ev) if (ev / "cost.json").is_file() else None
    if ev.is_dir():
        shutil.rmtree(w / f"{ev_name}_reselected", ignore_errors=True)
        ev.rename(w / f"{ev_name}_reselected")
    args = recorded or [
        "evaluate", "--model", a.model, "--data-path", "../shared/data/cifar10-test-jpeg", "--checkpoint",
        str(st / "model.safetensors"), "--plan", str(st / "plan.json"), "--baseline-checkpoint",
        str(w / "adapt" / "model.safetensors")]
    run_stage(Stage(ev_name, args, ev, "metrics.json"), 1, False)
    so, sn = set(old["selected"]), set(new["selected"])
    rec = {"why": "the final recalibration had re-selected CV top-k points on the trained weights",
           "commands": [c1, c2], "seconds": time.perf_counter() - t0,
           "selected_during_phase": new["selected"], "reselected_before_repair": old["selected"],
           "only_in_phase": sorted(sn - so), "only_in_reselected": sorted(so - sn),
           "holdout_top1": {"reselected": old["calibration"]["results"][old["calibration"]["chosen"]]["top1"],
                            "repaired": new["calibration"]["results"][new["calibration"]["chosen"]]["top1"]}}
    from instaprune.core.io import atomic_write_json

    atomic_write_json(st / "repair.json", rec)
    print(json.dumps({k: rec[k] for k in ("only_in_phase", "only_in_reselected", "holdout_top1")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
