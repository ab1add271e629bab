"""How the prune-aware phase's thresholds are shaped across prune points, and whether it learns under them.

The CIFAR-10 study's first prune-aware stage (ResNet-20, l1max 0.05 fine-tune, 60% target, one shared tau in
``max`` mode) trained to only 0.44 train top-1 under the masks; its shared tau kept 10% of the last conv's input
channels and 16% of the classifier's input (which costs 640 of 41M MACs). This benchmark runs the same phase
(masks on, FLOPs-target controller, penalty off) for a short budget on a subset of the training split with
different threshold *shapes* and reports the learning curve and the masked holdout top-1 at the target:

- ``shared``: one tau for every point (bisected on the holdout), the study's shape so far;
- ``uniform``: per-point taus at the same quantile of each point's dense ``s/ref`` distribution, so every point
  drops about the same fraction of its channels (the controller then scales them together);
- ``_pp``: one controller per point holds every point's channel drop at the same (ramped) fraction, so the
  shape cannot drift while the network trains (with one global scale it does: the last stage's inputs end at 10%);
- ``static``: the same channels for every image (lowest mean holdout saliency), the same fraction at every point:
  how fast the network recovers from a static cut of the same MACs;
- ``topk``: every image keeps the same number of channels per point (its strongest ones): dynamic choice,
  static count; ``_floor<NN>``: a floor of NN% of each point's channels under the thresholds;
- ``_ste<NN>``: a straight-through gate in the backward pass (``MaskedModel(ste=NN/100)``): the loss reaches
  the saliencies, so channels can learn to cross their thresholds;
- ``frozen``: per-image masks from a frozen copy of the starting weights during training (masks that do not
  move with the weights), evaluated with the trained model's own masks;
- ``_rescale``: energy-preserving masks (kept channels scaled per image to keep the input's energy);
- ``_ramp<NN>``: the controller's target ramps over NN% of the phase (default ``--ramp``);
- suffix ``_nofc``: the classifier's input (a Linear point: it saves almost nothing) is not masked.

    python benchmarks/pa_allocation.py --checkpoint results/study/resnet20/ft_l1max_0.05/model.pt \
        --data-path .data/cifar10-train-jpeg --variants shared,shared_nofc,uniform_nofc --out results/pa_allocation

(those weights are no longer committed: ``results/weights.json`` names the commit that holds them and the command
that regenerates them)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from _common import run_meta
from instaprune.core.io import atomic_write_json, atomic_write_text
from instaprune.method.analysis import analyze, ratio_quantiles
from instaprune.method.calibration import (
    CalibrationConfig,
    Evaluator,
    bisect_scale,
    calibrate,
    recalibrate_batchnorm,
)
from instaprune.method.masked import MaskedModel
from instaprune.method.prune_aware import PruneAwareConfig, TargetController
from instaprune.method.regularizer import FeatureDecayConfig
from instaprune.method.thresholds import ThresholdConfig
from instaprune.pipeline.stages import cached_batches, discover, load_model, load_split
from instaprune.training.loop import TrainConfig, evaluate_top1, train


def uniform_taus(model, names, batches, q: float, mode: str) -> dict[str, float]:
    """Per point: the q-quantile of the dense ``s/ref`` values (every point drops about a fraction q); the
    calibration ladders' quantiles (``instaprune.method.analysis.ratio_quantiles``: at most 50,000 values per point,
    a seeded random sample; runs before this used the first 50,000)."""
    return {n: v[0] for n, v in ratio_quantiles(model, names, batches, [q], mode).items()}


class PerPointController(TargetController):
    """Holds every point's own channel drop at the same ramped fraction (so the shape cannot drift), chosen so
    the mean FLOPs reduction is the target: one log-scale per point instead of one global scale."""

    def __init__(self, masked: MaskedModel, cfg: PruneAwareConfig) -> None:
        super().__init__(masked, cfg, 1.0)
        self.base = dict(masked.taus)
        dense = masked.report.dense_macs
        cover = sum(p.macs for p in masked.selected) / dense
        self.drop = (cfg.target + masked.overhead_macs() / dense) / cover
        self.logs = {n: math.log(0.5) for n in self.base}
        self.ch = {p.name: p.channels for p in masked.selected}
        self._apply()

    def _apply(self) -> None:
        self.masked.set_taus({n: self.base[n] * math.exp(v) for n, v in self.logs.items()}, 1.0)

    def step(self, progress: float, world_size: int = 1) -> float:
        red = self.measured()
        if not math.isfinite(red) or not self.masked.active:
            return red
        self.last_reduction = red
        want = self.drop * min(max(progress / self.cfg.ramp, 0.0), 1.0) if self.cfg.ramp > 0 else self.drop
        for n, a in self.masked.active.items():
            got = 1.0 - float(a.float().mean()) / self.ch[n]
            self.logs[n] = min(max(self.logs[n] + self.cfg.gain * (want - got), -7.0), 7.0)
        self._apply()
        self._sum = [self._sum[0] + red, self._sum[1] + 1.0, self._sum[2] + 1]
        return red


class StaticMasks:
    """Static reference: the same channels dropped for every image (the lowest mean saliency on the holdout,
    ``instaprune.method.analysis.analyze``; runs before it summed in float32), at every point the same fraction;
    forward pre-hooks, no controller."""

    def __init__(self, model, points, names, batches, target: float) -> None:
        dense = points.dense_macs
        sel = [p for p in points if p.name in names]
        drop = target / (sum(p.macs for p in sel) / dense)
        sums = analyze(model, batches, points.subset(names)).sums  # per-channel saliency sums (the library's)
        mods = dict(model.named_modules())
        self.masks = {}
        for p in sel:
            k = max(1, round((1 - drop) * p.channels))
            m = torch.zeros(p.channels)
            m[sums[p.name].topk(k).indices] = 1.0
            self.masks[p.name] = m
        self.macs = dense - sum(p.macs_per_channel * (p.channels - float(self.masks[p.name].sum())) for p in sel)
        self.hs = [mods[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, n):
        def fn(m, args):
            x = args[0]
            return (x * self.masks[n].view((1, -1) + (1,) * (x.dim() - 2)).to(x.dtype),) + tuple(args[1:])
        return fn


class FrozenMasks(MaskedModel):
    """Per-image masks that do not move while the network trains: each batch's masks are those of a frozen copy
    of the starting weights (eval mode, the same taus and global scale), forced onto the training model. Tells
    apart the two things dynamic masks add over static ones: per-image variation (kept here) and masks that
    change as the weights change (removed here)."""

    def __init__(self, model, points, taus, cfg) -> None:
        import copy

        frozen = copy.deepcopy(model).eval()  # before this wrapper hooks the model (a copy would keep the hooks)
        for p in frozen.parameters():
            p.requires_grad_(False)
        super().__init__(model, points, taus, cfg)
        # not a registered submodule: .train() and .parameters() of the wrapper must not reach it
        self.__dict__["frozen"] = MaskedModel(frozen, points, taus, cfg, record_masks=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():  # training steps (not BN re-estimation, not evaluation)
            self.frozen.set_taus(self.taus, self.scale)
            with torch.no_grad():
                self.frozen(x)
            self.forced = dict(self.frozen.masks)
        else:  # the model's own masks (what inference would use)
            self.forced = None
        return super().forward(x)


class RescaledMasks(MaskedModel):
    """Energy-preserving masks: the kept channels of each image are multiplied by sqrt(sum_c s_c^2 / sum_kept
    s_c^2) (one scalar per image and point, no gradient), so the consumer's input keeps its per-image energy,
    as inverted dropout keeps its expectation. Tests whether the per-image scale change that masks cause (a
    different one for every image, unlike static masks) is what the network fails to learn."""

    def multiplier(self, name, x, keep, s):
        m = super().multiplier(name, x, keep, s)
        e = s.square()
        gain = (e.sum(1) / (e * keep).sum(1).clamp_min(1e-12)).sqrt()  # s has no gradient: a constant per image
        return m * gain[:, None].to(x.dtype)


def masked_top1_at(masked: MaskedModel, batches, target: float, tol: float = 0.01) -> dict:
    """The global scale bisected so the holdout reduction is ``target`` (the library's ``bisect_scale``; runs
    before it used a copy that started at scale 1); top-1 and the mean keep ratio per point there."""
    taus = dict(masked.taus)
    scale, e = bisect_scale(Evaluator(masked, batches), taus, target, tol)
    masked.set_taus(taus, scale)
    keep: dict[str, float] = {}
    masked.eval()
    n = 0
    with torch.no_grad():
        for x, _ in batches:
            masked(x)
            for p, a in masked.active.items():
                keep[p] = keep.get(p, 0.0) + float(a.sum())
            n += x.shape[0]
    ch = {p.name: p.channels for p in masked.selected}
    return {"scale": scale, "top1": e.top1, "flops_reduction": e.flops_reduction,
            "keep_ratio": {p: v / n / ch[p] for p, v in keep.items()}}


def run_variant(args, variant: str) -> dict:
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, args.checkpoint)
    train_all = load_split(args.data_path, lm.pre, args.holdout, "train", 0)
    held = load_split(args.data_path, lm.pre, args.holdout, "holdout", 0)
    _, sub = train_all.split(args.images, 1)
    _, hsub = held.split(args.eval_images, 2)
    points = discover(lm.model, lm.pre)
    names = [p.name for p in points if not (variant.endswith("_nofc") and p.kind == "linear")]
    hb = cached_batches(hsub, lm.pre)
    floor = next((int(t[5:]) / 100 for t in variant.split("_") if t.startswith("floor")), 0.05)
    if variant.startswith("topk"):  # the same count for every image (the floor), the channels chosen per image
        cover = sum(p.macs for p in points if p.name in names) / points.dense_macs
        floor = 1.0 - args.target / cover
    th = ThresholdConfig(args.mode, floor)
    if variant.startswith("shared"):
        plan = calibrate(lm.model, points, hb, CalibrationConfig(args.target, "shared", th), selected=names)
        taus = plan.taus
    else:
        taus = uniform_taus(lm.model, names, hb, args.target, args.mode)
    cfg = TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, weight_decay=1e-4,
                      decay=FeatureDecayConfig(0.0, "l1max", "uniform"), seed=0)
    t0 = time.perf_counter()
    if variant.startswith("static"):
        st = StaticMasks(lm.model, points, names, hb, args.target)
        before = evaluate_top1(lm.model, hsub, lm.pre)
        res = train(lm.model, sub, cfg, points, lm.pre, None, None, None)
        red = 1 - st.macs / points.dense_macs
        return {"variant": variant, "points": len(names), "train_seconds": time.perf_counter() - t0,
                "history": [{k: h[k] for k in ("epoch", "train_loss", "train_top1") if k in h} for h in res.history],
                "holdout_before_training": {"top1": before, "flops_reduction": red},
                "holdout": {"top1": evaluate_top1(lm.model, hsub, lm.pre), "flops_reduction": red},
                "holdout_bn_recal": {"top1": evaluate_top1(lm.model, hsub, lm.pre), "flops_reduction": red}}
    if variant.startswith("topk"):
        taus = {n: 2.0 for n in names}  # above every s/max: only the floor is kept
    if variant.startswith("hybrid"):  # static cut to NN% first, then dynamic thresholds for the rest
        StaticMasks(lm.model, points, names, hb, int(variant.split("_")[0][6:]) / 100)
        taus = uniform_taus(lm.model, names, hb, args.target, args.mode)
    ste = next((int(t[3:]) / 100 for t in variant.split("_") if t.startswith("ste")), 0.0)
    ramp = next((int(t[4:]) / 100 for t in variant.split("_") if t.startswith("ramp")), args.ramp)
    if variant.startswith("frozen"):
        masked = FrozenMasks(lm.model, points, taus, th)
    elif "_rescale" in variant:
        masked = RescaledMasks(lm.model, points, taus, th)
    else:
        masked = MaskedModel(lm.model, points, taus, th, ste=ste)
    pp = "_pp" in variant
    ctl = None if variant.startswith("topk") else (PerPointController if pp else TargetController)(
        masked, PruneAwareConfig(args.target, ramp))
    res = train(lm.model, sub, cfg, points, lm.pre, None, None, None, masked=masked, controller=ctl)
    sec = time.perf_counter() - t0
    if ctl is None:
        ev = Evaluator(masked, hb).run(masked.taus)
        before = {"scale": 1.0, "top1": ev.top1, "flops_reduction": ev.flops_reduction}
    else:
        before = masked_top1_at(masked, hb, args.target)
    trb = cached_batches(sub.split(args.eval_images, 3)[1], lm.pre)
    recalibrate_batchnorm(masked, trb)
    if ctl is None:
        ev = Evaluator(masked, hb).run(masked.taus)
        after = {"scale": 1.0, "top1": ev.top1, "flops_reduction": ev.flops_reduction}
    else:
        after = masked_top1_at(masked, hb, args.target)
    return {"variant": variant, "points": len(names), "train_seconds": sec,
            "history": [{k: h[k] for k in ("epoch", "train_loss", "train_top1", "train_flops_reduction", "scale")
                         if k in h} for h in res.history],
            "holdout": before, "holdout_bn_recal": after}


VARIANT_DOC = {
    "shared": "one tau for every point (bisected on the holdout), global-scale controller",
    "shared_nofc": "the same without the classifier's input",
    "uniform": "per-point taus at the same quantile of each point's dense s/ref, global-scale controller",
    "uniform_nofc": "the same without the classifier's input",
    "uniform_pp_nofc": "uniform, one controller per point (each point's drop held at the same fraction)",
    "uniform_floor30_nofc": "uniform_nofc with a floor of 30% of each point's channels",
    "topk_nofc": "every image keeps the same number of channels per point (its strongest): dynamic choice, fixed count",
    "hybrid45_nofc": "static cut to 45% (as static_nofc), then uniform dynamic thresholds for the rest",
    "uniform_ste50_nofc": "uniform_nofc with a straight-through gate (temperature 0.5 x threshold)",
    "uniform_ste20_nofc": "uniform_nofc with a straight-through gate (temperature 0.2 x threshold)",
    "frozen_nofc": "uniform_nofc, but each batch's masks come from a frozen copy of the starting weights "
                   "(per-image masks that do not move while training; evaluated with the model's own masks)",
    "uniform_rescale_nofc": "uniform_nofc with energy-preserving masks (kept channels scaled per image so the "
                            "input keeps its energy)",
    "uniform_ramp90_nofc": "uniform_nofc with the target ramped over 90% of the phase instead of 30%",
    "static_nofc": "the same channels for every image (lowest mean holdout saliency), same fraction per point",
}


def _meta(args: argparse.Namespace) -> dict:
    return run_meta("pa_allocation.py", sys.argv[1:], threads_per_variant=args.threads,
                    config={k: v for k, v in vars(args).items() if k not in ("variant",)})


def write_table(out: Path) -> str:
    """``pa_allocation.md`` over every variant measured under ``out`` (one table per target)."""
    lines = ["# Side study: the prune-aware phase with dynamic vs static masks (ResNet-20, short budget)", "",
             "`python benchmarks/pa_allocation.py`: masks on from the l1max 0.05 fine-tune, penalty off, lr 0.02 "
             "cosine, 3 epochs of 6,400 training images (150 steps of 128), the FLOPs target ramped over the first "
             "30% where a controller is used; holdout top-1 on 1,000 held-out images with the global scale "
             "re-bisected to the target, then after re-estimating BatchNorm statistics under the masks on 1,000 "
             "training images. JSON per variant in `results/pa_allocation/target_<t>/` (command, commit, torch, "
             "date inside; for the first runs in `invocations/`).", ""]
    for d in sorted(out.glob("target_*")):
        rows = [json.loads(f.read_text()) for f in sorted(d.glob("*.json"))]
        if not rows:
            continue
        lines += [f"Target {d.name[7:]}:", "", "| variant | what | points | train top-1 per epoch | holdout top-1 "
                  "(reduction) | after BN re-estimation | train s |", "|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: -r["holdout_bn_recal"]["top1"]):
            h, a, b = r["history"], r["holdout"], r["holdout_bn_recal"]
            lines.append(f"| {r['variant']} | {VARIANT_DOC.get(r['variant'], '')} | {r['points']} | "
                         f"{' / '.join(format(x['train_top1'], '.3f') for x in h)} | {a['top1']:.3f} "
                         f"({a['flops_reduction']:.3f}) | {b['top1']:.3f} ({b['flops_reduction']:.3f}) | "
                         f"{r['train_seconds']:.0f} |")
        lines.append("")
    text = "\n".join(lines)
    atomic_write_text(out / "pa_allocation.md", text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--checkpoint")
    ap.add_argument("--data-path")
    ap.add_argument("--holdout", type=int, default=5000)
    ap.add_argument("--images", type=int, default=6400, help="training subset (per epoch)")
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--ramp", type=float, default=0.3)
    ap.add_argument("--mode", default="max")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="shared,shared_nofc,uniform_nofc")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # one variant in this process (used by the driver)
    ap.add_argument("--out", default="results/pa_allocation")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--table-only", action="store_true", help="only rewrite pa_allocation.md from the JSON files")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table_only:
        print(write_table(out))
        return 0
    if not args.checkpoint or not args.data_path:
        print("error: --checkpoint and --data-path are required", file=sys.stderr)
        return 2
    tdir = out / f"target_{args.target}"
    if args.variant:
        atomic_write_json(tdir / f"{args.variant}.json", {**run_variant(args, args.variant), "meta": _meta(args)})
        return 0
    unknown = [v for v in args.variants.split(",") if v not in VARIANT_DOC]
    if unknown:
        print(f"error: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANT_DOC)}", file=sys.stderr)
        return 2
    tdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    for v in args.variants.split(","):
        while sum(p.poll() is None for p in procs) >= args.parallel:
            time.sleep(2)
        procs.append(subprocess.Popen([sys.executable, *sys.argv, "--variant", v],
                                      env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}))
    rc = [p.wait() for p in procs]
    if any(rc):
        print(f"error: a variant failed (exit codes {rc})", file=sys.stderr)
        return 1
    print(write_table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
