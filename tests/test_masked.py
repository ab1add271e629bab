"""Saliency, dynamic thresholds and the masked reference model."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_cnn
from instaprune.core.errors import ConfigError
from instaprune.method.masked import MaskedModel
from instaprune.method.points import find_prune_points
from instaprune.method.thresholds import ThresholdConfig, keep_mask, saliency
from instaprune.models import build_model


def test_saliency_is_channel_rms():
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ||x||_2 = 5, sqrt(HW) = 2
    x[0, 1] = 1.0
    assert torch.allclose(saliency(x), torch.tensor([[2.5, 1.0]]))
    assert torch.equal(saliency(torch.tensor([[-2.0, 1.0]])), torch.tensor([[2.0, 1.0]]))


def test_threshold_modes_and_floor():
    s = torch.tensor([[4.0, 2.0, 1.0, 0.5]])
    assert keep_mask(s, 0.4, ThresholdConfig("max", 0.0)).tolist() == [[True, True, False, False]]
    # mean = 1.875; tau 1 keeps > 1.875
    assert keep_mask(s, 1.0, ThresholdConfig("mean", 0.0)).tolist() == [[True, True, False, False]]
    assert keep_mask(s, 0.75, ThresholdConfig("one", 0.0)).tolist() == [[True, True, True, False]]
    # floor: at least ceil(0.5*4)=2 strongest channels even with an impossible threshold
    assert keep_mask(s, 10.0, ThresholdConfig("max", 0.5)).tolist() == [[True, True, False, False]]
    assert keep_mask(s, 10.0, ThresholdConfig("max", 0.0)).sum() == 1  # never empty
    with pytest.raises(ConfigError):
        ThresholdConfig("median")
    with pytest.raises(ConfigError):
        ThresholdConfig("max", 1.5)


@settings(deadline=None, derandomize=True, max_examples=30)
@given(st.integers(1, 6), st.integers(1, 40), st.floats(0, 2), st.sampled_from(["max", "mean", "one"]),
       st.floats(0, 1))
def test_keep_mask_properties(n, c, tau, mode, min_keep):
    s = torch.rand(n, c, generator=torch.Generator().manual_seed(n * 100 + c))
    cfg = ThresholdConfig(mode, min_keep)
    keep = keep_mask(s, tau, cfg)
    assert keep.shape == (n, c)
    assert (keep.sum(1) >= cfg.floor(c)).all()
    # monotone: a larger tau never keeps more channels
    assert (keep_mask(s, tau * 1.5 + 0.01, cfg).sum(1) <= keep.sum(1)).all()
    # batch invariance: each instance alone gives the same mask
    for i in range(n):
        assert torch.equal(keep_mask(s[i:i + 1], tau, cfg)[0], keep[i])


@pytest.mark.parametrize("name", ["tiny", "resnet20", "mobilenet_v2"])
def test_all_ones_mask_equals_dense(name):
    model = tiny_cnn() if name == "tiny" else build_model(name, 10).eval()
    size = 64 if name == "mobilenet_v2" else 16 if name == "tiny" else 32
    x = torch.randn(3, 3, size, size)
    rep = find_prune_points(model, x[:1])
    dense = model(x)
    mm = MaskedModel(model, rep, {n: 0.0 for n in rep.names()}, ThresholdConfig("max", 0.0))
    mm.forced = {p.name: torch.ones(3, p.channels, dtype=torch.bool) for p in rep.points}
    assert torch.equal(mm(x), dense)
    assert torch.allclose(mm.instance_macs(), torch.full((3,), float(rep.dense_macs), dtype=torch.float64))
    mm.forced = None
    # tau 0 prunes only exactly-zero channels: output unchanged up to float error
    assert torch.allclose(mm(x), dense, atol=1e-5)
    assert (mm.instance_macs() <= rep.dense_macs).all()
    mm.remove()
    assert torch.equal(model(x), dense)  # hooks removed


def test_masking_zeroes_only_the_consumer_input():
    model = build_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    rep = find_prune_points(model, x[:1])
    seen = {}
    mm = MaskedModel(model, rep, {"layer1.0.conv1": 0.9}, ThresholdConfig("max", 0.0), record_masks=True)
    # registered after the mask hook: sees what the consumer reads
    model.layer1[0].conv1.register_forward_pre_hook(lambda m, a: seen.__setitem__("conv1_in", a[0].clone()))
    model.layer1[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("block_in", a[0].clone()))
    mm(x)
    keep = mm.masks["layer1.0.conv1"]
    assert keep.sum() < keep.numel()
    dropped = ~keep
    assert seen["conv1_in"].permute(1, 0, 2, 3)[dropped.t()].abs().sum() == 0
    # the residual stream itself (read by the shortcut) is untouched
    assert seen["block_in"].permute(1, 0, 2, 3)[dropped.t()].abs().sum() > 0
    # instance MACs reflect the kept channels of that point only
    p = rep.by_name()["layer1.0.conv1"]
    expect = rep.dense_macs - (p.channels - keep.sum(1)).double() * p.macs_per_channel
    assert torch.allclose(mm.instance_macs(), expect)
    mm.remove()


def _grad_of_conv1_input(ste: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, keep mask and the gradient reaching layer1.0.conv1's input only through that consumer."""
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    rep = find_prune_points(model, x[:1])
    mm = MaskedModel(model, rep, {"layer1.0.conv1": 0.9}, ThresholdConfig("max", 0.0), record_masks=True, ste=ste)
    feat = {}

    def grab(m, a):  # a leaf in front of the consumer: its gradient comes only through conv1 (and the mask)
        feat["x"] = a[0].detach().requires_grad_(True)
        return (feat["x"],)

    h = model.layer1[0].conv1.register_forward_pre_hook(grab, prepend=True)
    out = mm(x)
    model.layer1[0].conv1(feat["x"]).sum().backward()  # only the consumer's own output, masked as in mm
    keep = mm.masks["layer1.0.conv1"]
    h.remove()
    mm.remove()
    return out.detach(), keep, feat["x"].grad


def test_straight_through_gate_changes_only_the_backward():
    out0, keep0, g0 = _grad_of_conv1_input(0.0)
    out1, keep1, g1 = _grad_of_conv1_input(0.5)
    assert torch.equal(keep0, keep1) and (~keep0).any()
    assert torch.allclose(out0, out1)  # the forward value is the hard mask either way
    dropped = (~keep0).t()  # (C, N)
    # hard mask: a pruned channel gets no gradient through its consumer; the gate gives it one
    assert g0.permute(1, 0, 2, 3)[dropped].abs().sum() == 0
    assert g1.permute(1, 0, 2, 3)[dropped].abs().sum() > 0
    with pytest.raises(ConfigError):
        MaskedModel(build_model("resnet20"), find_prune_points(build_model("resnet20"), torch.zeros(1, 3, 32, 32)),
                    {}, ste=-1.0)
