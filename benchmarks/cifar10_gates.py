"""CIFAR-10 study, second round (issue 23): predicted gates against static L1 filter pruning at equal FLOPs.

Every row starts from the first study's adapted baseline (``results/study/<model>/adapt``) and is one
``instaprune train`` command (``--gates`` and/or ``--static-target``) followed by one ``instaprune evaluate`` on
the shared test split; every choice is made on the 5,000-image holdout of the JPEG train split (the ``train``
command calibrates/evaluates there: ``metrics.json`` ``calibration.top1`` for gates, ``val_top1`` for static).
Budgets: ``short`` = the first study's 6 epochs after the adapted baseline; ``long`` = 30 (ResNet-20) / 20
(ResNet-56) epochs, the same for every row. All rows: lr 0.02 cosine, weight decay 1e-4, batch 128, seed 0.

    python benchmarks/cifar10_gates.py run --model resnet20 --lanes 2 --threads 1   # resumable; re-run to go on
    python benchmarks/cifar10_gates.py status --model resnet20
    python benchmarks/cifar10_gates.py report --model resnet20     # results/cifar10_gates_<model>.{json,md,png}

Stage directories live in ``results/study2/<model>/<stage>``; only the files a reported row needs are committed
(metrics, plans, per-image arrays; weights listed in ``results/weights.json`` when a later stage needs them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from _common import (
    ROOT,
    Stage,
    load_cost,
    load_failed,
    load_history,
    load_metrics,
    one_line_errors,
    run_lanes,
    run_meta,
)

WORK = Path("results") / "study2"  # relative to the repository root (run from there): no machine paths recorded
FIRST = Path("results") / "study"
TRAIN_DATA = ".data/cifar10-train-jpeg"
TEST_DATA = "../shared/data/cifar10-test-jpeg"
HOLDOUT = 5000
LR, WD = 0.02, 1e-4
BUDGETS = {"short": {"resnet20": 6, "resnet56": 6}, "long": {"resnet20": 30, "resnet56": 20}}
TARGETS = (0.3, 0.45, 0.6, 0.7, 0.8)
CHOICE_TARGET = 0.6
#: the rows' training options, in the order the cores are spent on them (first: the pilot's best setting)
VARIANTS: dict[str, list[str]] = {
    # top-k, hard, linear predictor fitted to the saliency, ramp 0.3; gates only (the library's default slims half
    # the target statically since this study: --static-target 0 says none)
    "gates": ["--gates", "--distill", "0.5", "--gate-multiplier", "hard", "--static-target", "0"],
    "static": ["--distill", "0.5"],  # L1 filter pruning, slimmed, the same help (distillation) as the gates
    # section 10: half the target slimmed statically (L1), then gates
    "static_gates": ["--gates", "--distill", "0.5", "--static-target", "half", "--gate-multiplier", "hard"],
    "gates_value": ["--gates", "--distill", "0.5", "--gate-multiplier", "value", "--static-target", "0"],
    # the two options that each helped on the holdout (section 10's half static, value multiplier), together
    "static_gates_value": ["--gates", "--distill", "0.5", "--gate-multiplier", "value", "--static-target", "half"],
    # per-image budgets
    "gates_thr": ["--gates", "--distill", "0.5", "--gate-selection", "threshold", "--gate-multiplier", "hard",
                  "--static-target", "0"],
    "gates_bneck": ["--gates", "--distill", "0.5", "--gate-predictor", "bottleneck", "--gate-multiplier", "hard",
                    "--static-target", "0"],
    "gates_ste": ["--gates", "--distill", "0.5", "--gate-multiplier", "ste", "--static-target", "0"],
    "gates_decay": ["--gates", "--distill", "0.5", "--gate-decay", "0.5", "--gate-multiplier", "hard",
                    "--static-target", "0"],
    "gates_ramp0": ["--gates", "--distill", "0.5", "--gate-ramp", "0", "--gate-multiplier", "hard",
                    "--static-target", "0"],
    # no distillation: --distill 0 (the library distils gated and static training at 0.5 since this study)
    "gates_nodistill": ["--gates", "--distill", "0", "--gate-multiplier", "hard", "--static-target", "0"],
    "static_nodistill": ["--distill", "0"],
    # the static share the holdout picks (issue 23 row 3): three quarters of the target slimmed, value gates the
    # rest, beside half (static_gates_value) and none (gates_value); so less of the network learns under masks
    "static3q_gates_value": ["--gates", "--distill", "0.5", "--gate-multiplier", "value", "--static-target",
                             "three_quarters"],
}
#: the static-target words of VARIANTS: that share of the row's target
SHARES = {"half": 0.5, "three_quarters": 0.75}
#: variants added after the options were chosen on the holdout (the static-share sweep): never that choice, so the
#: rows planned on it stay the plan
LATE = ("static3q_gates_value",)
STATIC = ("static", "static_nodistill")
#: study 1's row of the paper's post-hoc rule (its method row in results/cifar10_<model>.json)
POSTHOC = "method: feature decay + calibrated dynamic thresholds"


def adapted(model: str) -> str:
    d = FIRST / model / "adapt"
    for name in ("model.safetensors", "model.pt"):
        if (d / name).is_file():
            return str(d / name)
    raise SystemExit(f"cifar10_gates: the adapted baseline of {model} is missing in {d}")


def baseline_top1(model: str) -> float | None:
    m = load_metrics(FIRST / model / "ev_dense" / "metrics.json", ("dense_top1",))
    return None if m is None else float(m["dense_top1"])


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def trained_gated(variant: str) -> bool:
    """A row whose gates were trained: not static L1, and not a slim-off row (its trained row with the never-kept
    channels removed, no training of its own)."""
    return variant not in STATIC and not variant.endswith("+slimoff")


def tag(variant: str, target: float, budget: str) -> str:
    return f"{variant}_{target}_{budget}"


def train_args(model: str, variant: str, target: float, budget: str) -> list[str]:
    args = [str(round(target * SHARES[a], 4)) if a in SHARES else a for a in VARIANTS[variant]]
    if variant in STATIC:
        args += ["--static-target", str(target)]
    else:
        args += ["--target", str(target)]
    return ["train", "--model", model, "--checkpoint", adapted(model), "--data-path", TRAIN_DATA, "--holdout",
            str(HOLDOUT), "-b", "128", "--epochs", str(BUDGETS[budget][model]), "--lr", str(LR), "--wd", str(WD),
            "--lam", "0", "--checkpoint-every", "100", "--resume", "auto", *args]


def holdout_top1(work: Path, name: str) -> float | None:
    m = load_metrics(work / name / "metrics.json")
    if m is None:
        return None
    return (m.get("calibration") or {}).get("top1", m.get("val_top1"))


def choose(work: Path, model: str = "resnet20", among: tuple[str, ...] | None = None) -> str:
    """The gated variant with the best holdout top-1 at the choice target, short budget, on ``model`` (ResNet-20
    chooses the options; ResNet-56 then chooses between the rows it ran at that target: ``among``)."""
    cands = among if among is not None else tuple(v for v in VARIANTS
                                                  if v not in STATIC and v != "gates_nodistill" and v not in LATE)
    scores = {v: holdout_top1(work / model, tag(v, CHOICE_TARGET, "short")) for v in cands}
    done = {v: s for v, s in scores.items() if s is not None}
    return max(done, key=done.__getitem__) if done else cands[0]


def rows(model: str, work: Path) -> list[tuple[str, float, str]]:
    """(variant, target, budget) of every row of ``model``, decisive ones first."""
    if model == "resnet20":
        out = [(v, CHOICE_TARGET, "short") for v in VARIANTS]
        best = choose(work)
        out += [(v, CHOICE_TARGET, "long") for v in (best, "static", "static_gates")]  # 60%: both budgets
        out += [(v, t, "short") for t in TARGETS if t != CHOICE_TARGET for v in (best, "static")]
        return list(dict.fromkeys(out))
    best = choose(work)
    out = [(v, CHOICE_TARGET, "short") for v in (best, "static", "static_gates")]
    # the other targets and the long budget: the better of ResNet-56's own two gated rows at 60% on its holdout
    best56 = choose(work, model, (best, "static_gates"))
    sweep = [(v, t, "short") for t in (0.7, 0.8, 0.3, 0.45) for v in (best56, "static")]
    # after 70-80%: the static share (with ResNet-20's value multiplier; none is best's row) on ResNet-56's own
    # holdout, so the library's defaults rest on both models: half, and three quarters if ResNet-20's holdout
    # ranks it above half
    r20 = {v: holdout_top1(work / "resnet20", tag(v, CHOICE_TARGET, "short")) for v in ("static_gates_value", *LATE)}
    more = [v for v in LATE if r20[v] is not None and r20["static_gates_value"] is not None
            and r20[v] > r20["static_gates_value"]]
    shares = [(v, CHOICE_TARGET, "short") for v in ("static_gates_value", *more)]
    out += sweep[:4] + shares + sweep[4:]
    # at 80% also ResNet-20's own best row when it beats static L1 there on ResNet-20's holdout (the cut where the
    # ranking of ResNet-56's 60% holdout may not carry over)
    r20_80 = {v: holdout_top1(work / "resnet20", tag(v, 0.8, "short")) for v in (best, "static")}
    if None not in r20_80.values() and r20_80[best] > r20_80["static"]:
        out.append((best, 0.8, "short"))
    out += [(v, CHOICE_TARGET, "long") for v in (best56, "static", best, "static_gates")]  # every 60% row
    return list(dict.fromkeys(out))


#: slim-off (section 10, the gates' own static part): channels kept for fewer than this share of the holdout go
SLIM_OFF = 0.01


def reported(model: str, work: Path) -> list[tuple[str, float, str, str]]:
    """(variant, target, budget, stage name) of every reported row: the trained rows and their slim-off rows."""
    out = []
    for variant, target, budget in dict.fromkeys(rows(model, work)):
        out.append((variant, target, budget, tag(variant, target, budget)))
        if variant not in STATIC:
            out.append((f"{variant}+slimoff", target, budget, f"slimoff_{tag(variant, target, budget)}"))
    return out


def stages(model: str, work: Path) -> list[Stage]:
    w = work / model
    out: list[Stage] = []
    base = baseline_top1(model)

    def evaluate(name: str, run: Stage, gated: bool) -> Stage:
        ev_args = ["evaluate", "--model", model, "--data-path", TEST_DATA, "--checkpoint", str(run.out / "model.pt")]
        if gated:
            ev_args += ["--plan", str(run.out / "plan.json")]
        if base is not None:
            ev_args += ["--baseline-top1", str(base)]
        return Stage(f"ev_{name}", ev_args, w / f"ev_{name}", "metrics.json", [run.name])

    for variant, target, budget in rows(model, work):
        name = tag(variant, target, budget)
        tr = Stage(name, train_args(model, variant, target, budget), w / name, "metrics.json")
        out += [tr, evaluate(name, tr, variant not in STATIC)]
        if variant not in STATIC:  # the trained gates' never-used channels removed (no training): slim-off row
            so = f"slimoff_{name}"
            args = ["calibrate", "--model", model, "--checkpoint", str(tr.out / "model.safetensors"), "--data-path",
                    TRAIN_DATA, "--holdout", str(HOLDOUT), "--target", str(target), "--gate-slim-off", str(SLIM_OFF)]
            st = Stage(so, args, w / so, "plan.json", [name])
            out += [st, evaluate(so, st, True)]
    return out


def status(model: str, work: Path) -> None:
    for s in stages(model, work):
        state = "done" if s.done() else ("failed" if load_failed(s.out / "failed.json") else "todo")
        print(f"{s.name:40s} {state}")


# ----------------------------------------------------------------------------------------------- latency
def _kept(path: Path, new_only: bool) -> tuple[dict[str, Any] | None, list[dict], set[tuple]]:
    """An analysis run's earlier file (``--new-only``: its rows are kept, only the missing ones are run): the
    file, its rows and their (variant, target, budget); nothing without ``new_only``."""
    old = _load(path) if new_only else None
    rows_ = list(old["rows"]) if old is not None else []
    return old, rows_, {(r["variant"], r["target"], r["budget"]) for r in rows_}


def _written(path: Path, meta: dict[str, Any], rows_: list[dict], old: dict[str, Any] | None) -> Path:
    """Write an analysis run's rows with its meta; an earlier run's meta (and its earlier ones) go to
    ``meta.earlier``, so each kept row's run stays on record."""
    from instaprune.core.errors import ConfigError
    from instaprune.core.io import atomic_write_json

    if not rows_:  # nothing measured and nothing kept: no empty file (a wrong --work, or no trained row yet)
        raise ConfigError(f"no row to write in {path.parent} (no trained row with weights there)")
    if old is not None:
        meta["earlier"] = old["meta"].pop("earlier", []) + [old["meta"]]
    return atomic_write_json(path, {"meta": meta, "rows": rows_})


