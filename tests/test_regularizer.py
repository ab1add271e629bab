"""Feature decay: values and gradients on hand-computed examples."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from instaprune.core.errors import ConfigError
from instaprune.method.points import find_prune_points
from instaprune.method.regularizer import FeatureDecayConfig, attach_feature_decay, penalty


def test_penalty_values_by_hand():
    s = torch.tensor([[3.0, 4.0, 0.0]])
    assert penalty(s, "l21").item() == pytest.approx(7.0)
    assert penalty(s, "l1l2").item() == pytest.approx(7.0 / 5.0)
    assert penalty(s, "l1max").item() == pytest.approx(7.0 / 4.0)
    # the scale-invariant penalties do not change when the feature map is scaled
    assert penalty(0.1 * s, "l1l2").item() == pytest.approx(7.0 / 5.0)
    assert penalty(0.1 * s, "l1max").item() == pytest.approx(7.0 / 4.0)


class Copy(nn.Module):
    def forward(self, x):
        return x * 1.0


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Copy()
        self.conv = nn.Conv2d(2, 1, 1, bias=False)
        self.fc = nn.Linear(1, 1)

    def forward(self, x):
        return self.fc(self.conv(self.stem(x)).mean((2, 3)))


def test_loss_value_and_gradient_by_hand():
    model = Two()
    x0 = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]]])  # s = (1, 1)
    x = x0.clone().requires_grad_(True)
    rep = find_prune_points(model, x0)
    assert rep.names() == ["conv", "fc"]
    decay = attach_feature_decay(model, FeatureDecayConfig(0.5, "l21", "uniform"), rep.subset(["conv"]))
    model(x)
    loss = decay.pop()
    # lam * w * mean_i sum_c s = 0.5 * (1/2) * (1 + 1)
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    # d s_c / d x = x / (HW * s_c) -> channel 0: 1/4 each; channel 1: (2/4)/1 at one pixel, times lam*w = 0.25
    expect = 0.25 * torch.tensor([[[[0.25, 0.25], [0.25, 0.25]], [[0.5, 0.0], [0.0, 0.0]]]])
    assert torch.allclose(x.grad, expect)
    decay.remove()


def test_flops_weights_and_mean_over_instances():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 2, 1))
    x = torch.randn(2, 3, 4, 4)
    rep = find_prune_points(model, x[:1])
    decay = attach_feature_decay(model, FeatureDecayConfig(1.0, "l1max", "flops"), rep)
    assert sum(decay.weights.values()) == pytest.approx(1.0)
    model(x)
    got = decay.pop().item()
    with torch.no_grad():  # the hooks only record when gradients are enabled
        feats = [model[0](x), model[1](model[0](x))]
    expect = 0.0
    for p, f in zip(rep.points, feats, strict=True):
        s = f.pow(2).mean((2, 3)).sqrt()
        expect += decay.weights[p.name] * (s.sum(1) / s.amax(1)).mean().item()
    assert got == pytest.approx(expect, rel=1e-5)
    assert decay.pop().item() == 0.0  # buffer cleared
    decay.remove()


@pytest.mark.parametrize("bad", [-0.1, math.nan])
def test_negative_lambda_rejected(bad):
    with pytest.raises(ConfigError):
        FeatureDecayConfig(bad)
    with pytest.raises(ConfigError):
        FeatureDecayConfig(0.1, penalty="l0")
