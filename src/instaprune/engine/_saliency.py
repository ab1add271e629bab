"""Saliency and threshold of the fast engine's dynamic layers (``engine_modules.py``, ``engine_linear.py``).

- :func:`channel_norms`: per-channel L2 norms over (H, W), one ``torch.linalg.vector_norm`` pass on NCHW; on
  channels_last the squares of the (N, HW, C) view summed in cache-sized blocks. The norm is the RMS times
  sqrt(H*W), so ``norm > tau * ref(norm)`` is the reference rule (``masked.keep_mask``) for the relative modes
  and ``norm > tau * sqrt(HW)`` for ``one``; only float rounding differs (tested: flips only within 1e-5 x
  ref of the threshold).
- :func:`threshold_keep`: the threshold and the floor in numpy on the (N, C) norms (a few microseconds;
  torch's per-op overhead is larger at this size); the floor's top-k only for the rows that need it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from instaprune.method.thresholds import ThresholdConfig

__all__ = ["channel_norms", "threshold_keep"]


#: rows up to this many channels take their max in Python: numpy's reduction setup costs ~7 us inside a network
#: (measured after a CIFAR conv: max +7 us, np.full +6 us per point), Python's max on the row's list ~1 us
_PY_MAX = 128


def threshold_keep(norms: np.ndarray, tau: float, cfg: ThresholdConfig, hw: int,
                   floor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keep mask (N, C) and per-row threshold (N, 1), or a float32 scalar for a single row of mode max/one
    (``np.reshape(thr, (-1, 1))`` gives (N, 1) in every case), from per-channel L2 norms (= RMS * sqrt(hw));
    float32 arithmetic throughout, so a row gives the same mask alone or in a batch."""
    n, c = norms.shape
    k = cfg.floor(c) if floor is None else floor
    if n == 1 and cfg.mode != "mean":  # the common batch-1 case with the fewest numpy calls
        row = norms[0]
        if cfg.mode == "max":
            thr = np.float32(max(row.tolist()) if c <= _PY_MAX else row.max()) * np.float32(tau)
        else:
            thr = np.float32(tau * math.sqrt(hw))
        keep = norms > thr
        if np.count_nonzero(keep) < k:
            keep[0, np.argpartition(row, c - k)[c - k:]] = True
        return keep, thr
    if cfg.mode == "max":
        thr = norms.max(1, keepdims=True) * np.float32(tau)
    elif cfg.mode == "mean":
        thr = norms.mean(1, keepdims=True, dtype=np.float32) * np.float32(tau)
    else:
        thr = np.full((n, 1), tau * math.sqrt(hw), dtype=np.float32)
    keep = norms > thr
    for i in np.flatnonzero(np.count_nonzero(keep, axis=1) < k):
        keep[i, np.argpartition(norms[i], c - k)[c - k:]] = True
    return keep, thr


_BLOCK = 1 << 18  # elements per block of the channels_last saliency (1 MB: the squares stay in cache)


def channel_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-channel L2 norms (N, C) over (H, W): ``vector_norm`` on NCHW. On channels_last that reduction is
    ~10x slower (not vectorised over C), and squaring the whole (N, HW, C) view writes a temporary as large
    as x (ResNet-50's 32x256x56x56 input: 63 ms, page faults included, vs 4 ms for NCHW), so the squares
    are summed in cache-sized row blocks (9 ms there; measured)."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.linalg.vector_norm(x, 2, dim=(2, 3))
    n, c, h, w = x.shape
    f = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
    rows = max(1, _BLOCK // c)
    if n * h * w <= rows:
        return f.mul(f).sum(1).sqrt_()
    out = torch.zeros(n, c, dtype=x.dtype, device=x.device)
    if h * w <= rows:  # blocks of whole instances
        g = rows // (h * w)
        for i in range(0, n, g):
            blk = f[i:i + g]
            out[i:i + g] = blk.mul(blk).sum(1)
        return out.sqrt_()
    for i in range(n):  # blocks of rows of one instance
        fi, acc = f[i], out[i]
        for j in range(0, h * w, rows):
            blk = fi[j:j + rows]
            acc += blk.mul(blk).sum(0)
    return out.sqrt_()