def _runs_said(meta: dict[str, Any]) -> tuple[int, str]:
    """How many runs made an analysis file, and each one's command, commit, torch version and date."""
    runs = [*meta.get("earlier", []), meta]
    return len(runs), "; ".join(f"`{m['command']}`, commit {m.get('commit', '?')[:7]}, torch {m.get('torch')}, "
                                f"{m.get('date', '')[:10]}" for m in runs)


def _weights(out: Path) -> Path | None:
    for name in ("model.safetensors", "model.pt"):
        if (out / name).is_file():
            return out / name
    return None


def latency(model: str, work: Path, images: int = 200, pairs: int = 7, new_only: bool = False) -> Path:
    """Latency at 1 thread of every trained row beside the dense adapted baseline and the row's physical limit,
    in one run: batch 1 over ``images`` stratified test images (dense, row, slim alternating per image; means and
    p50/p90) and batch 32 (``pairs`` alternating rounds of torch.utils.benchmark, medians). Gated rows run the
    fast engine on their calibrated plan with their own predictions; their ``slim`` is the statically slimmed
    model of the same mean MACs (``engine.bench.slim_of_plan``); static rows *are* slim (their row time).
    ``new_only``: time only the rows ``latency.json`` lacks and keep its others (each row is compared within
    its own run: it records that run's commit and date; the earlier runs' meta go to ``meta.earlier``)."""
    import statistics

    import torch

    from instaprune.data.datasets import iterate_batches
    from instaprune.engine.bench import dense_models, fastest, per_call_latency, slim_of_plan, time_alternating
    from instaprune.engine.dynamic import to_dynamic
    from instaprune.method.plan import Plan
    from instaprune.method.points import find_prune_points
    from instaprune.pipeline.stages import load_model, load_split

    torch.set_num_threads(1)
    w = work / model
    base = load_model(model, adapted(model))
    test = load_split(TEST_DATA, base.pre, images, "holdout", 0)  # a stratified, seeded sample of the test split
    x = next(iterate_batches(test, len(test), base.pre.mean, base.pre.std))[0]
    ones, b32 = [x[i:i + 1] for i in range(len(x))], x[:32]

    def fastest_form(m: torch.nn.Module) -> tuple[str, Any]:
        forms = dense_models(m, find_prune_points(m, x[:1]))
        best, _ = fastest({k: (lambda f=f: f(b32)) for k, f in forms.items()}, 2, 1)
        return best, forms[best]

    dense_form, dense = fastest_form(base.model)
    old, out_rows, have = _kept(w / "latency.json", new_only)
    meta = run_meta("cifar10_gates.py", ["latency", "--model", model, "--images", str(images), "--pairs",
                                         str(pairs)] + (["--new-only"] if new_only else []), model=model, threads=1)
    for variant, target, budget, name in reported(model, work):
        if (variant, target, budget) in have:
            continue
        ckpt = _weights(w / name)
        done = (w / name / "plan.json") if variant.endswith("+slimoff") else (w / name / "metrics.json")
        if not done.is_file() or ckpt is None:
            continue
        lm = load_model(model, ckpt)
        lm.model.eval()
        fns: dict[str, Any] = {"dense": dense}
        row: dict[str, Any] = {"variant": variant, "target": target, "budget": budget, "dense_form": dense_form,
                               "commit": meta.get("commit"), "date": meta.get("date")}
        if variant in STATIC:
            row["row_form"], fns["row"] = fastest_form(lm.model)
        else:
            plan = Plan.load(w / name / "plan.json")
            engine = to_dynamic(lm.model, find_prune_points(lm.model, x[:1]), plan)
            engine.warmup(ones[0])
            fns["row"] = engine
            slim, keep = slim_of_plan(lm.model, plan, x)
            row["slim_form"], fns["slim"] = fastest_form(slim)
            row["slim_mean_keep"] = statistics.fmean(keep.values())
        lat = per_call_latency(fns, ones, 1)
        for k, v in lat.items():
            row[f"b1_{k}_ms"], row[f"b1_{k}_p90_ms"] = v["mean"], v["p90"]
        if variant not in STATIC:
            engine.warmup(b32)
        t = time_alternating({k: (lambda f=f: f(b32)) for k, f in fns.items()}, pairs, 1)
        row.update({f"b32_{k}_ms": statistics.median(v) for k, v in t.items()})
        for b in ("b1", "b32"):
            row[f"{b}_speedup"] = row[f"{b}_dense_ms"] / row[f"{b}_row_ms"]
            if "slim" in fns:
                row[f"{b}_ratio_to_slim"] = row[f"{b}_row_ms"] / row[f"{b}_slim_ms"]
        out_rows.append(row)
    return _written(w / "latency.json", meta, out_rows, old)


