"""Training and fine-tuning with feature decay (and an optional prune-aware phase with masks applied).

SGD (momentum, optional Nesterov) with a cosine schedule, channels-last, optional bf16 autocast, gradient
accumulation, per-epoch metrics in ``metrics.jsonl`` and crash-safe, resumable checkpoints. The library never
prints: pass ``progress`` (a callable receiving a dict per step) to render a progress bar.

Multi-process: under an initialised process group (see :mod:`instaprune.distributed`, e.g. launched by
``torchrun``) the model is wrapped in DistributedDataParallel, each rank trains on its
:func:`~instaprune.data.shard_indices` share (``drop_last``), ``batch_size`` is per process (global batch =
``batch_size * world_size``, recorded in every metrics row), epoch metrics and validation accuracy are
all-reduced, and only rank 0 reports progress and writes files. ``freeze_bn`` keeps BatchNorm in eval mode
(running statistics) while training; ``sync_bn`` uses SyncBatchNorm (CUDA only).

Crash safety (files in ``out_dir``, see :mod:`instaprune.artifacts`): ``checkpoint.pt`` is written
atomically every ``checkpoint_every`` optimizer steps, at every epoch end, and when SIGINT/SIGTERM arrives
(the signal is honoured at the next optimizer step, agreed on by all ranks; a second signal stops at once).
``resume`` continues mid-epoch by skipping the batches already done: the data order and augmentation are pure
functions of ``(seed, epoch, sample index)`` and the RNG states are restored, so the final weights are
bit-identical to an uninterrupted run. ``resume="auto"`` (and any torchrun elastic restart) resumes from
``out_dir/checkpoint.pt`` when it exists.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from instaprune.core.config import ConfigMixin, Preprocessing, check_fields
from instaprune.core.distributed import (
    DistEnv,
    all_reduce_sum,
    any_rank,
    current_env,
    freeze_batchnorm,
    gather_objects,
    maybe_no_sync,
    shard_dataset,
    wrap_ddp,
)
from instaprune.core.errors import CheckpointError, ConfigError, ModelError
from instaprune.core.io import atomic_write_text
from instaprune.data.datasets import ImageSet, iterate_batches, shard_indices
from instaprune.method.masked import MaskedModel
from instaprune.method.points import PointReport
from instaprune.method.prune_aware import TargetController
from instaprune.method.regularizer import FeatureDecayConfig, attach_feature_decay
from instaprune.method.scoring import score_batches
from instaprune.training.artifacts import (
    FAULT_EXIT_CODE,
    StopOnSignal,
    capture_rng,
    faults_from_env,
    read_training_checkpoint,
    remove_partial_writes,
    restore_rng,
    write_training_checkpoint,
)

__all__ = ["AUGMENTS", "CHECKPOINT_NAME", "DISTILL_WITH_TEACHER", "TrainConfig", "TrainResult", "train",
           "evaluate_top1"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
_NOT_COMPARED = ("epochs", "checkpoint_every")  # may change between a run and its resumption
#: training augmentations (``augment=None``: none): random crop (pad ``augment_pad``) + flip, or flip only
AUGMENTS = ("cifar", "flip")
#: distillation weight when a teacher is there and ``TrainConfig.distill`` is not set: the gated and static trainings
#: distil from their dense starting model (study 2, ResNet-20 holdout at 60%, 6 epochs: hard gates 0.8612 with 0.5
#: vs 0.8350 without, static L1 0.8714 vs 0.8574)
DISTILL_WITH_TEACHER = 0.5


@dataclass(frozen=True)
class TrainConfig(ConfigMixin):
    """SGD with a cosine schedule (``warmup_epochs`` linear warm-up), feature ``decay``, optional distillation,
    augmentation, bf16 autocast, accumulation and checkpointing (see the module docstring)."""

    epochs: int = 10
    batch_size: int = 128  # per process
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    label_smoothing: float = 0.0
    # weight a of distillation (needs a teacher): (1 - a) CE + a T^2 KL(teacher || model); None: distill_weight()
    distill: float | None = None
    distill_temperature: float = 4.0
    augment: str | None = "cifar"
    augment_pad: int = 4  # zero padding of the random crop ("cifar" augmentation)
    channels_last: bool = True
    amp: bool = False  # bf16 autocast (no gradient scaler needed)
    accumulate: int = 1
    seed: int = 0
    decay: FeatureDecayConfig = field(default_factory=FeatureDecayConfig)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = epoch ends (and signals) only
    freeze_bn: bool = False  # BatchNorm in eval mode while training (frozen running statistics)
    sync_bn: bool = False  # SyncBatchNorm under DDP (CUDA only)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.epochs < 0 or self.batch_size < 1 or self.accumulate < 1:
            raise ConfigError("epochs must be >= 0, batch_size and accumulate >= 1")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"invalid optimiser settings: lr={self.lr}, wd={self.weight_decay}, "
                              f"momentum={self.momentum}")
        if self.augment is not None and self.augment not in AUGMENTS:
            raise ConfigError(f"augment must be cifar, flip or none, got {self.augment!r}")
        if (self.distill is not None and not 0.0 <= self.distill <= 1.0) or not self.distill_temperature > 0:
            raise ConfigError(f"distill must be in [0, 1] and distill_temperature > 0, got {self.distill}, "
                              f"{self.distill_temperature}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 (0 = epoch ends only), got "
                              f"{self.checkpoint_every}")

    def distill_weight(self, teacher: bool) -> float:
        """The distillation weight a run uses: ``distill`` if set, else :data:`DISTILL_WITH_TEACHER` with a
        teacher and 0 without."""
        if self.distill is not None:
            return self.distill
        return DISTILL_WITH_TEACHER if teacher else 0.0



@dataclass
class TrainResult:
    epochs: int
    history: list[dict[str, Any]]
    seconds: float
    world_size: int = 1
    global_batch: int = 0  # batch_size * world_size (samples per forward over all ranks)
    steps: int = 0  # optimizer steps since the start of training (including those before a resume)
    resumed_from: str | None = None


def _lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at fractional epoch ``progress``: linear warm-up then cosine to ``min_lr``."""
    if cfg.warmup_epochs > 0 and progress < cfg.warmup_epochs:
        return cfg.lr * (progress + 1e-3) / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    t = min(max((progress - cfg.warmup_epochs) / span, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_top1(model: nn.Module, data: ImageSet, pre: Preprocessing, batch_size: int = 256,
                  channels_last: bool = False, distributed: bool = False) -> float:
    """Top-1 accuracy; ``distributed``: each rank evaluates its strided share and the counts are all-reduced
    (every rank must call it)."""
    idx = shard_dataset(len(data)) if distributed else None
    batches = iterate_batches(data, batch_size, pre.mean, pre.std, channels_last=channels_last, indices=idx)
    correct = score_batches(model, batches, device=_device_of(model)).correct
    seen = len(data) if idx is None else int(idx.numel())
    if distributed:
        correct, seen = (int(round(v)) for v in all_reduce_sum([correct, seen]))
    return correct / max(seen, 1)


def _distill_term(logits: torch.Tensor, teacher: nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target term ``T^2 KL(softmax(t / T) || softmax(s / T))`` (batch mean)."""
    with torch.no_grad():
        target = F.log_softmax(teacher(x).float() / temperature, dim=1)
    student = F.log_softmax(logits.float() / temperature, dim=1)
    return F.kl_div(student, target, reduction="batchmean", log_target=True) * temperature**2


class _Trainer:
    def __init__(self, model: nn.Module, data: ImageSet, cfg: TrainConfig, points: PointReport,
                 pre: Preprocessing, out: Path | None, val: ImageSet | None, masked: MaskedModel | None,
                 progress: Callable[[dict[str, Any]], None] | None, env: DistEnv,
                 teacher: nn.Module | None = None, controller: TargetController | None = None) -> None:
        self.model, self.data, self.cfg, self.pre, self.out, self.val = model, data, cfg, pre, out, val
        self.net: nn.Module = masked if masked is not None else model
        self.progress = progress if env.is_main else None
        self.env = env
        self.device = _device_of(model)
        self.decay = attach_feature_decay(model, cfg.decay, points)
        params_bn = [p for p in model.parameters() if p.ndim <= 1]
        params_w = [p for p in model.parameters() if p.ndim > 1]
        self.opt = torch.optim.SGD([{"params": params_w, "weight_decay": cfg.weight_decay},
                                    {"params": params_bn, "weight_decay": 0.0}], lr=cfg.lr,
                                   momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
        self.global_batch = cfg.batch_size * env.world_size
        self.epoch = self.step = self.global_step = 0
        self.sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, decay * n, correct, seen (this rank, this epoch)
        self.history: list[dict[str, Any]] = []
        self.resumed_from: str | None = None
        self.faults = faults_from_env()
        self.stop = StopOnSignal()
        self.ckpt = out / CHECKPOINT_NAME if out is not None else None
        self.teacher = teacher.eval() if teacher is not None else None
        self.distill = cfg.distill_weight(teacher is not None)
        self.controller = controller
        self.aux = getattr(masked, "pop_aux", None)

    # ------------------------------------------------------------------ checkpoints
    def resume(self, path: Path) -> None:
        state = read_training_checkpoint(path, self.model)
        self.opt.load_state_dict(state["optimizer"])
        saved = state.get("meta", {}).get("train_config", {})
        try:
            differs = bool(saved) and {k: v for k, v in TrainConfig.from_dict(saved).to_dict().items()
                                       if k not in _NOT_COMPARED} != {
                k: v for k, v in self.cfg.to_dict().items() if k not in _NOT_COMPARED}
        except (TypeError, ConfigError):
            differs = True
        if differs:
            log.warning("resuming with a training config that differs from the checkpoint's")
        self.epoch, self.step = int(state["epoch"]), int(state.get("step", 0))
        self.global_step = int(state.get("global_step", 0))
        sampler = state.get("sampler", {})
        same = sampler.get("global_batch") == self.global_batch and sampler.get("seed") == self.cfg.seed
        if self.step and not same:
            raise CheckpointError(
                f"{path} was written mid-epoch with global batch {sampler.get('global_batch')} and seed "
                f"{sampler.get('seed')}; resume with the same global batch (batch size x processes = "
                f"{self.global_batch} now) and seed {sampler.get('seed')}, or from an epoch-end checkpoint")
        ranks = state.get("ranks") or []
        if len(ranks) == self.env.world_size:
            restore_rng(ranks[self.env.rank]["rng"])
            self.sums = [float(v) for v in ranks[self.env.rank]["sums"]]
        elif ranks:
            log.warning("checkpoint written by %d processes, resuming with %d: RNG states of rank 0 reused",
                        len(ranks), self.env.world_size)
            restore_rng(ranks[0]["rng"])
            total = [sum(float(r["sums"][i]) for r in ranks) for i in range(4)]
            self.sums = total if self.env.is_main else [0.0] * 4
        self.history = list(state.get("history", []))
        if self.controller is not None and state.get("controller"):
            self.controller.load_state_dict(state["controller"])
        self.resumed_from = str(path)
        log.info("resumed from %s at epoch %d, step %d (optimizer step %d)", path, self.epoch, self.step,
                 self.global_step)

    def checkpoint(self, reason: str) -> None:
        """Write ``checkpoint.pt`` (a collective under DDP: every rank contributes its RNG state)."""
        if self.ckpt is None:
            return
        ranks = gather_objects({"rng": capture_rng(), "sums": list(self.sums)}, self.env)
        if not self.env.is_main:
            return
        f = self.faults
        die = self._armed_faults() and f.in_checkpoint is not None and self.global_step >= f.in_checkpoint
        write_training_checkpoint(self.ckpt, {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "meta": {"train_config": self.cfg.to_dict(), "preprocessing": self.pre.to_dict(),
                     "world_size": self.env.world_size, "global_batch": self.global_batch},
            "optimizer": self.opt.state_dict(), "epoch": self.epoch, "step": self.step,
            "global_step": self.global_step, "history": self.history, "ranks": ranks, "reason": reason,
            "controller": None if self.controller is None else self.controller.state_dict(),
            "sampler": {"seed": self.cfg.seed, "epoch": self.epoch, "offset": self.step * self.global_batch,
                        "global_batch": self.global_batch},
        }, die_midway=die)
        log.info("checkpoint (%s) at epoch %d step %d -> %s", reason, self.epoch, self.step, self.ckpt)

    def _armed_faults(self) -> bool:
        """Faults fire only in a run that did not resume (so the resumed run gets past them)."""
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0"
        return self.resumed_from is None and restarts == "0" and self.env.rank == self.faults.rank

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        cfg, env = self.cfg, self.env
        ddp = wrap_ddp(self.net, env, sync_bn=cfg.sync_bn, freeze_bn=cfg.freeze_bn)
        if cfg.sync_bn and not env.distributed:
            log.info("sync_bn has no effect in a single process")
        try:
            with self.stop.installed(self.ckpt is not None):
                for epoch in range(self.epoch, cfg.epochs):
                    self._epoch(ddp, epoch)
        finally:
            del ddp

    def _epoch(self, ddp: nn.Module, epoch: int) -> None:
        cfg, env, b = self.cfg, self.env, self.cfg.batch_size
        ddp.train()
        if cfg.freeze_bn:
            freeze_batchnorm(self.net)
        te = time.perf_counter()
        idx = shard_indices(len(self.data), env.rank, env.world_size, cfg.seed, epoch, shuffle=True,
                            drop_last=True)
        steps = max(idx.numel() // b, 1)
        skip = self.step if epoch == self.epoch else 0
        batches = iterate_batches(self.data, b, self.pre.mean, self.pre.std, augment=cfg.augment,
                                  seed=cfg.seed, epoch=epoch, channels_last=cfg.channels_last, drop_last=True,
                                  indices=idx[skip * b:], pad=cfg.augment_pad)
        lr = _lr_at(cfg, epoch + max(skip - 1, 0) / steps)  # the last step's, if a resume skips them all
        for step, (x, y, _) in enumerate(batches, start=skip):
            lr = _lr_at(cfg, epoch + step / steps)
            for g in self.opt.param_groups:
                g["lr"] = lr
            boundary = (step + 1) % cfg.accumulate == 0
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with maybe_no_sync(ddp, not boundary):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    logits = ddp(x)
                    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                    if self.teacher is not None and self.distill > 0:
                        ce = (1 - self.distill) * ce + self.distill * _distill_term(logits, self.teacher, x,
                                                                                    cfg.distill_temperature)
                reg = self.decay.pop()
                if self.aux is not None:  # gates: predictor fit and feature decay of the gated features
                    reg = reg + self.aux()
                ((ce + reg) / cfg.accumulate).backward()
            if boundary:
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.global_step += 1
                if self.controller is not None:  # the FLOPs target of the prune-aware phase (this batch's masks)
                    self.controller.step((epoch + (step + 1) / steps) / max(cfg.epochs, 1), env.world_size)
            n = x.shape[0]
            ce_v, reg_v = float(ce.detach()), float(reg.detach())
            if not math.isfinite(ce_v + reg_v):  # stop at once: NaN weights would train (and checkpoint) for nothing
                raise ModelError(f"training diverged: the loss is {ce_v + reg_v} at epoch {epoch + 1}, step "
                                 f"{step + 1} (try a lower --lr)")
            self.sums = [self.sums[0] + ce_v * n, self.sums[1] + reg_v * n,
                         self.sums[2] + float((logits.argmax(1) == y).sum()), self.sums[3] + n]
            self.epoch, self.step = epoch, step + 1
            if self.progress is not None:
                self.progress({"epoch": epoch, "epochs": cfg.epochs, "step": step, "steps": steps, "loss": ce_v,
                               "decay": reg_v,
                               "lr": lr, "global_step": self.global_step})
            if boundary:
                self._after_optimizer_step(last=step + 1 >= steps)
        self.opt.zero_grad(set_to_none=True)
        loss, dec, correct, seen = all_reduce_sum(self.sums, env)
        seen = max(seen, 1)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss / seen, "decay_term": dec / seen,
               "train_top1": correct / seen, "seconds": time.perf_counter() - te,
               "world_size": env.world_size, "global_batch": self.global_batch}
        if self.controller is not None:
            row.update(self.controller.summary())
        if self.val is not None:
            row["val_top1"] = evaluate_top1(self.net, self.val, self.pre, channels_last=cfg.channels_last,
                                            distributed=env.distributed)
        self.history.append(row)
        self.epoch, self.step, self.sums = epoch + 1, 0, [0.0] * 4
        log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, row)
        if self.out is not None:
            self.checkpoint("epoch end")
            self.write_metrics()

    def _after_optimizer_step(self, last: bool) -> None:
        stop = self.stop.signum is not None
        if self.env.distributed and self.ckpt is not None:
            stop = any_rank(stop, self.env)  # every rank stops at the same step
        every = self.cfg.checkpoint_every
        if stop:
            self.stop.signum = self.stop.signum or signal.SIGTERM  # the signal may have reached another rank
            self.checkpoint(f"signal {signal.Signals(self.stop.signum).name}")
            self.stop.exit()
        if every and self.global_step % every == 0 and not last:
            self.checkpoint("periodic")
        f = self.faults
        if f.step is not None and self.global_step == f.step and self._armed_faults():
            log.error("fault injection: exiting after optimizer step %d", self.global_step)
            os._exit(FAULT_EXIT_CODE)
        if f.delay:
            time.sleep(f.delay)

    def write_metrics(self) -> None:
        if self.out is not None and self.env.is_main:
            atomic_write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))


def _resume_path(resume: str | Path | None, ckpt: Path | None, env: DistEnv) -> Path | None:
    restarted = (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or "0") != "0"
    if resume is not None and str(resume) != "auto":
        return Path(resume)
    if (resume is not None or restarted) and ckpt is not None and ckpt.is_file():
        if restarted and resume is None and env.is_main:
            log.warning("torchrun restarted this worker: resuming from %s", ckpt)
        return ckpt
    if resume is not None and ckpt is None:
        raise ConfigError("resume='auto' needs an output directory")
    return None


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
    teacher: nn.Module | None = None,
    controller: TargetController | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data``; with ``masked`` (wrapping ``model``) the forward applies its
    masks (prune-aware phase). Writes ``metrics.jsonl`` and ``checkpoint.pt`` to ``out_dir`` when given
    (rank 0 only). ``controller`` (prune-aware phase) adjusts the masks' global scale after every optimizer step
    to hold the FLOPs reduction at its target (see :mod:`instaprune.prune_aware`).

    ``resume``: a checkpoint path, or ``"auto"`` for ``out_dir/checkpoint.pt`` if it exists. Under an
    initialised process group the training is data-parallel (see the module docstring)."""
    t0 = time.perf_counter()
    env = current_env()
    torch.manual_seed(cfg.seed)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    out = Path(out_dir) if out_dir is not None else None
    if cfg.distill and teacher is None:
        raise ConfigError("distill > 0 needs a teacher model")
    tr = _Trainer(model, data, cfg, points, pre, out, val, masked, progress, env, teacher, controller)
    try:
        path = _resume_path(resume, tr.ckpt, env)
        if tr.ckpt is not None and env.is_main:
            out.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            remove_partial_writes(tr.ckpt)
        if path is not None:
            tr.resume(path)
        tr.run()
        tr.write_metrics()
    finally:
        tr.decay.remove()
        if cfg.channels_last:
            model.to(memory_format=torch.contiguous_format)
    return TrainResult(cfg.epochs, tr.history, time.perf_counter() - t0, env.world_size, tr.global_batch,
                       tr.global_step, tr.resumed_from)
