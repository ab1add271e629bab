"""Exactness of every SparseInputConv2d strategy against F.conv2d(x * mask), BN folding, the cost model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from instaprune.core.errors import ConfigError, ModelError
from instaprune.engine._kernels import STRATEGIES, MaskStats, SparseInputConv2d, as_mask, choose_strategy, fold_bn
from instaprune.engine._kernels_impl import greedy_buckets

RUN = list(STRATEGIES)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def reference(x, mask, w, b, stride, padding, dilation, groups, activation=None):
    out = F.conv2d(x * mask[:, :, None, None].to(x.dtype), w, b, stride, padding, dilation, groups)
    if activation == "relu":
        out = out.relu()
    elif activation == "relu6":
        out = out.clamp(0, 6)
    return out


def assert_close(out, ref):
    assert out.shape == ref.shape
    tol = 1e-4 * ref.abs().max().item() + 1e-6
    err = (out - ref).abs().max().item()
    assert err <= tol, f"max abs diff {err} > {tol}"


def masks_for(n: int, c: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One channel per instance, ~25/50/75 %, all, and varying counts per instance (incl. an empty one)."""
    out = []
    one = torch.zeros(n, c, dtype=torch.bool)
    one[torch.arange(n), torch.randint(c, (n,), generator=gen)] = True
    out.append(one)
    for keep in (0.25, 0.5, 0.75):
        k = max(1, round(keep * c))
        idx = torch.rand(n, c, generator=gen).argsort(1)[:, :k]
        out.append(torch.zeros(n, c, dtype=torch.bool).scatter_(1, idx, True))
    out.append(torch.ones(n, c, dtype=torch.bool))
    mixed = torch.rand(n, c, generator=gen) < torch.linspace(0, 1, n)[:, None]
    out.append(mixed)
    return out


# (c_in, c_out, kernel, stride, padding, dilation, groups, hw)
LAYERS = [
    (8, 6, 3, 1, 1, 1, 1, 9),
    (16, 8, 1, 1, 0, 1, 1, 7),
    (12, 10, 3, 2, 1, 1, 1, 10),
    (12, 12, 3, 1, 1, 1, 12, 8),  # depthwise
    (8, 16, 3, 2, 2, 2, 8, 11),  # depthwise with channel multiplier 2, dilation
    (12, 6, 5, 1, 2, 1, 3, 8),  # grouped
    (6, 4, (3, 1), (2, 1), (1, 0), 1, 1, 7),  # non-square
]


CASES = [(lay, n) for lay in LAYERS for n in (1, 2, 7)] + [(lay, 32) for lay in LAYERS if lay[0] <= 8]