# ------------------------------------------------------------------------------------------------ frozen
#: usage bounds of a "switching" channel: kept for more than 1% and fewer than 99% of the holdout images
SWITCHING = (0.01, 0.99)


def _gated(net: Any, plan: Any, example: Any) -> Any:
    """A trained row's network in eval mode with the gates its ``plan`` records attached (found by tracing
    ``example``, one batch of its inputs); the caller calls ``.remove()``. Shared by :func:`frozen` and
    :func:`spread`."""
    from instaprune.method.gates import find_gates, gated_from_plan

    net = net.eval()
    return gated_from_plan(net, find_gates(net, example), plan.gates, plan.scale)


def frozen_masks(usage: dict[str, Any]) -> dict[str, Any]:
    """Per gate, the static mask of its ``k`` most used channels, ``k`` = its mean kept count (the sum of the
    channels' usage fractions, rounded, at least 1): the frozen selection with the gates' mean MACs."""
    import torch

    out = {}
    for n, u in usage.items():
        k = max(1, round(float(u.sum())))
        out[n] = torch.zeros_like(u, dtype=torch.bool).scatter(0, torch.topk(u, k).indices, True)
    return out


def frozen(model: str, work: Path, new_only: bool = False) -> Path:
    """What the per-image selection is worth: every trained gated row's test top-1 against the same network with
    each gate frozen at the channels it keeps most often on the holdout (the k most used, k = its mean kept count
    there: the same mean MACs; no retraining; value gates keep their per-image scale, hard gates become static),
    paired per test image (bootstrap CI). Also the share of gated channels that switch (kept for 1-99% of the
    holdout images). Both the gated and the frozen model are scored in this run (the gated one must match its
    ``ev_`` stage). Writes ``frozen.json`` in the model's study directory."""
    import torch

    from cifar10_study import paired_bootstrap
    from instaprune.method.gates import channel_usage
    from instaprune.method.plan import Plan
    from instaprune.pipeline.stages import cached_batches, load_model, load_split

    torch.set_num_threads(1)
    w = work / model
    old, out_rows, have = _kept(w / "frozen.json", new_only)
    meta = run_meta("cifar10_gates.py", ["frozen", "--model", model] + (["--new-only"] if new_only else []),
                    model=model, threads=1, switching=SWITCHING)
    held = test = None
    for variant, target, budget, name in reported(model, work):
        ev = load_metrics(w / f"ev_{name}" / "metrics.json")
        ckpt = _weights(w / name)
        if not trained_gated(variant) or (variant, target, budget) in have or ev is None or ckpt is None:
            continue
        lm = load_model(model, ckpt)
        if held is None:
            held = cached_batches(load_split(TRAIN_DATA, lm.pre, HOLDOUT, "holdout", 0), lm.pre)
            test = cached_batches(load_split(TEST_DATA, lm.pre), lm.pre)
        plan = Plan.load(w / name / "plan.json")
        gated = _gated(lm.model, plan, held[0][0][:1])
        try:
            with torch.inference_mode():
                usage = channel_usage(gated, held)
                fixed = frozen_masks(usage)
                correct: dict[str, list[torch.Tensor]] = {"gated": [], "frozen": []}
                for x, y in test:
                    gated.forced = None
                    correct["gated"].append(gated(x).argmax(1) == y)
                    gated.forced = {n: m.expand(len(x), -1) for n, m in fixed.items()}
                    correct["frozen"].append(gated(x).argmax(1) == y)
        finally:
            gated.forced = None
            gated.remove()
        a, b = (torch.cat(correct[k]).numpy().astype(float) for k in ("gated", "frozen"))
        if abs(a.mean() - ev["top1"]) > 5e-4:  # a few images may flip with the thread count, no more
            raise SystemExit(f"cifar10_gates: {name}: gated top-1 {a.mean():.4f} here, {ev['top1']:.4f} in its "
                             "ev_ stage: not the same model, plan or test split")
        lo, hi = paired_bootstrap(a, b)
        u = torch.cat(list(usage.values()))
        out_rows.append({"variant": variant, "target": target, "budget": budget,
                         "multiplier": plan.gates.config.multiplier, "gated_top1": float(a.mean()),
                         "frozen_top1": float(b.mean()), "gated_minus_frozen": {"diff": float(a.mean() - b.mean()),
                                                                               "ci95": [lo, hi]},
                         "switching_channels": float(((u > SWITCHING[0]) & (u < SWITCHING[1])).double().mean()),
                         "gated_channels": int(u.numel())})
    return _written(w / "frozen.json", meta, out_rows, old)


