"""Execution strategies for convolutions whose *input* channels are pruned per instance (see ``kernels.py``).

Every function here returns exactly ``F.conv2d(x * mask[:, :, None, None], w, b, ...)`` (before the optional
fused activation), computed from the active channels only. Weights arrive pre-arranged by
``SparseInputConv2d``:

- ``weight``: (C_out, C_in/G, kh, kw) contiguous (OIHW). ``weight.index_select(1, idx)`` is the gather that
  oneDNN then consumes best (measured: a [C_in, C_out, kh, kw] row layout gathers 2-4x faster, but its
  transposed view costs more inside oneDNN's weight reorder than it saves).
- ``wext``: (C_out * (C_in/G + 1), kh*kw): OIHW with one extra all-zero input column per output channel;
  padded slots point at it, so padding needs no masking and the weight gather is one ``index_select``.

The general kernel (:func:`run_padded`) handles groups=1, grouped and depthwise convs: per instance it keeps
only the *groups* that have an active channel (A of G) and, inside each, the active channels padded to the
largest count K, then runs ONE grouped conv (groups = N*A, or A with one index shared by the batch when
``shared=True``). Outputs of groups with no active channel equal the bias and are filled with it (depthwise:
a pruned channel c outputs the constant bias[c]).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "GroupIndex",
    "group_index",
    "run_dense",
    "run_loop",
    "run_padded",
    "run_union",
    "run_bucket",
    "greedy_buckets",
]


class GroupIndex:
    """Padded per-row index of active groups (A of them) and active channels per group (K, padded)."""

    __slots__ = ("chan", "local", "gsel", "gvalid", "valid", "A", "K", "all_groups")

    def __init__(self, mask: torch.Tensor, groups: int) -> None:
        rows, c = mask.shape
        cg = c // groups
        m = mask.view(rows, groups, cg)
        cnt = m.sum(2)  # (R, G)
        gact = cnt > 0
        nact = gact.sum(1)  # (R,)
        k_max, a_max, a_min = torch.stack([cnt.max(), nact.max(), nact.min()]).tolist()
        self.K, self.A = int(k_max), int(a_max)
        self.all_groups = int(a_min) == groups
        if self.K == 0:
            return
        ar_k = torch.arange(self.K, device=mask.device)
        if cg == 1:
            lo = torch.zeros(rows, groups, 1, dtype=torch.long, device=mask.device)
        else:
            lo = torch.argsort((~m).to(torch.uint8), dim=2, stable=True)[:, :, : self.K]
        lvalid = ar_k < cnt[..., None]  # (R, G, K)
        if self.all_groups:
            gsel = torch.arange(groups, device=mask.device).expand(rows, groups)
            gvalid = torch.ones(rows, groups, dtype=torch.bool, device=mask.device)
        else:
            gsel = torch.argsort((~gact).to(torch.uint8), dim=1, stable=True)[:, : self.A]
            gvalid = torch.arange(self.A, device=mask.device) < nact[:, None]
            ex = gsel[..., None].expand(rows, self.A, self.K)
            lo = lo.gather(1, ex)
            lvalid = lvalid.gather(1, ex) & gvalid[..., None]
        self.gsel, self.gvalid, self.valid = gsel, gvalid, lvalid
        self.local = torch.where(lvalid, lo, cg)  # cg = the zero column of wext
        self.chan = gsel[..., None] * cg + torch.where(lvalid, lo, 0)  # a real channel even for padded slots


def group_index(mask: torch.Tensor, groups: int) -> GroupIndex:
    return GroupIndex(mask, groups)


def _finish(out: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "relu":
        return out.relu_()
    if activation == "relu6":
        return out.clamp_(0.0, 6.0)
    return out


def _out_hw(conv: dict, h: int, w: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv["kernel"], conv["stride"], conv["padding"], conv["dilation"]
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _const_out(bias: torch.Tensor, n: int, ho: int, wo: int) -> torch.Tensor:
    return bias[None, :, None, None].expand(n, bias.numel(), ho, wo).contiguous()


def run_dense(x: torch.Tensor, mask: torch.Tensor, p: dict, full: bool = False) -> torch.Tensor:
    """Masked dense conv; ``full=True`` means every channel of every instance is active (no masking pass)."""
    n, _, h, w = x.shape
    ho, wo = _out_hw(p, h, w)
    if n * ho * wo >= 3000 and ho * wo >= 100 and not x.is_contiguous(memory_format=torch.channels_last):
        # oneDNN's batched NCHW conv is up to 1.6x slower than channels_last for large outputs (measured);
        # the masking pass writes the channels_last copy for free.
        xin = torch.empty_like(x, memory_format=torch.channels_last)
        if full:
            xin.copy_(x)
        else:
            torch.mul(x, mask[:, :, None, None].to(x.dtype), out=xin)
    else:
        xin = x if full else x * mask[:, :, None, None].to(x.dtype)
    out = F.conv2d(xin, p["weight"], p["bias"], p["stride"], p["padding"], p["dilation"], p["groups"])
    return _finish(out, p["activation"])


def run_padded(
    x: torch.Tensor, mask: torch.Tensor, p: dict, shared: bool = False, gi: GroupIndex | None = None
) -> torch.Tensor:
    """One grouped conv over each instance's active groups/channels padded to (A, K).

    ``shared=False``: every instance has its own index (groups = N*A; the weights are gathered per instance).
    ``shared=True``: one index for the whole batch built from ``mask.any(0)`` (the union); channels an
    instance does not have are zeroed in the gathered input.
    """
    n, c, h, w = x.shape
    g, cout = p["groups"], p["weight"].shape[0]
    cg, og = c // g, cout // g
    ho, wo = _out_hw(p, h, w)
    if gi is None:
        gi = GroupIndex(mask.any(0, keepdim=True) if shared else mask, g)
    if gi.K == 0:
        return _finish(_const_out(p["bias"], n, ho, wo), p["activation"])
    rows = 1 if shared else n
    a, k = gi.A, gi.K
    dev = x.device
    o = gi.gsel[..., None] * og + torch.arange(og, device=dev)  # (R, A, Og) output channel of each slot
    widx = o[..., None] * (cg + 1) + gi.local[:, :, None, :]  # (R, A, Og, K)
    kh, kw = p["kernel"]
    wg = p["wext"].index_select(0, widx.reshape(-1)).view(rows * a * og, k, kh, kw)
    bg = p["bias"].index_select(0, o.reshape(-1))
    xs = x.reshape(n * c, h * w) if x.is_contiguous() else x.contiguous().view(n * c, h * w)
    if shared:
        xidx = (torch.arange(n, device=dev)[:, None] * c + gi.chan.reshape(1, -1)).reshape(-1)
        xg = xs.index_select(0, xidx).view(n, a * k, h, w)
        keep = mask[:, gi.chan.reshape(-1)] & gi.valid.reshape(1, -1)
        if not bool(keep.all()):
            xg.mul_(keep[:, :, None, None].to(x.dtype))
        res = F.conv2d(xg, wg, bg, p["stride"], p["padding"], p["dilation"], a)
    else:
        xidx = (torch.arange(n, device=dev)[:, None, None] * c + gi.chan).reshape(-1)
        xg = xs.index_select(0, xidx).view(1, n * a * k, h, w)
        res = F.conv2d(xg, wg, bg, p["stride"], p["padding"], p["dilation"], n * a)
    if gi.all_groups:
        return _finish(res.view(n, cout, ho, wo), p["activation"])
    out = torch.empty(n * cout + 1, ho * wo, dtype=x.dtype, device=dev)
    out[: n * cout] = p["bias"].repeat(n)[:, None]
    target = torch.where(gi.gvalid[..., None], o, -1)  # (R, A, Og); -1 -> dummy row
    if shared:
        target = target.expand(n, a, og)
    base = torch.arange(n, device=dev)[:, None, None] * cout
    target = torch.where(target >= 0, target + base, n * cout).reshape(-1)
    out.index_copy_(0, target, res.reshape(n * a * og, ho * wo))
    return _finish(out[: n * cout].view(n, cout, ho, wo), p["activation"])


def run_loop(x: torch.Tensor, mask: torch.Tensor, p: dict) -> torch.Tensor:
    """Per instance: gather its active channels (and the matching weight columns), one conv each."""
    n = x.shape[0]
    if p["groups"] != 1:
        return torch.cat([run_padded(x[i : i + 1], mask[i : i + 1], p) for i in range(n)])
    m = mask.cpu().numpy()
    outs = []
    for i in range(n):
        idx = np.flatnonzero(m[i])
        if idx.size == 0:
            _, _, h, w = x.shape
            outs.append(_const_out(p["bias"], 1, *_out_hw(p, h, w)))
            continue
        ti = torch.from_numpy(idx).to(x.device)
        xi = x[i : i + 1].index_select(1, ti)
        outs.append(F.conv2d(xi, p["weight"].index_select(1, ti), p["bias"], p["stride"], p["padding"], p["dilation"]))
    out = outs[0] if n == 1 else torch.cat(outs)
    return _finish(out, p["activation"])


def run_union(x: torch.Tensor, mask: torch.Tensor, p: dict) -> torch.Tensor:
    """One conv on the union of the batch's active channels; channels an instance lacks are zeroed."""
    if p["groups"] != 1:
        return run_padded(x, mask, p, shared=True)
    union = mask.any(0)
    u = union.nonzero()[:, 0]
    if u.numel() == 0:
        _, _, h, w = x.shape
        return _finish(_const_out(p["bias"], x.shape[0], *_out_hw(p, h, w)), p["activation"])
    sub = mask[:, u]
    full_u = bool(sub.all())
    if u.numel() == mask.shape[1]:
        return run_dense(x, mask, p, full=full_u)
    xg = x.index_select(1, u)
    if not full_u:
        xg.mul_(sub[:, :, None, None].to(x.dtype))
    out = F.conv2d(xg, p["weight"].index_select(1, u), p["bias"], p["stride"], p["padding"], p["dilation"])
    return _finish(out, p["activation"])


