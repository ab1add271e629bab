"""Training and fine-tuning with feature decay (and an optional prune-aware phase with masks applied).

SGD (momentum, optional Nesterov) with a cosine schedule, channels-last, optional bf16 autocast, gradient
accumulation, per-epoch metrics appended to ``metrics.jsonl`` and an atomically written, resumable checkpoint.
The library never prints: pass ``progress`` (a callable receiving a dict per step) to render a progress bar.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_weights
from .config import Preprocessing
from .data import ImageSet, iterate_batches
from .errors import CheckpointError, ConfigError
from .io import atomic_torch_save
from .masked import MaskedModel
from .points import PointReport
from .regularizer import FeatureDecayConfig, attach_feature_decay

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate_top1"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    augment: str | None = "cifar"
    augment_pad: int = 4  # zero padding of the random crop ("cifar" augmentation)
    channels_last: bool = True
    amp: bool = False  # bf16 autocast on CPU
    accumulate: int = 1
    seed: int = 0
    decay: FeatureDecayConfig = field(default_factory=FeatureDecayConfig)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.accumulate < 1:
            raise ConfigError("epochs must be >= 0, batch_size and accumulate >= 1")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"invalid optimiser settings: lr={self.lr}, wd={self.weight_decay}, "
                              f"momentum={self.momentum}")
        if self.augment not in (None, "cifar", "flip"):
            raise ConfigError(f"augment must be cifar, flip or none, got {self.augment!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if isinstance(d.get("decay"), dict):
            d["decay"] = FeatureDecayConfig(**d["decay"])
        return cls(**d)


@dataclass
class TrainResult:
    epochs: int
    history: list[dict[str, Any]]
    seconds: float


def _lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at fractional epoch ``progress``: linear warm-up then cosine to ``min_lr``."""
    if cfg.warmup_epochs > 0 and progress < cfg.warmup_epochs:
        return cfg.lr * (progress + 1e-3) / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    t = min(max((progress - cfg.warmup_epochs) / span, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate_top1(model: nn.Module, data: ImageSet, pre: Preprocessing, batch_size: int = 256,
                  channels_last: bool = False) -> float:
    model.eval()
    correct = 0
    for x, y, _ in iterate_batches(data, batch_size, pre.mean, pre.std, channels_last=channels_last):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / max(len(data), 1)


def train(
    model: nn.Module,
    data: ImageSet,
    cfg: TrainConfig,
    points: PointReport,
    pre: Preprocessing,
    out_dir: str | Path | None = None,
    val: ImageSet | None = None,
    resume: str | Path | None = None,
    masked: MaskedModel | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``; with ``masked`` (wrapping ``model``) the forward applies its masks
    (prune-aware phase). Writes ``metrics.jsonl`` and ``checkpoint.pt`` to ``out_dir`` when given."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = masked if masked is not None else model
    decay = attach_feature_decay(model, cfg.decay, points)
    params_bn = [p for n, p in model.named_parameters() if p.ndim <= 1]
    params_w = [p for n, p in model.named_parameters() if p.ndim > 1]
    opt = torch.optim.SGD([{"params": params_w, "weight_decay": cfg.weight_decay},
                           {"params": params_bn, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    start_epoch, history = 0, []
    out = Path(out_dir) if out_dir is not None else None
    if resume is not None:
        start_epoch, history = _resume(resume, model, opt, cfg)
    steps_per_epoch = max(len(data) // cfg.batch_size, 1)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            te = time.perf_counter()
            tot_loss = tot_decay = correct = seen = 0.0
            batches = iterate_batches(data, cfg.batch_size, pre.mean, pre.std, shuffle=True, augment=cfg.augment,
                                      seed=cfg.seed, epoch=epoch, channels_last=cfg.channels_last, drop_last=True,
                                      pad=cfg.augment_pad)
            for step, (x, y, _) in enumerate(batches):
                lr = _lr_at(cfg, epoch + step / steps_per_epoch)
                for g in opt.param_groups:
                    g["lr"] = lr
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.amp):
                    logits = net(x)
                    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                reg = decay.pop()
                loss = (ce + reg) / cfg.accumulate
                loss.backward()
                if (step + 1) % cfg.accumulate == 0:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                n = x.shape[0]
                tot_loss += float(ce.detach()) * n
                tot_decay += float(reg.detach()) * n
                correct += float((logits.argmax(1) == y).sum())
                seen += n
                if progress is not None:
                    progress({"epoch": epoch, "step": step, "steps": steps_per_epoch, "loss": float(ce.detach()),
                              "decay": float(reg.detach()), "lr": lr})
            opt.zero_grad(set_to_none=True)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": tot_loss / max(seen, 1),
                   "decay_term": tot_decay / max(seen, 1), "train_top1": correct / max(seen, 1),
                   "seconds": time.perf_counter() - te}
            if val is not None:
                row["val_top1"] = evaluate_top1(net, val, pre, channels_last=cfg.channels_last)
            history.append(row)
            log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, row)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                atomic_torch_save(out / "checkpoint.pt", {
                    "format": "instaprune-checkpoint", "version": 1, "model": model.state_dict(),
                    "meta": {"train_config": cfg.to_dict(), "preprocessing": pre.to_dict()},
                    "optimizer": opt.state_dict(), "epoch": epoch + 1, "history": history,
                })
    finally:
        decay.remove()
        if cfg.channels_last:
            model.to(memory_format=torch.contiguous_format)
    return TrainResult(cfg.epochs, history, time.perf_counter() - t0)


def _resume(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer,
            cfg: TrainConfig) -> tuple[int, list[dict[str, Any]]]:
    load_weights(model, path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a resumable training checkpoint (no optimizer state)")
    saved = state.get("meta", {}).get("train_config", {})
    if saved and replace(cfg, epochs=saved.get("epochs", cfg.epochs)).to_dict() != TrainConfig.from_dict(
            saved).to_dict():
        log.warning("resuming with a training config that differs from the checkpoint's")
    opt.load_state_dict(state["optimizer"])
    log.info("resumed from %s at epoch %d", path, state["epoch"])
    return int(state["epoch"]), list(state.get("history", []))
