"""Static L1-norm filter pruning baseline: MACs honest against FlopCounterMode, masks == slimmed model."""
from __future__ import annotations

import pytest
import torch

from instaprune.baselines.static import StaticPlan, apply_masks, find_pairs, slim, static_plan
from instaprune.core.errors import ConfigError
from instaprune.method.flops import flop_counter_macs
from instaprune.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("resnet20", 10)
    for mod in m.modules():  # non-trivial BN statistics so masking vs slimming is a real check
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


X = torch.randn(2, 3, 32, 32)


def test_pairs_and_dense_macs(model):
    pairs, dense = find_pairs(model, X)
    assert len(pairs) == 9 and pairs[0].block == "layer1.0" and pairs[0].channels == 16
    assert dense == flop_counter_macs(model, X)


@pytest.mark.parametrize("scope", ["uniform", "global"])
@pytest.mark.parametrize("target", [0.3, 0.6, 0.7])
def test_plan_reaches_target_and_counts_honestly(model, scope, target):
    plan = static_plan(model, X, target, scope=scope)
    assert target <= plan.reduction < target + 0.03
    small = slim(model, plan)
    assert flop_counter_macs(small, X) == pytest.approx(plan.macs, abs=1)  # producer + consumer savings
    handles = apply_masks(model, plan)
    try:
        masked_out = model(X)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(small(X), masked_out, rtol=1e-4, atol=1e-5)
    assert all(k.sum() >= 1 for k in plan.keep.values())


def test_l1_order_and_roundtrip(model):
    plan = static_plan(model, X, 0.3)
    w = model.layer1[0].conv1.weight.detach().abs().flatten(1).sum(1)
    removed = (~plan.keep["layer1.0"]).nonzero().flatten()
    kept = plan.keep["layer1.0"].nonzero().flatten()
    assert w[removed].max() <= w[kept].min()  # the smallest L1 filters go first
    pairs, _ = find_pairs(model, X)
    back = StaticPlan.from_dict(plan.to_dict(), pairs)
    assert back.macs == plan.macs and all(torch.equal(back.keep[b], plan.keep[b]) for b in plan.keep)


def test_masked_training_leaves_removed_filters_without_gradient(model):
    m = build_model("resnet20", 10).train()
    plan = static_plan(m, X, 0.45)
    handles = apply_masks(m, plan)
    m(X).sum().backward()
    g = m.layer1[0].conv1.weight.grad.flatten(1).abs().sum(1)
    assert (g[~plan.keep["layer1.0"]] == 0).all() and (g[plan.keep["layer1.0"]] > 0).any()
    for h in handles:
        h.remove()


def test_errors(model):
    with pytest.raises(ConfigError):
        static_plan(model, X, 0.999)
    with pytest.raises(ConfigError):
        static_plan(model, X, 0.5, scope="bogus")
    with pytest.raises(ConfigError):
        static_plan(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), X, 0.5)