@pytest.mark.parametrize(
    ("layer", "n"), CASES, ids=lambda v: f"{v[0]}-{v[1]}-k{v[2]}-g{v[6]}" if isinstance(v, tuple) else f"n{v}"
)
def test_every_strategy_is_exact(layer, n):
    ci, co, k, s, p, d, g, hw = layer
    gen = torch.Generator().manual_seed(ci * 100 + n)
    ks = (k, k) if isinstance(k, int) else k
    w = torch.randn(co, ci // g, *ks, generator=gen)
    b = torch.randn(co, generator=gen)
    x = torch.randn(n, ci, hw, hw, generator=gen)
    for act in (None, "relu6"):
        mod = SparseInputConv2d(w, b, stride=s, padding=p, dilation=d, groups=g, activation=act)
        for mask in masks_for(n, ci, gen):
            ref = reference(x, mask, w, b, s, p, d, g, act)
            for strat in RUN:
                assert_close(mod(x, mask, strat), ref)


conv_layers = st.fixed_dictionaries(
    {
        "cg": st.integers(1, 6),
        "og": st.integers(1, 5),
        "groups": st.sampled_from([1, 1, 2, 3, -1]),
        "kernel": st.sampled_from([1, 3, 5]),
        "stride": st.sampled_from([1, 2]),
        "padding": st.integers(0, 2),
        "dilation": st.sampled_from([1, 2]),
        "bias": st.booleans(),
        "n": st.integers(1, 5),
        "hw": st.integers(5, 11),
        "density": st.floats(0.0, 1.0),
        "seed": st.integers(0, 2**16),
        "act": st.sampled_from([None, "relu"]),
    }
)


@settings(deadline=None, derandomize=True, max_examples=40)
@given(conv_layers)
def test_property_random_layers_and_masks(cfg):
    gen = torch.Generator().manual_seed(cfg["seed"])
    if cfg["groups"] == -1:  # depthwise (possibly with a channel multiplier)
        groups, ci, co = cfg["cg"] + 1, cfg["cg"] + 1, (cfg["cg"] + 1) * (1 + cfg["og"] % 2)
    else:
        groups, ci, co = cfg["groups"], cfg["cg"] * cfg["groups"], cfg["og"] * cfg["groups"]
    k, d = cfg["kernel"], cfg["dilation"]
    hw = max(cfg["hw"], d * (k - 1) + 1 - 2 * cfg["padding"])
    w = torch.randn(co, ci // groups, k, k, generator=gen)
    b = torch.randn(co, generator=gen) if cfg["bias"] else None
    x = torch.randn(cfg["n"], ci, hw, hw, generator=gen)
    mask = torch.rand(cfg["n"], ci, generator=gen) < cfg["density"]
    mod = SparseInputConv2d(
        w, b, stride=cfg["stride"], padding=cfg["padding"], dilation=d, groups=groups, activation=cfg["act"]
    )
    ref = reference(x, mask, w, b, cfg["stride"], cfg["padding"], d, groups, cfg["act"])
    for strat in RUN:
        assert_close(mod(x, mask, strat), ref)


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_batch_invariance(groups):
    gen = torch.Generator().manual_seed(groups)
    w = torch.randn(16, 16 // groups, 3, 3, generator=gen)
    mod = SparseInputConv2d(w, torch.randn(16, generator=gen), padding=1, groups=groups)
    x = torch.randn(6, 16, 8, 8, generator=gen)
    mask = torch.rand(6, 16, generator=gen) < 0.5
    for strat in RUN:
        batched = mod(x, mask, strat)
        for i in range(6):
            alone = mod(x[i : i + 1], mask[i : i + 1], strat)
            assert_close(batched[i : i + 1], alone)


@pytest.mark.parametrize("conv_bias", [True, False])
def test_fold_bn_equals_conv_then_bn(conv_bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=conv_bias)
    bn = nn.BatchNorm2d(10)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    x = torch.randn(3, 6, 9, 9)
    w, b = fold_bn(conv, bn)
    with torch.no_grad():
        ref = bn(conv(x))
        assert_close(F.conv2d(x, w, b, padding=1), ref)
        mod = SparseInputConv2d.from_conv(conv, bn, activation="relu")
        mask = torch.rand(3, 6) < 0.6
        assert_close(mod(x, torch.ones(3, 6, dtype=torch.bool)), ref.relu())
        assert_close(mod(x, mask), bn(conv(x * mask[:, :, None, None])).relu())


def test_large_batch_dense_path_uses_channels_last_and_stays_exact():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    b = torch.randn(6, generator=gen)
    x = torch.randn(32, 4, 12, 12, generator=gen)  # 32 * 144 output pixels: the channels_last dense branch
    mod = SparseInputConv2d(w, b, padding=1)
    for mask in (torch.rand(32, 4, generator=gen) < 0.5, torch.ones(32, 4, dtype=torch.bool)):
        out = mod(x, mask, "dense")
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert_close(out, reference(x, mask, w, b, 1, 1, 1, 1))
        assert_close(mod(x.contiguous(memory_format=torch.channels_last), mask, "loop"), out)


def test_depthwise_pruned_channel_is_bias_constant():
    w = torch.randn(8, 1, 3, 3)
    b = torch.randn(8)
    mod = SparseInputConv2d(w, b, padding=1, groups=8, activation="relu")
    x = torch.randn(2, 8, 6, 6)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [1, 5]] = True  # instance 1 keeps nothing
    for strat in RUN:
        out = mod(x, mask, strat)
        for c in range(8):
            if not mask[0, c]:
                assert torch.all(out[0, c] == b[c].relu())
            assert torch.all(out[1, c] == b[c].relu())


def test_index_inputs_equal_bool_mask():
    w = torch.randn(4, 10, 3, 3)
    mod = SparseInputConv2d(w, None, padding=1)
    x = torch.randn(3, 10, 5, 5)
    idx = [torch.tensor([0, 3]), torch.tensor([9]), torch.tensor([], dtype=torch.long)]
    mask = as_mask(idx, 3, 10)
    assert mask.sum().item() == 3 and mask[1, 9]
    assert_close(mod(x, idx), mod(x, mask, "dense"))
    rect = torch.tensor([[1, 2], [3, 4], [5, 6]])
    assert_close(mod(x, rect, "loop"), reference(x, as_mask(rect, 3, 10), w, None, 1, 1, 1, 1))
    assert_close(mod(x, mask.float(), "union"), mod(x, mask, "dense"))


def test_errors_are_user_errors():
    mod = SparseInputConv2d(torch.randn(4, 6, 3, 3), None, padding=1)
    x = torch.randn(2, 6, 5, 5)
    with pytest.raises(ConfigError):
        mod(x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ConfigError):
        mod(x, torch.ones(2, 6, dtype=torch.bool), "fastest")
    with pytest.raises(ConfigError):
        mod(x, [torch.tensor([7]), torch.tensor([0])])
    with pytest.raises(ModelError):
        mod(torch.randn(2, 5, 5, 5), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ModelError):
        SparseInputConv2d.from_conv(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ConfigError):
        SparseInputConv2d(torch.randn(4, 6, 3, 3), activation="gelu")


def test_same_and_valid_padding():
    w = torch.randn(5, 4, 3, 3)
    x = torch.randn(2, 4, 7, 7)
    mask = torch.rand(2, 4) < 0.5
    for pad, ref_pad in (("same", 1), ("valid", 0)):
        mod = SparseInputConv2d(w, None, padding=pad)
        assert_close(mod(x, mask, "loop"), reference(x, mask, w, None, 1, ref_pad, 1, 1))


def test_choose_strategy_rules():
    full = MaskStats(n=32, channels=64, k_sum=32 * 64, k_max=64, union=64)
    assert choose_strategy(full, 64, 1, (3, 3), (56, 56), (56, 56)) == "dense"
    sparse = MaskStats(n=1, channels=256, k_sum=64, k_max=64, union=64)
    assert choose_strategy(sparse, 256, 1, (3, 3), (14, 14), (14, 14)) != "dense"
    shared = MaskStats(n=32, channels=256, k_sum=32 * 64, k_max=64, union=64)  # identical masks
    assert choose_strategy(shared, 256, 1, (3, 3), (14, 14), (14, 14)) == "union"
    for s in (full, sparse, shared):
        assert choose_strategy(s, 256, 1, (1, 1), (7, 7), (7, 7)) in STRATEGIES


def test_auto_and_last_strategy_recorded():
    mod = SparseInputConv2d(torch.randn(8, 8, 3, 3), torch.randn(8), padding=1)
    x = torch.randn(2, 8, 6, 6)
    mod(x, torch.ones(2, 8, dtype=torch.bool))
    assert mod.last_strategy == "dense"
    mod(x, torch.rand(2, 8) < 0.3)
    assert mod.last_strategy in STRATEGIES


def test_greedy_buckets():
    same = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.bool)
    assert greedy_buckets(same) == [[0, 1, 2, 3]]
    disjoint = torch.eye(4, dtype=torch.bool)
    assert sorted(map(sorted, greedy_buckets(disjoint))) == [[0], [1], [2], [3]]


def test_moving_the_module_refreshes_its_buffers():
    mod = SparseInputConv2d(torch.randn(4, 6, 3, 3), torch.randn(4), padding=1)
    x = torch.randn(2, 6, 5, 5)
    mask = torch.rand(2, 6) < 0.5
    mod(x, mask)
    mod.double()
    out = mod(x.double(), mask, "loop")
    assert out.dtype == torch.float64
    assert_close(out, reference(x.double(), mask, mod.weight, mod.bias, 1, 1, 1, 1))
