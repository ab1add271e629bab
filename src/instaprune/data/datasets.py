"""Local-only image data: decode a dataset once into a uint8 tensor, split it, stream large folders.

Two ways in, both offline (nothing is ever downloaded):

- :func:`load_dataset` (-> :func:`load_image_folder` / :func:`load_cifar_batches`) decodes a whole split once
  into an :class:`ImageSet` (uint8 ``(N, 3, H, W)`` + int64 labels) held in memory. Small sets (CIFAR: 10,000
  32x32 images = 30 MB) are then batched by :func:`~instaprune.augment.iterate_batches` with no DataLoader, no
  worker processes and no per-epoch decoding; augmentation runs vectorised on uint8 batches.
- :func:`make_folder_loader` streams an ImageNet-size folder through torchvision ``ImageFolder`` + the
  standard transforms for sets that do not fit in memory.

Class indices follow torchvision's ``ImageFolder`` convention (sorted sub-folder names, every sub-folder a
class), so checkpoints trained elsewhere on the same folder agree on labels.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from instaprune.core.config import Preprocessing
from instaprune.core.errors import ConfigError, DataError
from instaprune.data.augment import epoch_permutation, iterate_batches, shard_indices

__all__ = [
    "ImageSet",
    "CIFAR10_CLASSES",
    "load_image_folder",
    "load_cifar_batches",
    "load_dataset",
    "make_folder_loader",
    "iterate_batches",
    "epoch_permutation",
    "shard_indices",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)
_CHUNK = 128  # images decoded per thread-pool task


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A decoded split: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,), class names, and per-image
    sources (file paths; ``file#row`` for pickled CIFAR; may be empty for generated data)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...] = ()
    paths: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        im, lb = self.images, self.labels
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            raise DataError(f"ImageSet images must be a uint8 tensor (N, 3, H, W), got "
                            f"{getattr(im, 'dtype', type(im).__name__)} {tuple(getattr(im, 'shape', ()))}")
        if not isinstance(lb, torch.Tensor) or lb.dim() != 1 or lb.shape[0] != im.shape[0]:
            raise DataError(f"ImageSet labels must be a 1-D tensor of {im.shape[0]} labels, "
                            f"got {tuple(getattr(lb, 'shape', ()))}")
        if lb.dtype != torch.int64:
            object.__setattr__(self, "labels", lb.to(torch.int64))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        if self.paths and len(self.paths) != im.shape[0]:
            raise DataError(f"ImageSet has {im.shape[0]} images but {len(self.paths)} paths")
        if self.class_names and len(lb) and (int(lb.min()) < 0 or int(lb.max()) >= len(self.class_names)):
            raise DataError(f"ImageSet labels must lie in [0, {len(self.class_names)}), "
                            f"got [{int(lb.min())}, {int(lb.max())}]")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (from ``class_names``, else 1 + the largest label)."""
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if len(self) else 0

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageSet:
        """The images at ``indices`` (in that order), as a new set sharing class names."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise ConfigError(f"subset index out of range for a set of {len(self)} images")
        paths = tuple(self.paths[i] for i in idx.tolist()) if self.paths else ()
        return ImageSet(self.images[idx], self.labels[idx], self.class_names, paths)

    def sample(self, n: int, seed: int = 0) -> ImageSet:
        """A stratified, seeded sample of ``n`` images (every class in proportion, drawn by a permutation seeded
        with ``seed``; dataset order kept): what ``--max-images`` and friends use instead of the first ``n``
        images, which are in class order. The same as the held-out part of :meth:`split`."""
        if not 0 <= n <= len(self):
            raise ConfigError(f"sample size must be in [0, {len(self)}], got {n}")
        return self if n == len(self) else self.split(n, seed)[1]

    def split(self, n_holdout: int, seed: int) -> tuple[ImageSet, ImageSet]:
        """Deterministic stratified split -> ``(rest, holdout)`` with ``len(holdout) == n_holdout``.

        Each class gives ``n_holdout * n_c / N`` images (rounded by largest remainder, ties to the lower class
        index), drawn by a permutation seeded with ``seed``; both parts keep the original order.
        """
        n = len(self)
        if not 0 <= n_holdout <= n:
            raise ConfigError(f"holdout size must be in [0, {n}], got {n_holdout}")
        labels = self.labels
        classes, counts = torch.unique(labels, return_counts=True)
        exact = counts.double() * n_holdout / max(n, 1)
        quota = exact.floor().long()
        short = n_holdout - int(quota.sum())
        if short > 0:  # largest remainder; stable sort keeps ties in class order
            order = torch.sort(-(exact - quota.double()), stable=True).indices
            quota[order[:short]] += 1
        g = torch.Generator().manual_seed(int(seed))
        held = []
        for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
            members = torch.nonzero(labels == c).flatten()
            held.append(members[torch.randperm(members.numel(), generator=g)[:q]])
        mask = torch.zeros(n, dtype=torch.bool)
        if held:
            mask[torch.cat(held)] = True
        return self.subset(torch.nonzero(~mask).flatten()), self.subset(torch.nonzero(mask).flatten())


# ---------------------------------------------------------------- image folders


def _one_line(prefix: str, err: BaseException) -> str:
    detail = (str(err).strip().splitlines() or [""])[0]
    return f"{prefix}: {type(err).__name__}" + (f": {detail}" if detail else "")


def _check_dir(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    if not p.is_dir():
        raise DataError(f"data path is not a directory: {p}")
    return p


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (file, label) samples exactly as torchvision's ImageFolder would list them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    no_images = f"no images found in {root} (expected ImageFolder layout {root}/<class>/<image>)"
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise DataError(no_images) from None
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataError(no_images)
    empty = sorted(set(classes) - {classes[t] for _, t in samples})
    if empty:
        log.warning("%d class folder(s) in %s hold no images: %s", len(empty), root, ", ".join(empty[:5]))
    return classes, samples


def _decode(path: str, size: int | None, resize: int | None) -> np.ndarray:
    """One image -> HWC uint8 RGB array (ImageNet-style resize of the shorter side, then center crop)."""
    import torchvision.transforms.functional as TF

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DataError(_one_line(f"cannot read image {path}", err)) from None
    crop = size if size is not None else resize
    if resize is not None:
        img = TF.resize(img, resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    elif crop is not None and min(img.size) != crop:
        img = TF.resize(img, crop, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if crop is not None and img.size != (crop, crop):
        img = TF.center_crop(img, [crop, crop])
    return np.asarray(img)


def load_image_folder(path: str | Path, size: int | None = None, resize: int | None = None,
                      workers: int = 2) -> ImageSet:
    """Decode an ImageFolder-layout directory (``PATH/<class>/<image>``) once into memory.

    ``size``: output side; images are resized (shorter side) and center-cropped to it unless already
    ``size`` x ``size``. ``resize``: ImageNet-style eval preprocessing, shorter side to ``resize`` then center
    crop to ``size``. Without either, all images must share one size. ``workers`` threads decode in parallel
    (PIL releases the GIL while decoding).
    """
    for name, v in (("size", size), ("resize", resize)):
        if v is not None and v <= 0:
            raise ConfigError(f"{name} must be positive, got {v}")
    t0 = time.perf_counter()
    root = _check_dir(path)
    classes, samples = _scan_folder(root)
    files = [s for s, _ in samples]
    first = _decode(files[0], size, resize)
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first

    def work(start: int) -> None:
        for i in range(max(start, 1), min(start + _CHUNK, len(files))):
            arr = _decode(files[i], size, resize)
            if arr.shape != first.shape:
                raise DataError(f"image {files[i]} is {arr.shape[1]}x{arr.shape[0]} but {files[0]} is "
                                f"{first.shape[1]}x{first.shape[0]}; pass an input size to resize them")
            out[i] = arr

    starts = range(0, len(files), _CHUNK)
    if workers <= 1 or len(files) <= _CHUNK:
        for s in starts:
            work(s)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(work, s) for s in starts]:
                fut.result()  # re-raises the first DataError
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([t for _, t in samples], dtype=torch.int64)
    log.info("decoded %d images (%d classes, %dx%d) from %s in %.2f s", len(files), len(classes),
             images.shape[3], images.shape[2], root, time.perf_counter() - t0)
    return ImageSet(images, labels, tuple(classes), tuple(files))


# ---------------------------------------------------------------- CIFAR-10 python pickles


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except what plain numpy arrays need, so a hostile file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _read_pickle(path: Path) -> dict[bytes, Any]:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as err:
        raise DataError(_one_line(f"cannot read CIFAR batch {path}", err)) from None
    if not isinstance(obj, dict):
        raise DataError(f"CIFAR batch {path} does not hold a dict")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _cifar_dir(root: Path) -> Path | None:
    for d in (root, root / _CIFAR_DIR):
        if d.is_dir() and any((d / f).is_file() for f in (*_CIFAR_TRAIN, *_CIFAR_TEST)):
            return d
    return None


def _load_cifar_files(files: Sequence[Path], class_names: tuple[str, ...]) -> ImageSet:
    images, labels, paths = [], [], []
    for f in files:
        d = _read_pickle(f)
        if b"data" not in d or b"labels" not in d:
            raise DataError(f"CIFAR batch {f} lacks the b'data' / b'labels' entries")
        data, lab = np.asarray(d[b"data"]), np.asarray(d[b"labels"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"CIFAR batch {f}: data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        if lab.ndim != 1 or lab.shape[0] != data.shape[0] or not np.issubdtype(lab.dtype, np.integer):
            raise DataError(f"CIFAR batch {f}: expected {data.shape[0]} integer labels, got {lab.shape}")
        if lab.size and (lab.min() < 0 or lab.max() >= len(class_names)):
            raise DataError(f"CIFAR batch {f}: labels outside [0, {len(class_names)})")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(lab.astype(np.int64)))
        paths.extend(f"{f}#{i}" for i in range(data.shape[0]))
    return ImageSet(torch.cat(images), torch.cat(labels), class_names, tuple(paths))


def load_cifar_batches(root: str | Path, train: bool) -> ImageSet:
    """The CIFAR-10 python-format split (``data_batch_1..5`` or ``test_batch``) from ``cifar-10-batches-py``
    or its parent. Read with a numpy-only unpickler; keys and shapes are validated (md5 sums are not)."""
    base = _check_dir(root)
    d = _cifar_dir(base)
    if d is None:
        raise DataError(f"no CIFAR-10 python batches in {base} (expected {base}/{_CIFAR_DIR}/test_batch ...)")
    names = _CIFAR_TRAIN if train else _CIFAR_TEST
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 folder {d} is missing {', '.join(missing)}")
    return _load_cifar_files([d / n for n in names], _cifar_class_names(d))


def _cifar_class_names(d: Path) -> tuple[str, ...]:
    if not (d / "batches.meta").is_file():
        log.warning("%s has no batches.meta; using the standard CIFAR-10 class names", d)
        return CIFAR10_CLASSES
    raw = _read_pickle(d / "batches.meta").get(b"label_names")
    if not isinstance(raw, list | tuple) or not raw:
        raise DataError(f"CIFAR meta file {d / 'batches.meta'} lacks b'label_names'")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw)


def _fit_tensor(data: ImageSet, size: int | None, resize: int | None) -> ImageSet:
    """Resize/center-crop an in-memory set as :func:`_decode` treats files (no-op when already fitting)."""
    import torchvision.transforms.v2.functional as TF

    crop = size if size is not None else resize
    x = data.images
    if resize is not None or (crop is not None and min(x.shape[-2:]) != crop):
        x = TF.resize(x, [resize if resize is not None else crop], antialias=True)
    if crop is not None and tuple(x.shape[-2:]) != (crop, crop):
        x = TF.center_crop(x, [crop, crop])
    return data if x is data.images else ImageSet(x.contiguous(), data.labels, data.class_names, data.paths)


def load_dataset(path: str | Path, size: int | None = None, resize: int | None = None, workers: int = 2,
                 train: bool | None = None) -> ImageSet:
    """Load a split, detecting its format.

    - an ImageFolder directory -> :func:`load_image_folder`;
    - a CIFAR-10 python folder (``cifar-10-batches-py`` or its parent) with ``train`` True/False, or with the
      split named in the path: ``.../cifar-10-batches-py/train`` or ``.../test`` (these need not exist);
    - a single CIFAR batch file (``.../test_batch``, ``.../data_batch_3``).
    """
    p = Path(path).expanduser()
    if p.is_file():
        if p.name not in (*_CIFAR_TRAIN, *_CIFAR_TEST):
            raise DataError(f"data path is not a directory: {p}")
        return _fit_tensor(_load_cifar_files([p], _cifar_class_names(p.parent)), size, resize)
    if not p.exists() and p.name in ("train", "test") and _cifar_dir(p.parent) is not None:
        return _fit_tensor(load_cifar_batches(p.parent, p.name == "train"), size, resize)
    if _cifar_dir(_check_dir(p)) is not None:
        if train is None:
            raise DataError(f"{p} holds CIFAR-10 python batches: name the split as {p}/train or {p}/test")
        return _fit_tensor(load_cifar_batches(p, train), size, resize)
    return load_image_folder(p, size=size, resize=resize, workers=workers)


# ---------------------------------------------------------------- streaming loader for large folders


def make_folder_loader(path: str | Path, train: bool, preprocessing: Preprocessing, batch_size: int,
                       workers: int, distributed: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over an ImageFolder too large for memory, yielding ``(images, labels, indices)`` like
    :func:`iterate_batches`. Train: RandomResizedCrop + flip; eval: Resize(``resize`` or ``input_size``) +
    CenterCrop; then Normalize. ``distributed`` shards with DistributedSampler (call
    ``loader.sampler.set_epoch(epoch)`` each epoch)."""
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    if batch_size <= 0 or workers < 0:
        raise ConfigError(f"batch_size must be positive and workers >= 0, got {batch_size}, {workers}")
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ConfigError("distributed data loading needs an initialised torch.distributed process group")
    root = _check_dir(path)
    pre = preprocessing
    if train:
        tf = [T.RandomResizedCrop(pre.input_size), T.RandomHorizontalFlip()]
    else:
        tf = [T.Resize(pre.resize or pre.input_size), T.CenterCrop(pre.input_size)]
    transform = T.Compose([*tf, T.ToTensor(), T.Normalize(pre.mean, pre.std)])

    class _Folder(ImageFolder):
        def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
            file, target = self.samples[index]
            try:
                img = self.loader(file)
            except Exception as err:
                raise DataError(_one_line(f"cannot read image {file}", err)) from None
            return self.transform(img), target, index

    try:
        ds = _Folder(str(root), transform=transform, allow_empty=True)
    except FileNotFoundError:
        ds = None
    if ds is None or len(ds) == 0:
        raise DataError(f"no images found in {root} (expected ImageFolder layout {root}/<class>/<image>)")
    sampler = DistributedSampler(ds, shuffle=train, seed=seed, drop_last=train) if distributed else None
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(ds, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
                      num_workers=workers, drop_last=train, generator=gen, persistent_workers=workers > 0)
