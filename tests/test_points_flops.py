"""Discovery and FLOPs agreement with FlopCounterMode on every supported model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_cnn
from instaprune.method.flops import dynamic_macs, flop_counter_macs, reduction_summary
from instaprune.method.points import find_prune_points
from instaprune.models import build_model

CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16_bn_cifar"]
TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "resnext50_32x4d", "densenet121", "efficientnet_b0",
               "mobilenet_v3_small", "vgg11_bn", "shufflenet_v2_x0_5", "regnet_x_400mf", "squeezenet1_0"]


@pytest.mark.parametrize("name", CIFAR + TORCHVISION)
def test_discovery_and_dense_macs_match_flop_counter(name):
    model = build_model(name, num_classes=10).eval()
    size = 32 if name in CIFAR else 64
    x = torch.randn(1, 3, size, size)
    rep = find_prune_points(model, x)
    assert rep.dense_macs == flop_counter_macs(model, x)
    assert len(rep.points) > 0
    # every Conv2d/Linear is a point, disabled with a reason, or skipped with a reason: nothing silent
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    accounted = set(rep.names()) | {p.name for p, _ in rep.disabled} | {n for n, _ in rep.skipped}
    assert layers == accounted
    assert all(reason for _, reason in rep.skipped)
    # the RGB input is never a prune point
    assert all(p.channels != 3 or p.kind == "linear" for p in rep.points)
    assert sum(p.macs for p in rep.points) <= rep.dense_macs


def test_cifar_resnet_points_follow_method():
    rep = find_prune_points(build_model("resnet20").eval(), torch.randn(1, 3, 32, 32))
    names = rep.names()
    assert "conv1" in dict(rep.skipped)  # reads the RGB input
    assert "layer1.0.conv1" in names and "layer1.0.conv2" in names and "linear" in names
    assert len(names) == 19  # 18 block convs + the classifier
    shortcuts = find_prune_points(build_model("resnet18", 10).eval(), torch.randn(1, 3, 64, 64), shortcuts=True)
    assert any(p.shortcut for p in shortcuts.points)


def test_include_exclude_patterns():
    model = build_model("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    only = find_prune_points(model, x, include=["layer3.*"])
    assert only.names() and all(n.startswith("layer3.") for n in only.names())
    ex = find_prune_points(model, x, exclude=["*conv2", "linear"])
    assert all(not n.endswith("conv2") for n in ex.names()) and "linear" not in ex.names()


def test_unsupported_layers_get_reasons():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.shared = nn.Conv2d(8, 8, 3, padding=1)
            self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
            self.unused = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            x = self.shared(self.shared(self.stem(x)))
            x = self.up(x)
            return self.head(x.mean((2, 3)))

    rep = find_prune_points(Odd(), torch.randn(1, 3, 8, 8))
    reasons = dict(rep.skipped)
    assert "called 2 times" in reasons["shared"]
    assert "not supported" in reasons["up"]
    assert "not called" in reasons["unused"]
    assert rep.names() == ["head"]


def test_dynamic_macs_grouped_and_depthwise():
    model = tiny_cnn()
    rep = find_prune_points(model, torch.randn(1, 3, 16, 16))
    pts = rep.by_name()
    # depthwise 3x3 conv on 32 channels at 8x8: 32*64*9 MACs; half the channels active -> half the MACs
    dw = pts["6"]
    assert dw.kind == "depthwise" and dw.macs == 32 * 64 * 9
    active = {p.name: torch.tensor([p.channels, p.channels // 2]) for p in rep.points}
    macs = dynamic_macs(rep.dense_macs, rep.points, active)
    saved = sum(p.macs - p.macs_per_channel * (p.channels // 2) for p in rep.points)
    assert macs[0] == rep.dense_macs and abs(float(macs[1]) - (rep.dense_macs - saved)) < 1e-6
    s = reduction_summary(macs, rep.dense_macs, overhead=0)
    assert abs(s["flops_reduction"] - 0.5 * saved / rep.dense_macs) < 1e-9
    neg = reduction_summary(torch.tensor([float(rep.dense_macs)]), rep.dense_macs, overhead=100)
    assert neg["flops_reduction"] < 0  # never clipped