# ------------------------------------------------------------------------------------------------ spread
def spread_stats(kept: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, Any]:
    """How per-gate per-image budgets add up. ``kept``: gate -> kept fraction per image (N,); ``weights``: gate ->
    the MACs that scale with it. Per gate: mean, p10, p90 of its kept fraction. ``coherence``: sd of the weighted
    sum over the sum of the weighted sds (1 = the gates vary together, as "easy images cost less" needs; about
    1/sqrt(gates) when they vary independently, so their spreads average out; 0 when they cancel);
    ``mean_pairwise_r``: the mean Pearson r of the gates' kept fractions over all pairs (NaN-free: constant gates
    are left out)."""
    names = list(kept)
    gates = [{"name": n, "mean": float(kept[n].mean()), "p10": float(np.percentile(kept[n], 10)),
              "p90": float(np.percentile(kept[n], 90))} for n in names]
    sds = {n: float(kept[n].std()) for n in names}
    total = sum(weights[n] * kept[n] for n in names)
    denom = sum(weights[n] * sds[n] for n in names)
    varying = [n for n in names if sds[n] > 0]
    rs = [float(np.corrcoef(kept[a], kept[b])[0, 1]) for i, a in enumerate(varying) for b in varying[i + 1:]]
    return {"gates": gates, "coherence": float(total.std() / denom) if denom > 0 else None,
            "mean_pairwise_r": float(np.mean(rs)) if rs else None, "varying_gates": len(varying)}


