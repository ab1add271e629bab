"""Procedural image dataset for ``instaprune demo``: ten shape classes whose images vary in how busy they are.

Every image shows one object of its class (disk, square, triangle, plus, ring, bars, star, half-disk, crescent,
frame), drawn anti-aliased from a signed distance function at a random position, size and rotation. A per-image
``difficulty`` d in [0, 1] drives six *independent* nuisance factors (each ``clip(d * U(0.5, 1.5), 0, 1)``):

- clutter:     coloured low/mid-frequency noise plus an oriented grating behind the object;
- distractors: 0-5 short bars and dots of random colour behind the object;
- noise:       i.i.d. Gaussian pixel noise;
- contrast:    object colour pulled towards the background colour;
- scale:       object radius shrinks from 0.7 to 0.3 of the half-image, and it may sit further off-centre;
- occlusion:   a bar of random colour crossing the object, and the class colour cue is dropped.

So an easy image is one clean, large, high-contrast object in its class colour on a flat background (few feature
channels respond), a hard one is small, faint, cluttered, occluded and noisy (many channels respond). The
generator is pure torch, vectorised over images, and deterministic for a seed (independent of thread count).
:class:`DemoRecipe` holds the tuned demo defaults and the numbers measured with them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from instaprune.core.errors import ConfigError

__all__ = ["CLASS_NAMES", "DemoData", "DemoRecipe", "RECIPE", "make_dataset", "make_splits", "mean_std"]

CLASS_NAMES = ("disk", "square", "triangle", "plus", "ring", "bars", "star", "half_disk", "crescent", "frame")

# class colour cue (RGB in [0, 1]); used unless the occlusion factor drops it
_PALETTE = torch.tensor([
    [0.90, 0.20, 0.20], [0.20, 0.75, 0.25], [0.20, 0.35, 0.90], [0.95, 0.85, 0.20], [0.85, 0.30, 0.85],
    [0.20, 0.85, 0.85], [0.95, 0.55, 0.15], [0.55, 0.25, 0.85], [0.95, 0.95, 0.95], [0.45, 0.70, 0.10],
])
# Generator constants (tuned for the demo, see RECIPE.measured). "At factor f" means linear in the nuisance factor.
_CHUNK = 500  # images rendered at once (part of the definition: random draws are made chunk by chunk)
_BG = (0.05, 0.3)  # flat background colour range (dark, slightly tinted)
_CLUTTER = (0.25, 0.2, 0.6)  # amplitudes at clutter 1: coarse noise, finer noise, grating (all bright, coloured)
_MAX_DISTRACTORS = 6  # bars/dots behind the object at distractor factor 1
_NOISE = (0.01, 0.06)  # pixel noise std at noise factor 0 and 1
_MAX_CONTRAST_LOSS, _CONTRAST_POW = 0.95, 4.0  # contrast = 1 - 0.95 f^4: only the top ~10% become near-invisible
_SCALE = (0.75, 0.6)  # object radius (fraction of the half-image) at scale factor 0 and 1
_ROT = 0.3  # max |rotation| in radians
_CUE_DROP = 0.2  # probability of replacing the class colour by a random one at occlusion factor 1
_OCCLUDER = (0.05, 0.06)  # occluder half-width (fraction of the object radius): a + b * occlusion factor


@dataclass(frozen=True)
class DemoData:
    """``images`` uint8 (N, 3, S, S), ``labels`` int64 (N,), ``difficulty`` float32 (N,) in [0, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    difficulty: torch.Tensor
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ConfigError(f"demo images must be uint8 (N, 3, S, S), got {self.images.dtype} "
                              f"{tuple(self.images.shape)}")
        if self.labels.shape != (n,) or self.difficulty.shape != (n,):
            raise ConfigError(f"demo labels/difficulty must have shape ({n},)")

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class DemoRecipe:
    """Tuned defaults of the demo (dataset, model, training); see ``RECIPE.measured`` for what they gave."""

    image_size: int = 16
    n_train: int = 16000
    n_calib: int = 2000
    n_test: int = 5000
    width: int = 16
    blocks: tuple[int, int, int] = (1, 1, 1)
    epochs: int = 6  # plain pre-training epochs shared by baseline and method (see ``demo.DemoSchedule``)
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    augment_pad: int = 2  # random crop with this zero padding + horizontal flip, on uint8 tensors
    channels_last: bool = True
    decay_lam: float = 0.5
    decay_penalty: str = "l1max"
    decay_weights: str = "uniform"
    # `instaprune demo` (seed 0, 2 threads, quiet machine, torch 2.14.1, 2026-12-06; the default method: gates,
    # demo.gated.DemoGates): what these defaults gave
    measured: tuple[tuple[str, Any], ...] = (
        ("baseline_top1", 0.9022), ("dense_top1", 0.8934), ("top1", 0.8942), ("flops_reduction", 0.4184),
        ("per_image_flops_p90_over_p10", 1.121), ("spearman_difficulty_flops", 0.274), ("seconds", 98.0),
    )

    def __post_init__(self) -> None:
        counts = (self.n_train, self.n_calib, self.n_test, self.width, self.epochs, self.batch_size)
        if self.image_size < 8 or min(counts) < 1:
            raise ConfigError(f"demo recipe: image_size must be >= 8 and sizes/epochs >= 1, got {self}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"], d["measured"] = list(self.blocks), dict(self.measured)
        return d


RECIPE = DemoRecipe()


def _sdf(label: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (unit: object radius) of class ``label`` in object coordinates (u, v), negative inside."""
    r = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    if label == 0:  # disk
        return r - 0.95
    if label == 1:  # square
        return torch.maximum(au, av) - 0.78
    if label == 2:  # triangle (equilateral, inscribed in the unit circle)
        return torch.maximum(-v - 0.5, (au * math.sqrt(3.0) + v) / 2 - 0.5)
    if label == 3:  # plus
        return torch.minimum(torch.maximum(au - 0.28, av - 0.95), torch.maximum(au - 0.95, av - 0.28))
    if label == 4:  # ring
        return (r - 0.72).abs() - 0.22
    if label == 5:  # two parallel bars
        return torch.maximum(au - 0.95, (av - 0.5).abs() - 0.2)
    if label == 6:  # five-pointed star
        phi = torch.atan2(v, u)
        return r - 0.62 * (1.0 + 0.45 * torch.cos(5.0 * phi))
    if label == 7:  # half disk
        return torch.maximum(r - 0.95, v - 0.1)
    if label == 8:  # crescent
        return torch.maximum(r - 0.95, 0.8 - torch.sqrt((u - 0.5) ** 2 + v * v))
    # frame (hollow square)
    return (torch.maximum(au, av) - 0.68).abs() - 0.2


def _soft(sdf_px: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage from a signed distance in pixels."""
    return torch.sigmoid(-sdf_px / 0.45)


def _capsule(x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, q: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance to segments p-q (N, 2) with thickness ``radius`` (N,) over grids x, y (N, S, S)."""
    dx, dy = (q[:, 0] - p[:, 0])[:, None, None], (q[:, 1] - p[:, 1])[:, None, None]
    px, py = x - p[:, 0, None, None], y - p[:, 1, None, None]
    t = ((px * dx + py * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp(0, 1)
    return torch.sqrt((px - t * dx) ** 2 + (py - t * dy) ** 2) - radius[:, None, None]


def _rand_colour(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 3, generator=g)


def _interp_matrix(src: int, size: int) -> torch.Tensor:
    """(size, src) bilinear upsampling matrix (half-pixel centres, edges clamped)."""
    pos = ((torch.arange(size, dtype=torch.float32) + 0.5) * src / size - 0.5).clamp(0, src - 1)
    lo = pos.floor().long().clamp(max=src - 2) if src > 1 else pos.long()
    w = pos - lo
    m = torch.zeros(size, src)
    m[torch.arange(size), lo] += 1 - w
    m[torch.arange(size), (lo + 1).clamp(max=src - 1)] += w
    return m


def _smooth_noise(n: int, src: int, size: int, g: torch.Generator) -> torch.Tensor:
    a = _interp_matrix(src, size)
    return torch.einsum("ya,ncab,xb->ncyx", a, torch.randn(n, 3, src, src, generator=g), a)


def _blend(img: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """Paint ``colour`` (n, 3) over ``img`` (n, 3, S, S) with coverage ``mask`` (n, S, S), in place."""
    return img.mul_(1 - mask[:, None]).add_(mask[:, None] * colour[:, :, None, None])


def _render(labels: torch.Tensor, fac: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Float images (n, 3, S, S) in [0, 1] for one chunk; ``fac`` (n, 6) are the nuisance strengths."""
    n = labels.shape[0]
    f_clutter, f_distract, f_noise, f_contrast, f_scale, f_occl = fac.unbind(1)
    half = size / 2.0
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / half - 1.0
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x.expand(n, size, size), y.expand(n, size, size)

    # colours: the object keeps its class colour unless the occlusion factor drops the cue (then a random bright
    # colour); the background is dark with a slight tint; low contrast pulls the object towards the background
    cue = torch.rand(n, generator=g) >= _CUE_DROP * f_occl
    obj = torch.where(cue[:, None], _PALETTE[labels] + 0.06 * (torch.rand(n, 3, generator=g) - 0.5),
                      0.3 + 0.7 * _rand_colour(n, g)).clamp(0, 1)
    bg = _BG[0] + (_BG[1] - _BG[0]) * _rand_colour(n, g)
    obj = bg + (1.0 - _MAX_CONTRAST_LOSS * f_contrast.pow(_CONTRAST_POW))[:, None] * (obj - bg)

    # clutter: bright coloured structure (noise at two scales and an oriented grating) over the background
    ang, freq, phase = (torch.rand(n, 3, generator=g) * torch.tensor([math.pi, 3.0, 2 * math.pi])).unbind(1)
    c3 = lambda t: t[:, None, None]  # noqa: E731
    grating = torch.sin(math.pi * c3(2.0 + freq) * (x * c3(torch.cos(ang)) + y * c3(torch.sin(ang))) + c3(phase))
    gcol = _rand_colour(n, g)
    a = f_clutter[:, None, None, None]
    img = (_CLUTTER[0] * _smooth_noise(n, 3, size, g).abs_() + _CLUTTER[1] * _smooth_noise(n, 7, size, g).abs_()
           + _CLUTTER[2] * gcol[:, :, None, None] * grating[:, None].add(1).mul(0.5)).mul_(a)
    img.add_(bg[:, :, None, None])

    # distractors: short bars and dots behind the object
    count = torch.round(f_distract * _MAX_DISTRACTORS)
    for j in range(_MAX_DISTRACTORS):
        p = torch.rand(n, 2, generator=g) * 1.8 - 0.9
        theta, length, rad = torch.rand(n, 3, generator=g).unbind(1)
        col = 0.2 + 0.8 * _rand_colour(n, g)
        idx = (count > j).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        theta, length = theta[idx] * math.pi, 0.05 + 0.35 * length[idx]
        q = p[idx] + length[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], 1)
        m = _soft(_capsule(x[idx], y[idx], p[idx], q, 0.05 + 0.06 * rad[idx]) * half)
        img[idx] = _blend(img[idx], m, col[idx])

    # object: class shape at a random pose; colour = class cue unless dropped, contrast vs. background
    scale = _SCALE[0] - (_SCALE[0] - _SCALE[1]) * f_scale
    offset = (torch.rand(n, 2, generator=g) * 2 - 1) * (0.1 + 0.3 * f_scale)[:, None]
    centre = offset * (1.0 - scale)[:, None].clamp_min(0.3)
    rot = (torch.rand(n, generator=g) * 2 - 1) * _ROT
    cos, sin = c3(torch.cos(rot)), c3(torch.sin(rot))
    dx, dy = x - c3(centre[:, 0]), y - c3(centre[:, 1])
    s3 = c3(scale)
    u, v = (cos * dx + sin * dy) / s3, (-sin * dx + cos * dy) / s3
    sdf = torch.empty(n, size, size)
    for k in range(len(CLASS_NAMES)):
        idx = (labels == k).nonzero(as_tuple=True)[0]
        if idx.numel():
            sdf[idx] = _sdf(k, u[idx], v[idx])
    _blend(img, _soft(sdf * s3 * half), obj)

    # occluder: a bar of random colour crossing near the object's centre
    p = centre + (torch.rand(n, 2, generator=g) - 0.5) * scale[:, None]
    theta = torch.rand(n, generator=g) * math.pi
    dirv = torch.stack([torch.cos(theta), torch.sin(theta)], 1) * scale[:, None]
    col = _rand_colour(n, g)
    idx = (torch.rand(n, generator=g) < f_occl).nonzero(as_tuple=True)[0]
    if idx.numel():
        rad = scale[idx] * (_OCCLUDER[0] + _OCCLUDER[1] * f_occl[idx])
        m = _soft(_capsule(x[idx], y[idx], p[idx] - dirv[idx], p[idx] + dirv[idx], rad) * half)
        img[idx] = _blend(img[idx], m, col[idx])

    noise = torch.randn(n, 3, size, size, generator=g)
    return img.add_(noise.mul_((_NOISE[0] + (_NOISE[1] - _NOISE[0]) * f_noise)[:, None, None, None])).clamp_(0, 1)


def make_dataset(n: int, seed: int, size: int = 16) -> DemoData:
    """Generate ``n`` images (classes balanced to +-1) of ``size`` x ``size`` pixels, deterministically."""
    if n < 1 or size < 8:
        raise ConfigError(f"demo dataset needs n >= 1 and size >= 8, got n={n}, size={size}")
    g = torch.Generator().manual_seed(int(seed))
    labels = (torch.arange(n) % len(CLASS_NAMES))[torch.randperm(n, generator=g)]
    diff = torch.rand(n, generator=g)
    fac = (diff[:, None] * (0.5 + torch.rand(n, 6, generator=g))).clamp(0, 1)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: intra-op threads only add overhead (10x+ on a busy machine)
    try:
        for start in range(0, n, _CHUNK):  # chunks keep the working set in cache (3-4x faster than all at once)
            sl = slice(start, start + _CHUNK)
            images[sl] = _render(labels[sl], fac[sl], size, g).mul_(255.0).round_().to(torch.uint8)
    finally:
        torch.set_num_threads(threads)
    return DemoData(images=images, labels=labels.to(torch.int64), difficulty=diff.float())


def make_splits(seed: int, recipe: DemoRecipe = RECIPE) -> tuple[DemoData, DemoData, DemoData]:
    """Train, calibration and test sets of the demo, generated from three seeds derived from ``seed``."""
    return (make_dataset(recipe.n_train, 3 * seed, recipe.image_size),
            make_dataset(recipe.n_calib, 3 * seed + 1, recipe.image_size),
            make_dataset(recipe.n_test, 3 * seed + 2, recipe.image_size))


def mean_std(data: DemoData) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of the images in [0, 1] units (for ``Preprocessing``)."""
    x = data.images.to(torch.float64).div_(255.0).transpose(0, 1).reshape(3, -1)
    mean, std = x.mean(dim=1), x.std(dim=1)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)  # type: ignore[return-value]
