"""CIFAR-10 study (issue 4): the method against its ablations and a static baseline at equal FLOPs.

Every stage is one ``instaprune`` CLI call with its own output directory under ``--work`` (default
``.data/study/<model>/<stage>``); a stage is done when its result file exists (``model.pt`` + ``metrics.json``
for training, ``plan.json`` for calibration, ``metrics.json`` for evaluation), so re-running the script skips
finished stages and an interrupted training resumes from its step checkpoint (``--resume auto``). Nothing is
chosen on the test split: the 5,000-image holdout of the training split is the calibration/validation split.

    python benchmarks/cifar10_study.py run --model resnet20 [--only STAGE_PREFIX] [--threads 1] [--dry-run]
    python benchmarks/cifar10_study.py status --model resnet20
    python benchmarks/cifar10_study.py report --model resnet20     # results/cifar10_<model>.json + RESULTS.md

Stages (ResNet-20; ResNet-56 repeats the chosen setting and the ablations):

- ``adapt``: 3 epochs of plain fine-tuning of the public checkpoint on the JPEG training split (the baseline);
- ``ft_<cfg>``: 5 epochs from ``adapt`` with feature decay (the choice grid) and ``ft_control`` (lambda 0, same
  epochs: the "without feature decay" ablation);
- ``cal_<cfg>_<target>``: greedy calibration on the holdout; the grid is compared at a 60% target;
- ``ev_<cfg>_<target>``: test-split evaluation (per-image arrays for paired bootstrap intervals).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (0.3, 0.45, 0.6, 0.7)
CHOICE_TARGET = 0.6
#: decay fine-tune grid: name -> (penalty, lambda, weights); "control" is the no-decay ablation
GRID = {
    "control": ("l1max", 0.0, "uniform"),
    "l1max_0.5": ("l1max", 0.5, "uniform"),
    "l1max_0.2": ("l1max", 0.2, "uniform"),
    "l21_0.05": ("l21", 0.05, "uniform"),
    "l1l2_0.5": ("l1l2", 0.5, "uniform"),
    "l1max_0.5_flops": ("l1max", 0.5, "flops"),
}
CHECKPOINTS = {"resnet20": "../shared/models/resnet20-cifar10.th", "resnet56": ".data/models/resnet56-cifar10.th"}
EPOCHS = {"adapt": 3, "finetune": 5}
LR = 0.02


@dataclass
class Stage:
    name: str
    args: list[str]
    out: Path
    done_file: str
    deps: list[str] = field(default_factory=list)

    def done(self) -> bool:
        return (self.out / self.done_file).is_file()


def stages(model: str, work: Path, train_data: str, test_data: str, chosen: str | None) -> list[Stage]:
    w = work / model
    common = ["--model", model, "--data-path", train_data, "--holdout", "5000", "-b", "128"]
    out: list[Stage] = [Stage("adapt", ["train", *common, "--checkpoint", CHECKPOINTS[model], "--epochs",
                                        str(EPOCHS["adapt"]), "--lr", str(LR), "--wd", "1e-4", "--lam", "0",
                                        "--checkpoint-every", "100", "--resume", "auto"],
                              w / "adapt", "metrics.json")]
    grid = GRID if model == "resnet20" else {k: GRID[k] for k in ("control", chosen or "l1max_0.5")}
    for cfg, (pen, lam, weights) in grid.items():
        ft = w / f"ft_{cfg}"
        out.append(Stage(f"ft_{cfg}", ["train", *common, "--checkpoint", str(w / "adapt" / "model.pt"),
                                       "--epochs", str(EPOCHS["finetune"]), "--lr", str(LR), "--wd", "1e-4",
                                       "--lam", str(lam), "--penalty", pen, "--weights", weights,
                                       "--checkpoint-every", "100", "--resume", "auto"], ft, "metrics.json",
                         ["adapt"]))
        for t in (TARGETS if cfg in ("control", chosen) else (CHOICE_TARGET,)):
            cal = w / f"cal_{cfg}_{t}"
            out.append(Stage(cal.name, ["calibrate", *common, "--checkpoint", str(ft / "model.pt"),
                                        "--target", str(t)], cal, "plan.json", [f"ft_{cfg}"]))
            if cfg in ("control", chosen):
                ev = w / f"ev_{cfg}_{t}"
                out.append(Stage(ev.name, ["evaluate", "--model", model, "--data-path", test_data,
                                           "--checkpoint", str(ft / "model.pt"), "--plan", str(cal / "plan.json"),
                                           "--baseline-checkpoint", str(w / "adapt" / "model.pt")],
                                 ev, "metrics.json", [cal.name]))
    for tag, ckpt in (("ev_dense", w / "adapt" / "model.pt"), ("ev_unadapted", CHECKPOINTS[model])):
        out.append(Stage(tag, ["evaluate", "--model", model, "--data-path", test_data, "--checkpoint", str(ckpt)],
                         w / tag, "metrics.json", ["adapt"]))
    return out


def choose(work: Path, model: str) -> str | None:
    """The decay setting with the best holdout (calibration-split) top-1 at the choice target, if all are done."""
    scores = {}
    for cfg in GRID:
        if cfg == "control":
            continue
        f = work / model / f"cal_{cfg}_{CHOICE_TARGET}" / "plan.json"
        if not f.is_file():
            return None
        cal = json.loads(f.read_text())["calibration"]
        scores[cfg] = cal["results"][cal["chosen"]]["top1"]
    return max(scores, key=scores.get) if scores else None


def run_stage(s: Stage, threads: int, dry: bool) -> float:
    cmd = [sys.executable, "-m", "instaprune", *s.args, "--output-dir", str(s.out)]
    print(("DRY " if dry else "") + " ".join(cmd), flush=True)
    if dry:
        return 0.0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    s.out.mkdir(parents=True, exist_ok=True)
    with open(s.out.with_suffix(".log"), "a") as log:
        r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"stage {s.name} failed (exit {r.returncode}); see {s.out.with_suffix('.log')}")
    cost = s.out / "cost.json"
    prev = json.loads(cost.read_text())["seconds"] if cost.is_file() else 0.0
    cost.write_text(json.dumps({"seconds": prev + seconds, "threads": threads, "command": cmd[1:]}))
    return seconds


def cost_of(s: Stage) -> float | None:
    for f in (s.out / "cost.json", s.out / "metrics.json"):
        if f.is_file():
            v = json.loads(f.read_text()).get("seconds")
            if v is not None:
                return float(v)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("run", "status", "report"))
    ap.add_argument("--model", default="resnet20", choices=sorted(CHECKPOINTS))
    ap.add_argument("--work", default=".data/study")
    ap.add_argument("--train-data", default=".data/cifar10-train-jpeg")
    ap.add_argument("--test-data", default="../shared/data/cifar10-test-jpeg")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="run only stages whose name starts with this")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    os.chdir(ROOT)
    inputs = ((a.train_data, "training split"), (a.test_data, "test split"), (CHECKPOINTS[a.model], "checkpoint"))
    for p, what in inputs:
        if not Path(p).exists():
            print(f"cifar10_study: {what} not found: {p}", file=sys.stderr)
            return 2
    work = Path(a.work)
    chosen = choose(work, "resnet20")
    plan = stages(a.model, work, a.train_data, a.test_data, chosen)
    if a.action == "status":
        for s in plan:
            c = cost_of(s)
            print(f"{'done' if s.done() else 'todo':4}  {s.name:28} {'' if c is None else f'{c:8.0f} s'}")
        print(f"chosen setting (holdout top-1 at {CHOICE_TARGET:.0%}): {chosen or 'not yet (grid incomplete)'}")
        return 0
    if a.action == "report":
        from cifar10_report import write_report  # benchmarks/cifar10_report.py

        write_report(a.model, work, plan, chosen)
        return 0
    ran: set[str] = set()
    while True:  # the plan grows once the grid is calibrated (the chosen setting gets all targets)
        chosen = choose(work, "resnet20")
        plan = stages(a.model, work, a.train_data, a.test_data, chosen)
        by_name = {s.name: s for s in plan}
        ready = [s for s in plan if not s.done() and s.name.startswith(a.only) and s.name not in ran
                 and all(by_name[d].done() for d in s.deps)]
        if not ready:
            break
        ran.add(ready[0].name)
        run_stage(ready[0], a.threads, a.dry_run)
    todo = [s.name for s in plan if not s.done()]
    print(f"{len(plan) - len(todo)}/{len(plan)} stages done" + (f"; waiting: {', '.join(todo)}" if todo else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