def spread(model: str, work: Path) -> Path:
    """Why per-image budgets stay narrow: every trained row with threshold gates, on the test split: each gate's
    kept fraction per image and how the gates add up (:func:`spread_stats`, weighted by the MACs of each gate's
    producers and consumer), beside the per-image MACs' p90/p10. Writes ``spread.json``."""
    import torch

    from instaprune.method.plan import Plan
    from instaprune.pipeline.stages import cached_batches, load_model, load_split

    torch.set_num_threads(1)
    w = work / model
    meta = run_meta("cifar10_gates.py", ["spread", "--model", model], model=model, threads=1)
    out_rows, test = [], None
    for variant, target, budget, name in reported(model, work):
        ckpt = _weights(w / name)
        if not trained_gated(variant) or ckpt is None or not (w / name / "plan.json").is_file():
            continue
        plan = Plan.load(w / name / "plan.json")
        if plan.gates.config.selection != "threshold":
            continue
        lm = load_model(model, ckpt)
        if test is None:
            test = cached_batches(load_split(TEST_DATA, lm.pre), lm.pre)
        gated = _gated(lm.model, plan, test[0][0][:1])
        kept: dict[str, list[torch.Tensor]] = {s.name: [] for s in gated.gates}
        macs: list[torch.Tensor] = []
        try:
            with torch.inference_mode():
                for x, _ in test:
                    gated(x)
                    macs.append(gated.instance_macs())
                    fin, _ = gated.fractions()  # each gated input's kept fraction per image
                    for s in gated.gates:
                        kept[s.name].append(fin[s.name])
        finally:
            gated.remove()
        layer = dict(gated.gates.layer_macs)
        weights = {s.name: float(sum(layer.get(n, 0) for n in (*s.producers, s.name))) for s in gated.gates}
        m = torch.cat(macs).numpy()
        stats = spread_stats({n: torch.cat(v).numpy() for n, v in kept.items()}, weights)
        out_rows.append({"variant": variant, "target": target, "budget": budget,
                         "macs_p90_over_p10": float(np.percentile(m, 90) / np.percentile(m, 10)), **stats})
    from instaprune.core.errors import ConfigError
    from instaprune.core.io import atomic_write_json

    if not out_rows:
        raise ConfigError(f"no trained row with threshold gates in {w}")
    return atomic_write_json(w / "spread.json", {"meta": meta, "rows": out_rows})