def greedy_buckets(mask: torch.Tensor, slack: float = 0.15, max_size: int = 64) -> list[list[int]]:
    """Group instances whose masks nearly coincide: an instance joins a bucket if the bucket's union work
    (members x union size) stays within ``1 + slack`` of the members' own work. Largest masks first."""
    counts = mask.sum(1)
    order = torch.argsort(counts, descending=True).tolist()
    kl = counts.tolist()
    buckets: list[list[int]] = []
    unions: list[torch.Tensor] = []
    work: list[int] = []
    for i in order:
        best, best_cost = -1, None
        for b, uni in enumerate(unions):
            if len(buckets[b]) >= max_size:
                continue
            usize = int((uni | mask[i]).sum())
            cost = (len(buckets[b]) + 1) * usize
            if cost <= (1.0 + slack) * (work[b] + kl[i]) and (best_cost is None or cost < best_cost):
                best, best_cost = b, cost
        if best < 0:
            buckets.append([i])
            unions.append(mask[i].clone())
            work.append(kl[i])
        else:
            buckets[best].append(i)
            unions[best] |= mask[i]
            work[best] += kl[i]
    return buckets


def run_bucket(x: torch.Tensor, mask: torch.Tensor, p: dict, slack: float = 0.15) -> torch.Tensor:
    """Cluster near-identical masks (:func:`greedy_buckets`), one union conv per bucket."""
    buckets = greedy_buckets(mask, slack)
    if len(buckets) == 1:
        return run_union(x, mask, p)
    if all(len(b) == 1 for b in buckets):
        return run_loop(x, mask, p)
    parts, order = [], []
    for b in buckets:
        bi = torch.tensor(b, device=x.device)
        xb, mb = x.index_select(0, bi), mask.index_select(0, bi)
        parts.append(run_union(xb, mb, p) if len(b) > 1 else run_loop(xb, mb, p))
        order.extend(b)
    out = torch.cat(parts)
    inv = torch.empty(len(order), dtype=torch.long, device=x.device)
    inv[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
    return out.index_select(0, inv)
