"""The static baseline of the CIFAR-10 study (row 5): L1-norm filter pruning to the same MACs, fine-tuned.

Run as ``python benchmarks/cifar10_study.py static-stage ...`` (the study's runner does); this module holds the
stage so the study script stays about planning and running stages.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path


def static_stage(a: argparse.Namespace, lr: float, pa_lr: float) -> int:
    """L1-norm filter pruning of the adapted model to ``--target`` MACs reduction, fine-tuned with fixed masks
    (``--epochs`` at ``lr`` cosine, then ``--pa-epochs`` at ``pa_lr``: the method's schedule), evaluated on test."""
    import numpy as np
    import torch

    from instaprune.baselines.static import apply_masks, find_pairs, static_plan
    from instaprune.core.io import atomic_write, atomic_write_json
    from instaprune.data.datasets import iterate_batches
    from instaprune.method.regularizer import FeatureDecayConfig
    from instaprune.pipeline.stages import discover, load_model, load_split
    from instaprune.training.checkpoint import save_checkpoint
    from instaprune.training.loop import TrainConfig, evaluate_top1, train

    t0 = time.perf_counter()
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(a.model, a.checkpoint)
    train_set = load_split(a.train_data, lm.pre, a.holdout, "train")
    val = load_split(a.train_data, lm.pre, a.holdout, "holdout")
    test = load_split(a.test_data, lm.pre)
    points = discover(lm.model, lm.pre)
    x = torch.zeros(1, 3, lm.pre.input_size or 32, lm.pre.input_size or 32)
    plan_file = out / "static_plan.json"
    if plan_file.is_file():  # resumed: the masks come from the original (pre-fine-tune) weights
        from instaprune.baselines.static import StaticPlan

        plan = StaticPlan.from_dict(json.loads(plan_file.read_text()), find_pairs(lm.model, x)[0])
    else:
        plan = static_plan(lm.model, x, a.target, scope=a.scope)
        atomic_write_json(plan_file, plan.to_dict())
    handles = apply_masks(lm.model, plan)
    base = TrainConfig(epochs=a.epochs, batch_size=128, lr=lr, weight_decay=1e-4, checkpoint_every=100,
                       decay=FeatureDecayConfig(0.0))
    history = []
    for i, cfg in enumerate([base] + ([replace(base, epochs=a.pa_epochs, lr=pa_lr)] if a.pa_epochs else [])):
        res = train(lm.model, train_set, cfg, points, lm.pre, out / f"phase{i + 1}", val, resume="auto")
        history += res.history
    lm.model.eval()
    correct = []
    with torch.no_grad():
        for xb, yb, _ in iterate_batches(test, 256, lm.pre.mean, lm.pre.std):
            correct.append(lm.model(xb).argmax(1) == yb)
    corr = torch.cat(correct).numpy()
    val_top1 = evaluate_top1(lm.model, val, lm.pre)
    for h in handles:
        h.remove()
    save_checkpoint(out / "model.pt", lm.model, {"model_name": a.model, "preprocessing": lm.pre.to_dict()})
    atomic_write(out / "per_image.npz", lambda f: np.savez_compressed(f, correct=corr))
    top1 = float(corr.mean())
    atomic_write_json(out / "metrics.json", {
        "method": "static L1-norm filter pruning (Li et al. 2017), block-internal channels", "scope": a.scope,
        "target": a.target, "flops_reduction": plan.reduction, "macs": plan.macs, "dense_macs": plan.dense_macs,
        "top1": top1, "dense_top1": top1, "val_top1": val_top1, "epochs": a.epochs, "pa_epochs": a.pa_epochs,
        "history": history, "seconds": time.perf_counter() - t0})
    return 0