# ------------------------------------------------------------------------------------------------ report
def report(model: str, work: Path, results: Path = Path("results")) -> Path:
    from cifar10_study import paired_bootstrap  # the first study's paired bootstrap (10,000 resamples)

    w = work / model
    table = []
    for variant, target, budget, name in reported(model, work):
        ev = load_metrics(w / f"ev_{name}" / "metrics.json", ("dense_top1",))
        if ev is None:
            continue
        trained = tag(variant.removesuffix("+slimoff"), target, budget)  # the trained row (a slim-off row's too)
        per = w / f"ev_{name}" / "per_image.npz"
        correct = np.load(per)["correct" if variant not in STATIC else "dense_correct"] if per.is_file() else None
        if variant.endswith("+slimoff"):  # no training of its own: the trained row's cost plus this stage's
            plan = json.loads((w / name / "plan.json").read_text())
            held = plan["calibration"].get("top1")
            extra = [_cost(w / name), _cpu(w / name)]
        else:
            held, extra = holdout_top1(w, name), [0.0, 0.0]
        cost, cpu = _cost(w / trained), _cpu(w / trained)
        gplan = _load(w / name / "plan.json") if variant not in STATIC else None  # its static part: L1, slim-off
        slim = None if gplan is None else (gplan.get("gates") or {}).get("static") or {}
        slimmed = None if slim is None else slim.get("flops_reduction", 0.0)
        fit = [e["train_top1"] for e in load_history(w / trained / "metrics.jsonl") if e.get("train_top1") is not None]
        table.append({"variant": variant, "target": target, "budget": budget,
                      "epochs": BUDGETS[budget][model], "train_top1": fit[-1] if fit else None,
                      "holdout_top1": held,
                      "top1": ev.get("top1", ev["dense_top1"]),
                      "flops_reduction": ev.get("flops_reduction",
                                                (load_metrics(w / trained / "metrics.json") or {}).get(
                                                    "flops_reduction")),
                      "static_reduction": slimmed,
                      "per_image_flops_p90_over_p10": ev.get("per_image_flops_p90_over_p10"),
                      "cost_seconds": None if cost is None or extra[0] is None else cost + extra[0],
                      "cpu_seconds": None if cpu is None or extra[1] is None else cpu + extra[1],
                      "_correct": correct, "_ev": str(w / f"ev_{name}")})
    base_per = FIRST / model / "ev_dense" / "per_image.npz"  # the adapted baseline's own confidence per image
    base_conf = np.load(base_per)["dense_confidence"] if base_per.is_file() else None
    for r in table:
        per = Path(r["_ev"]) / "per_image.npz"
        if base_conf is not None and per.is_file() and "flops" in np.load(per):
            import torch

            from instaprune.evaluation.report import spearman

            flops = np.load(per)["flops"]
            r["spearman_flops_baseline_confidence"] = (
                spearman(torch.tensor(flops), torch.tensor(base_conf)) if np.ptp(flops) > 0 else None)
    for r in table:  # paired differences to the static row of the same target and budget
        st = next((s for s in table if s["variant"] == "static" and s["target"] == r["target"]
                   and s["budget"] == r["budget"]), None)
        if st is not None and r is not st and r["_correct"] is not None and st["_correct"] is not None:
            a, b = r["_correct"].astype(float), st["_correct"].astype(float)
            lo, hi = paired_bootstrap(a, b)
            r["minus_static"] = {"diff": float(a.mean() - b.mean()), "ci95": [lo, hi]}
        if st is not None and r is not st and r["train_top1"] is not None and st["train_top1"] is not None:
            r["train_minus_static"] = r["train_top1"] - st["train_top1"]  # how well it fits under its masks
    for r in table:
        r.pop("_correct")
        r.pop("_ev")
    meta = run_meta("cifar10_gates.py", ["report", "--model", model], model=model,
                    baseline_top1=baseline_top1(model), budgets=BUDGETS, lr=LR, weight_decay=WD)
    from instaprune.core.io import atomic_write_json, atomic_write_text

    lat = _load(w / "latency.json")  # this script's own latency run (python benchmarks/cifar10_gates.py latency)
    if lat is not None:
        by = {(r["variant"], r["target"], r["budget"]): r for r in lat["rows"]}
        for r in table:
            r["latency"] = by.get((r["variant"], r["target"], r["budget"]))
    atomic_write_json(results / f"cifar10_gates_{model}.json", {"meta": meta, "rows": table})
    md = [f"# CIFAR-10 study 2: {model}, gates vs static (test split; choices on the holdout)", "",
          f"Adapted baseline top-1 {meta['baseline_top1']}; budgets in epochs after it: {BUDGETS['short'][model]} "
          f"(short), {BUDGETS['long'][model]} (long). Peers train 200-400 epochs on GPUs. \"Of it static\": the part "
          "of a gated row's FLOPs reduction made by slimming (static L1 before the gates, and the channels slim-off "
          "removes); the rest is instance-wise. Train top-1: the last epoch's, on the augmented training images "
          "under the row's masks (gates as trained; a slim-off row shows its trained row's).", "",
          "| row | target | budget | train top-1 | holdout top-1 | test top-1 | FLOPs reduction | p90/p10 | "
          "Spearman(FLOPs, baseline conf.) | of it static | minus static [95% CI] | wall / CPU (min) |",
          "|---" * 12 + "|"]
    for r in table:
        d = r.get("minus_static")
        ds = f"{100 * d['diff']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]" if d else ""
        md.append(f"| {r['variant']} | {r['target']} | {r['budget']} ({r['epochs']}) | {_f(r['train_top1'])} | "
                  f"{_f(r['holdout_top1'])} | "
                  f"{_f(r['top1'])} | {_f(r['flops_reduction'], 3)} | {_f(r['per_image_flops_p90_over_p10'], 2)} | "
                  f"{_f(r.get('spearman_flops_baseline_confidence'), 2)} | {_f(r['static_reduction'], 3)} | {ds} | "
                  f"{_f((r['cost_seconds'] or 0) / 60, 0)} / "
                  f"{_f(r['cpu_seconds'] / 60, 0) if r['cpu_seconds'] is not None else 'n/a'} |")
    fits = [r for r in table if "train_minus_static" in r and "minus_static" in r and trained_gated(r["variant"])]
    if fits:  # the trained gated rows against their static pairs: fit on the training set, and the test split
        below = sum(r["train_minus_static"] < 0 for r in fits)
        md += ["", f"Fit under the masks: {below} of {len(fits)} trained gated rows fit the training set less well "
               "than static L1 of the same target and budget (train top-1 minus static's: median "
               f"{100 * float(np.median([r['train_minus_static'] for r in fits])):+.2f} points; test top-1: median "
               f"{100 * float(np.median([r['minus_static']['diff'] for r in fits])):+.2f})."]
    if lat is not None:
        n_runs, said = _runs_said(lat["meta"])
        md += ["", f"Latency at 1 thread ({said}): batch 1 = mean ms per image over the sampled test "
               "images, batch 32 = median ms per batch; dense = the adapted baseline, slim = the statically slimmed "
               "model of the row's mean MACs (static rows are slim themselves); each row's models timed "
               "alternating in one run" + (" (later runs timed only the rows the earlier lacked)."
                                           if n_runs > 1 else "."), "",
               "| row | target | budget | b1 dense | b1 row | b1 slim | b1 speedup | b1 row/slim | b32 dense | "
               "b32 row | b32 slim | b32 speedup | b32 row/slim |", "|---" * 13 + "|"]
        for r in table:
            x = r.get("latency")
            if x is None:
                continue
            md.append(f"| {r['variant']} | {r['target']} | {r['budget']} | {x['b1_dense_ms']:.2f} | "
                      f"{x['b1_row_ms']:.2f} | {_f(x.get('b1_slim_ms'), 2)} | {x['b1_speedup']:.2f}x | "
                      f"{_f(x.get('b1_ratio_to_slim'), 2)} | {x['b32_dense_ms']:.2f} | {x['b32_row_ms']:.2f} | "
                      f"{_f(x.get('b32_slim_ms'), 2)} | {x['b32_speedup']:.2f}x | "
                      f"{_f(x.get('b32_ratio_to_slim'), 2)} |")
    fz = _load(w / "frozen.json")  # this script's frozen-gates run (python benchmarks/cifar10_gates.py frozen)
    if fz is not None:
        _, said = _runs_said(fz["meta"])
        md += ["", f"What the per-image selection is worth ({said}): each gated row against the same network with "
               "every gate frozen at the channels it keeps most often on the holdout (same mean MACs, no "
               "retraining; hard gates become static, value gates keep their per-image scale), paired on the test "
               f"split; switching = share of the gated channels kept for {SWITCHING[0]:.0%}-{SWITCHING[1]:.0%} of "
               "the holdout images.", "",
               "| row | target | budget | multiplier | gated top-1 | frozen top-1 | gated minus frozen [95% CI] | "
               "switching |", "|---" * 8 + "|"]
        for r in fz["rows"]:
            d = r["gated_minus_frozen"]
            md.append(f"| {r['variant']} | {r['target']} | {r['budget']} | {r['multiplier']} | "
                      f"{r['gated_top1']:.4f} | {r['frozen_top1']:.4f} | {100 * d['diff']:+.2f} "
                      f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] | {r['switching_channels']:.3f} |")
    sp = _load(w / "spread.json")  # this script's spread run (python benchmarks/cifar10_gates.py spread)
    if sp is not None:
        _, said = _runs_said(sp["meta"])
        md += ["", f"Why per-image budgets stay narrow ({said}): threshold-gated rows on the test split; per gate, "
               "the kept fraction per image (the median over gates of its p10 and p90); coherence = sd of the "
               "per-image gated MACs / the sum of the gates' own MACs sds (1: the gates vary together; "
               "1/sqrt(gates): independently, so their spreads average out).", "",
               "| row | target | budget | per-image MACs p90/p10 | gates varying | gate keep p10 / p90 (median) | "
               "mean pairwise r | coherence |", "|---" * 8 + "|"]
        for r in sp["rows"]:
            p10 = float(np.median([x["p10"] for x in r["gates"]]))
            p90 = float(np.median([x["p90"] for x in r["gates"]]))
            md.append(f"| {r['variant']} | {r['target']} | {r['budget']} | {r['macs_p90_over_p10']:.2f} | "
                      f"{r['varying_gates']} of {len(r['gates'])} | {p10:.3f} / {p90:.3f} | "
                      f"{_f(r['mean_pairwise_r'], 2)} | {_f(r['coherence'], 2)} |")
    path = atomic_write_text(results / f"cifar10_gates_{model}.md", "\n".join(md) + "\n")
    _plot(table, results / f"cifar10_gates_{model}.png", model, meta["baseline_top1"])
    return path


