"""Batching and augmentation of in-memory uint8 image sets, reproducible per sample.

Every random choice is a pure function of ``(seed, epoch, dataset index)``: the shuffle order comes from
``(seed, epoch)`` and each sample's crop offsets and flip bit from an integer hash of
``(seed, epoch, index)``, computed vectorised in int64 torch arithmetic (values kept below 2**32, products
below 2**63, so nothing overflows). Hence a sample is augmented identically whatever batch it lands in, on any
rank or process, and a data-parallel run whose ranks take ``shard_indices(...)`` sees exactly the images of
a single-process run.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from instaprune.core.errors import ConfigError

if TYPE_CHECKING:
    from instaprune.data.datasets import ImageSet

__all__ = ["AUGMENTATIONS", "augment_params", "augment_batch", "epoch_permutation", "shard_indices",
           "iterate_batches"]

AUGMENTATIONS = ("cifar", "flip")  # plus None / "none"
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

IntLike = int | torch.Tensor


def _mul32(x: IntLike, c: int) -> IntLike:
    """``(x * c) mod 2**32`` for 0 <= x, c < 2**32 without exceeding 2**48 in between."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: IntLike) -> IntLike:
    """A 32-bit integer finaliser ("lowbias32", C. Wellons); works on Python ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _stream_keys(seed: int, epoch: int) -> tuple[int, int]:
    s = _mix32((seed & _M32) ^ _mix32((seed >> 32) & _M32))
    e = _mix32((epoch & _M32) ^ _GOLDEN)
    return int(_mix32(s ^ e)), int(_mix32(s ^ _mix32(e ^ 0x85EBCA6B)))


def augment_params(indices: torch.Tensor, seed: int, epoch: int, pad: int) -> tuple[torch.Tensor, ...]:
    """Per-sample ``(dy, dx, flip)``: crop offsets in ``[0, 2 * pad]`` and a 0/1 flip bit (int64 tensors)."""
    k1, k2 = _stream_keys(seed, epoch)
    key = _mix32(_mix32((indices.to(torch.int64) & _M32) ^ k1) ^ k2)
    draws = [_mix32(key ^ ((j * _GOLDEN) & _M32)) for j in (1, 2, 3)]
    span = 2 * pad + 1
    return draws[0] % span, draws[1] % span, draws[2] >> 31


def augment_batch(images: torch.Tensor, indices: torch.Tensor, mode: str | None, seed: int, epoch: int,
                  pad: int = 4) -> torch.Tensor:
    """Augment a uint8 batch (B, C, H, W) whose rows are dataset samples ``indices``.

    ``"cifar"``: random crop of the ``pad``-pixel zero-padded image + horizontal flip (each with probability
    1/2); ``"flip"``: horizontal flip only; ``None``/``"none"``: unchanged. One vectorised gather, no loops.
    """
    if mode is None or mode == "none":
        return images
    if mode not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)} or none, got {mode!r}")
    if pad < 0:
        raise ConfigError(f"augmentation padding must be >= 0, got {pad}")
    b, c, h, w = images.shape
    if mode == "flip":
        pad = 0
    dy, dx, flip = augment_params(indices, seed, epoch, pad)
    src = F.pad(images, (pad, pad, pad, pad)) if pad else images
    hp, wp = src.shape[-2:]
    ar_w = torch.arange(w)
    cols = torch.where(flip[:, None].bool(), (w - 1) - ar_w, ar_w) + dx[:, None]  # (B, W)
    rows = torch.arange(h) + dy[:, None]  # (B, H)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return src.reshape(b, c, hp * wp).gather(2, flat).reshape(b, c, h, w)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle order of ``epoch`` (a permutation of ``range(n)``), a pure function of its arguments."""
    k1, k2 = _stream_keys(seed, epoch)
    g = torch.Generator().manual_seed((k1 << 31) ^ k2)
    return torch.randperm(n, generator=g)


def shard_indices(n: int, rank: int, world_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                  drop_last: bool = False) -> torch.Tensor:
    """The dataset indices rank ``rank`` of ``world_size`` should pass to :func:`iterate_batches` (with
    ``shuffle=False``), like DistributedSampler: the global epoch order, padded by wrapping around (or
    truncated with ``drop_last``) to a multiple of ``world_size``, then dealt round-robin. Batch ``k`` of
    every rank together is batch ``k`` of a single process using ``batch_size * world_size``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    order = epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)
    if drop_last:
        order = order[: n // world_size * world_size]
    elif n % world_size and n:
        total = -(-n // world_size) * world_size
        order = order.repeat(-(-total // n))[:total]
    return order[rank::world_size]


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    shuffle: bool = False,
    augment: str | None = None,
    seed: int = 0,
    epoch: int = 0,
    channels_last: bool = False,
    drop_last: bool = False,
    indices: Sequence[int] | torch.Tensor | None = None,
    pad: int = 4,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels, dataset_indices)`` batches of an in-memory set.

    Images are float32 ``(x / 255 - mean) / std``, augmented on uint8 before conversion (see
    :func:`augment_batch`; ``pad`` is the crop padding of ``"cifar"``). ``indices`` restricts (and orders)
    the samples visited; ``shuffle`` permutes them by :func:`epoch_permutation` of ``(seed, epoch)``.
    Arguments are validated on the call, not on the first ``next``.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if augment not in (None, "none", *AUGMENTATIONS):
        raise ConfigError(f"augment must be one of {', '.join(AUGMENTATIONS)} or none, got {augment!r}")
    n, c = len(data), int(data.images.shape[1])
    if len(mean) != c or len(std) != c:
        raise ConfigError(f"mean/std need {c} values (one per channel), got {len(mean)} and {len(std)}")
    if any(float(s) <= 0 for s in std):
        raise ConfigError(f"std must be positive, got {tuple(std)}")
    order = torch.arange(n) if indices is None else torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
    if order.numel() and (int(order.min()) < 0 or int(order.max()) >= n):
        raise ConfigError(f"batch indices must lie in [0, {n}), got [{int(order.min())}, {int(order.max())}]")
    if shuffle:
        order = order[epoch_permutation(order.numel(), seed, epoch)]
    m = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor([float(v) for v in std], dtype=torch.float32).view(1, c, 1, 1)
    return _batches(data, order, batch_size, m, s, augment, seed, epoch, channels_last, drop_last, pad)


def _batches(data: ImageSet, order: torch.Tensor, batch_size: int, mean: torch.Tensor, std: torch.Tensor,
             augment: str | None, seed: int, epoch: int, channels_last: bool, drop_last: bool,
             pad: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for start in range(0, order.numel(), batch_size):
        idx = order[start:start + batch_size]
        if drop_last and idx.numel() < batch_size:
            return
        x = augment_batch(data.images[idx], idx, augment, seed, epoch, pad)
        x = x.to(torch.float32).div_(255.0).sub_(mean).div_(std)
        if channels_last:  # converting the float batch is faster than converting uint8 first
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, data.labels[idx], idx
