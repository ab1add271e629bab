"""Worker of ``test_ddp.py``: train with feature decay, then analyse saliencies, in 1 process or under
torchrun: ``python ddp_worker.py OUT BATCH [lam]`` or ``torchrun --nproc-per-node=N ddp_worker.py OUT BATCH``.
Rank 0 saves the final weights, the history and the all-reduced saliency statistics to OUT.
"""
from __future__ import annotations

import sys

import torch

from instaprune.core.config import Preprocessing
from instaprune.core.distributed import init_from_env, shard_dataset, shutdown
from instaprune.data.datasets import ImageSet, iterate_batches
from instaprune.data.synthetic import make_dataset, mean_std
from instaprune.method.analysis import analyze
from instaprune.method.points import find_prune_points
from instaprune.method.regularizer import FeatureDecayConfig
from instaprune.models import build_model
from instaprune.training.loop import TrainConfig, train

IMAGES, SIZE = 160, 16  # 160 // 16 = 10 steps per epoch at a global batch of 16; 2 epochs = 20 steps


def main(out: str, batch: int, lam: float = 0.5) -> None:
    torch.set_num_threads(1)
    env = init_from_env()
    ok = False
    try:
        d = make_dataset(IMAGES, seed=5, size=SIZE)
        mean, std = mean_std(d)
        data, pre = ImageSet(d.images, d.labels, d.class_names), Preprocessing(mean, std, SIZE)
        torch.manual_seed(0)
        model = build_model("tiny_resnet", 10)
        points = find_prune_points(model, torch.zeros(1, 3, SIZE, SIZE))
        cfg = TrainConfig(epochs=2, batch_size=batch, lr=0.05, augment="cifar", freeze_bn=True, seed=1,
                          decay=FeatureDecayConfig(lam, "l1max"))
        res = train(model, data, cfg, points, pre)
        # each rank analyses its strided share; analyze() all-reduces the sums
        idx = shard_dataset(len(data), env)
        batches = [x for x, _, _ in iterate_batches(data, 32, pre.mean, pre.std, indices=idx)]
        stats = analyze(model, batches, points)
        if env.is_main:
            torch.save({"state": model.state_dict(), "stats": stats.to_dict(), "history": res.history,
                        "steps": res.steps, "global_batch": res.global_batch, "world_size": res.world_size},
                       out)
        ok = True
    finally:
        shutdown(sync=ok)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *(float(a) for a in sys.argv[3:]))