def spent(work: Path, model: str) -> tuple[float, float, int]:
    """CPU hours the stages of ``model`` recorded (an interrupted or running stage up to its last minute), the
    wall hours of the stages that recorded no CPU time (run before the runner recorded it), and their count."""
    cpu = wall = 0.0
    n = 0
    for c in sorted((work / model).glob("*/cost.json")):
        rec = load_cost(c) or {}
        if rec.get("cpu_seconds") is not None:
            cpu += float(rec["cpu_seconds"])
        else:
            wall, n = wall + float(rec.get("seconds") or 0.0), n + 1
    return cpu / 3600, wall / 3600, n


#: the study's CPU budget (issue 23: "keep to about 30")
CPU_HOURS_BUDGET = 30.0


def goals(results: Path = Path("results"), work: Path = WORK) -> list[str]:
    """Study 2's goals (issue 23) against the rows reported so far (``results/cifar10_gates_<model>.json``); a
    (target, budget) the plan of ``work`` does not run has no goal line."""
    lines = ["## Study 2 goals against the measured rows", "",
             "| model | goal | measured | met |", "|---|---|---|---|"]
    cost = {m: spent(work, m) for m in ("resnet56", "resnet20")}
    todo = 0  # planned rows not reported yet, over both models
    for model in ("resnet56", "resnet20"):
        d = _load(results / f"cifar10_gates_{model}.json")
        plan = set(rows(model, work))
        todo += len(plan - {(r["variant"], r["target"], r["budget"]) for r in (d or {"rows": []})["rows"]})
        if d is None:
            lines.append(f"| {model} | all | pending (no row yet) | - |")
            continue
        base = d["meta"]["baseline_top1"]
        planned = {(t, b) for _, t, b in plan}
        for target, need in ((0.6, 1.0), (0.7, 2.0)):
            for budget in ("short", "long"):
                if (target, budget) not in planned:
                    continue
                rows_ = [r for r in d["rows"] if r["target"] == target and r["budget"] == budget]
                dyn = [r for r in rows_ if r["variant"] not in STATIC and r.get("minus_static")]
                if not dyn:
                    lines.append(f"| {model} | {target:.0%} {budget}: best instance-wise row beats static by >= "
                                 f"{need:g} point(s), CI > 0 | pending | - |")
                    continue
                best = max(dyn, key=lambda r: r["minus_static"]["diff"])
                diff, (lo, hi) = best["minus_static"]["diff"], best["minus_static"]["ci95"]
                met = diff >= need / 100 and lo > 0
                lines.append(f"| {model} | {target:.0%} {budget}: best instance-wise row beats static by >= {need:g} "
                             f"point(s), CI > 0 | {best['variant']}: {100 * diff:+.2f} [{100 * lo:+.2f}, "
                             f"{100 * hi:+.2f}] | {'yes' if met else 'no'} |")
                if target == 0.6 and base is not None:
                    gap = 100 * (best["top1"] - base)
                    lines.append(f"| {model} | {target:.0%} {budget}: within 1.0 point of the adapted baseline "
                                 f"({base:.4f}) | {best['variant']}: {gap:+.2f} points | "
                                 f"{'yes' if gap >= -1.0 else 'no'} |")
        high = [r for r in d["rows"] if r["variant"] not in STATIC and r["flops_reduction"] >= 0.65]
        if model == "resnet56" and base is not None:  # the stretch goal (ManiDP's +0.06 point at 62.4%)
            goal = f"| {model} | stretch: an instance-wise row within 0.3 point of the adapted baseline at >= 65% | "
            if high:
                r = max(high, key=lambda r: r["top1"])
                gap = 100 * (r["top1"] - base)
                lines.append(goal + f"{r['variant']} {r['target']} {r['budget']} ({r['flops_reduction']:.3f}): "
                             f"{gap:+.2f} points | {'yes' if gap >= -0.3 else 'no'} |")
            else:
                lines.append(goal + "pending | - |")
        trend = []  # the gap to static at both budgets, per row run at both
        for v in dict.fromkeys(r["variant"] for r in d["rows"] if r["target"] == CHOICE_TARGET):
            both = {r["budget"]: r for r in d["rows"] if r["variant"] == v and r["target"] == CHOICE_TARGET
                    and r.get("minus_static")}
            if "short" in both and "long" in both:
                a, b = both["short"]["minus_static"], both["long"]["minus_static"]
                trend.append(f"{v}: {100 * a['diff']:+.2f} -> {100 * b['diff']:+.2f} [{100 * b['ci95'][0]:+.2f}, "
                             f"{100 * b['ci95'][1]:+.2f}]")
        if trend:
            lines.append(f"| {model} | budget trend at {CHOICE_TARGET:.0%}: the gap to static, short -> long budget "
                         f"({BUDGETS['short'][model]} -> {BUDGETS['long'][model]} epochs) | {'; '.join(trend)} | "
                         "reported |")
        timed = [r for r in d["rows"] if r.get("latency") and r["variant"] not in STATIC]
        if timed:
            r = max(timed, key=lambda r: r["latency"]["b1_speedup"])
            x = r["latency"]
            lines.append(f"| {model} | latency of every gated row at batch 1 and 32 (1 thread) beside dense and "
                         f"slim | {len(timed)} gated rows timed; fastest {r['variant']} {r['target']}: "
                         f"{x['b1_speedup']:.2f}x "
                         f"(b1), {x['b32_speedup']:.2f}x (b32) vs dense; slim {x['b1_dense_ms'] / x['b1_slim_ms']:.2f}x"
                         f" / {x['b32_dense_ms'] / x['b32_slim_ms']:.2f}x | reported |")
        spread = [r for r in d["rows"] if (r.get("per_image_flops_p90_over_p10") or 1.0) > 1.0]
        if spread:
            r = max(spread, key=lambda r: r["per_image_flops_p90_over_p10"])
            sp = r.get("spearman_flops_baseline_confidence")
            lines.append(f"| {model} | per-image FLOPs p90/p10 >= 1.5 (threshold gates), Spearman(FLOPs, baseline "
                         f"confidence) reported | {r['variant']} {r['target']}: {r['per_image_flops_p90_over_p10']:.2f}"
                         f", Spearman {_f(sp, 2)} | {'yes' if r['per_image_flops_p90_over_p10'] >= 1.5 else 'no'} |")
        else:
            lines.append(f"| {model} | per-image FLOPs p90/p10 >= 1.5 (threshold gates) | no row with per-image "
                         "budgets (its gated rows are top-k: every image costs the same) | - |")
    cpu, wall, n = (sum(c[i] for c in cost.values()) for i in range(3))
    per = "; ".join(f"{m} {c[0]:.1f}" for m, c in cost.items())
    lines.append(f"| both | cost: about {CPU_HOURS_BUDGET:g} CPU hours | {cpu:.1f} CPU hours recorded ({per})"
                 + (f", plus {wall:.1f} wall hours of {n} early stages that recorded no CPU time" if n else "")
                 + (f"; {todo} planned rows still to run" if todo else "")
                 + f" | {'no' if cpu + wall > CPU_HOURS_BUDGET else 'so far' if todo else 'yes'} |")
    return lines + [""]


def _f(v: float | None, nd: int = 4) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def _cost(out: Path) -> float | None:
    """Wall seconds: the runner's record, unless it stopped recording mid-run (its runner was restarted while the
    stage went on: ``in_progress``), then the stage's own ``metrics.json``."""
    c = load_cost(out / "cost.json")
    if c is not None and not c.get("in_progress"):
        return float(c["seconds"])
    m = load_metrics(out / "metrics.json")
    return None if m is None else m.get("seconds")


def _cpu(out: Path) -> float | None:
    c = load_cost(out / "cost.json")
    if c is None or c.get("in_progress") or c.get("cpu_seconds") is None:
        return None  # not recorded to the end
    return float(c["cpu_seconds"])


def _plot(table: list[dict], png: Path, model: str, base: float | None) -> None:
    """Test top-1 against the mean FLOPs reduction: every study-2 row (line style = budget) and study 1's
    post-hoc rule (cited) on the left; the right panel zooms on study 2's rows (the post-hoc rule falls far below
    them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in table:
        series.setdefault((r["variant"], r["budget"]), []).append(r)
    cited = _load(png.parent / f"cifar10_{model}.json")  # study 1's post-hoc rule: cited (row 4), not rerun
    posthoc = sorted((r for r in (cited or {}).get("rows", []) if r["method"].startswith(POSTHOC)),
                     key=lambda r: r["flops_reduction"])
    bases = sorted({v.removesuffix("+slimoff") for v, _ in series})
    color = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}  # one colour per trained variant
    for ax, with_posthoc in zip(axes, (True, False), strict=True):
        for (variant, budget), rs in sorted(series.items()):
            rs = sorted(rs, key=lambda r: r["flops_reduction"])
            slimoff = variant.endswith("+slimoff")  # hollow: the same trained row, never-kept channels removed
            ax.plot([r["flops_reduction"] for r in rs], [r["top1"] for r in rs],
                    "o-" if budget == "short" else "s--", label=f"{variant} ({budget})", ms=5 if slimoff else 4,
                    color=color[variant.removesuffix("+slimoff")], mfc="none" if slimoff else None)
        if with_posthoc and posthoc:
            ax.plot([r["flops_reduction"] for r in posthoc], [r["top1"] for r in posthoc], "x:", color="black",
                    label="post-hoc rule (study 1, short, cited)", ms=5)
        if base is not None:
            ax.axhline(base, color="gray", ls=":", label="adapted baseline")
        ax.set_xlabel("mean FLOPs reduction (test split)")
        ax.set_ylabel("test top-1")
    axes[0].set_title(f"CIFAR-10 {model}: every method")
    axes[1].set_title("study 2's rows (zoom; squares: long budget, hollow: slim-off)", fontsize=9)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


@one_line_errors("cifar10_gates")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("run", "status", "report", "latency", "frozen", "spread"))
    ap.add_argument("--model", choices=("resnet20", "resnet56"), required=True)
    ap.add_argument("--work", type=Path, default=WORK)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="run only stages whose name starts with one of these "
                    "(comma-separated)")
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--images", type=int, default=200, help="latency: batch-1 test images")
    ap.add_argument("--pairs", type=int, default=7, help="latency: alternating rounds at batch 32")
    ap.add_argument("--new-only", action="store_true", help="latency / frozen: only the rows latency.json / "
                    "frozen.json lacks")
    a = ap.parse_args(argv)
    if Path.cwd().resolve() != ROOT:
        raise SystemExit(f"cifar10_gates: run from the repository root ({ROOT})")
    if a.action == "status":
        status(a.model, a.work)
        return 0
    if a.action == "latency":
        print(latency(a.model, a.work, a.images, a.pairs, a.new_only))
        return 0
    if a.action == "frozen":
        print(frozen(a.model, a.work, a.new_only))
        return 0
    if a.action == "spread":
        print(spread(a.model, a.work))
        return 0
    if a.action == "report":
        from cifar10_study import write_results_md  # RESULTS.md opens with study 2 (this script's tables)

        print(report(a.model, a.work))
        print(write_results_md())
        return 0
    prefixes = tuple(p for p in a.only.split(",") if p)

    def build() -> tuple[None, list[Stage]]:  # stages not asked for stay in the plan (as dependencies), not run
        plan = stages(a.model, a.work)
        for s in plan:
            if prefixes and not s.name.startswith(prefixes):
                s.args = None
        return None, plan

    ok = run_lanes(build, a.work / a.model, a.lanes, a.threads, dry=a.dry)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
