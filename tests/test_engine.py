"""The fast dynamic engine against the masked reference: (a) forced masks, (b) end to end, batch invariance,
random layers (hypothesis), accounting and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import random_channel_masks, randomize_bn
from instaprune.core.errors import ConfigError, PlanMismatchError
from instaprune.engine.dynamic import ENGINE_STRATEGIES, DynamicModel, fold_dense, to_dynamic
from instaprune.method.flops import dynamic_macs
from instaprune.method.masked import MaskedModel
from instaprune.method.plan import Plan
from instaprune.method.points import PointReport, find_prune_points
from instaprune.method.thresholds import ThresholdConfig, keep_mask, reference, saliency
from instaprune.models import build_model

CIFAR = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16_bn_cifar", "tiny_resnet")
MODELS = (*CIFAR, "resnet18", "resnet50", "mobilenet_v2", "resnext50_32x4d", "densenet121", "efficientnet_b0",
          "mobilenet_v3_small", "vgg11_bn")
CFG = ThresholdConfig("max", 0.05)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


_CACHE: dict[str, tuple[nn.Module, PointReport, int]] = {}


def model_and_points(name: str) -> tuple[nn.Module, PointReport, int]:
    if name not in _CACHE:
        size = 32 if name in CIFAR else 64
        model = randomize_bn(build_model(name, 10))
        rep = find_prune_points(model, torch.zeros(1, 3, size, size))
        _CACHE.clear()  # keep one model alive at a time (vgg11_bn's classifier alone is 400 MB)
        _CACHE[name] = (model, rep, size)
    return _CACHE[name]


def plan_for(rep: PointReport, taus: dict[str, float], cfg: ThresholdConfig = CFG) -> Plan:
    return Plan("m", rep.fingerprint(), Plan.signature(rep), taus, cfg)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    err = (out - ref).abs().max().item()
    tol = 1e-4 * ref.abs().max().item()
    assert err <= tol, f"max abs diff {err:.3g} > {tol:.3g}"


def random_masks(rep: PointReport, n: int, keep: str | float,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-instance masks at every point (``conftest.random_channel_masks`` with the threshold floor)."""
    return random_channel_masks([(p.name, p.channels) for p in rep.points], n, keep, gen, CFG.floor)


# ---------------------------------------------------------------- (a) masks forced from the reference
@pytest.mark.parametrize("name", MODELS)
def test_forced_masks_equal_reference(name):
    model, rep, size = model_and_points(name)
    plan = plan_for(rep, {n: 0.5 for n in rep.names()})
    engine = to_dynamic(model, rep, plan)
    ref = MaskedModel(model, rep, plan.taus, CFG)
    gen = torch.Generator().manual_seed(1)
    batches = (1, 2, 7, 32)
    seen = set()
    try:
        for n in batches:
            x = torch.randn(n, 3, size, size, generator=gen)
            for keep in ("floor", 0.5, "mixed", 1.0):
                masks = random_masks(rep, n, keep, gen)
                ref.forced = engine.forced = masks
                with torch.no_grad():
                    expect = ref(x)
                out = engine(x)
                assert_close(out, expect)
                seen.update(engine.strategies().values())
                assert torch.allclose(engine.instance_macs(), ref.instance_macs())
    finally:
        ref.remove()
    assert "loop" in seen and "dense" in seen


@pytest.mark.parametrize("name", ["tiny_resnet", "mobilenet_v2", "resnext50_32x4d"])
def test_every_forced_strategy_equals_reference(name):
    model, rep, size = model_and_points(name)
    plan = plan_for(rep, {n: 0.5 for n in rep.names()})
    engine = to_dynamic(model, rep, plan)
    ref = MaskedModel(model, rep, plan.taus, CFG)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, size, size, generator=gen)
    ref.forced = engine.forced = random_masks(rep, 5, "mixed", gen)
    with torch.no_grad():
        expect = ref(x)
    ref.remove()
    for strategy in ENGINE_STRATEGIES:
        engine.strategy = strategy
        assert_close(engine(x), expect)
        summary = engine.summary()
        assert summary["executed_flops_reduction"] <= summary["flops_reduction"] + 1e-12
        if strategy == "loop" and name != "resnext50_32x4d":  # exact work (grouped convs pad inside groups)
            assert summary["executed_flops_reduction"] == pytest.approx(summary["flops_reduction"])


# ---------------------------------------------------------------- (b) end to end
def median_taus(model: nn.Module, rep: PointReport, x: torch.Tensor, mode: str = "max") -> dict[str, float]:
    """Per-point tau = median of s / ref(s) on x: about half of the channels pruned."""
    taus, handles = {}, []
    modules = dict(model.named_modules())

    def hook(name):
        def fn(m, args):
            s = saliency(args[0])
            taus[name] = float((s / reference(s, mode).clamp_min(1e-12)).median())

        return fn

    for p in rep.points:
        handles.append(modules[p.name].register_forward_pre_hook(hook(p.name)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return taus


def flips_against_reference(model, rep, engine: DynamicModel, x, taus, cfg=CFG) -> tuple[int, torch.Tensor]:
    """Run the reference with the engine's masks forced (same path through the network); at every point the
    engine's mask must equal the reference rule on the reference's own saliencies, except channels whose
    saliency lies within 1e-5 x ref of the threshold (the floor's k-th value included). Returns the number of
    such flips and the reference logits."""
    engine.record = True
    engine(x)
    masks = engine.last_masks()
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, saliency(a[0])))
               for n in masks]
    mm = MaskedModel(model, rep, taus, cfg)
    mm.forced = masks
    with torch.no_grad():
        logits = mm(x)
    mm.remove()
    for h in handles:
        h.remove()
    flips = 0
    for name, keep in masks.items():
        s = seen[name].double()
        expect = keep_mask(seen[name], taus[name], cfg)
        diff = keep != expect
        if not diff.any():
            continue
        ref = reference(s, cfg.mode)
        thr = taus[name] * ref
        kth = s.topk(cfg.floor(s.shape[1]), dim=1).values[:, -1:]
        near = ((s - thr).abs() <= 1e-5 * ref) | ((s - kth).abs() <= 1e-5 * ref)
        assert bool(near[diff].all()), f"{name}: a channel far from its threshold differs from the reference"
        flips += int(diff.sum())
    engine.record = False
    return flips, logits


@pytest.mark.parametrize("name,mode", [(m, "max") for m in MODELS] + [
    ("resnet20", "mean"), ("resnet20", "one"), ("mobilenet_v2", "mean"), ("mobilenet_v2", "one")])
def test_end_to_end_masks_and_logits(name, mode, record_property):
    model, rep, size = model_and_points(name)
    cfg = ThresholdConfig(mode, 0.05)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, size, size, generator=gen)
    taus = median_taus(model, rep, x, mode)
    engine = to_dynamic(model, rep, plan_for(rep, taus, cfg))
    flips, logits = flips_against_reference(model, rep, engine, x, taus, cfg)
    assert_close(engine(x), logits)
    summary = engine.summary()
    assert summary["flops_reduction"] > 0.2  # about half of every point's channels pruned
    total = sum(p.channels for p in rep.points) * x.shape[0]
    assert flips <= 1e-3 * total, f"{flips} flips of {total} channel decisions"
    record_property("flips", flips)  # reported in the JUnit XML (--junitxml) and below with -s / -rA
    record_property("channel_decisions", total)
    print(f"{name} ({mode}): {flips} flips in {total} channel decisions")


@pytest.mark.parametrize("name", ["resnet20", "tiny_resnet", "mobilenet_v2", "resnext50_32x4d"])
def test_batch_invariance(name):
    model, rep, size = model_and_points(name)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, size, size, generator=gen)
    engine = to_dynamic(model, rep, plan_for(rep, median_taus(model, rep, x)))
    engine.record = True
    batched = engine(x)
    masks = engine.last_masks()
    records = {n: r["saliency"].copy() for n, r in engine.records.items()}
    for i in range(6):
        alone = engine(x[i:i + 1])
        assert_close(alone, batched[i:i + 1])
        for n, m in engine.last_masks().items():
            diff = m[0] != masks[n][i]
            if diff.any():  # only a channel on its threshold may flip between batch compositions
                rec = engine.records[n]
                gap = abs(rec["saliency"][0] - rec["threshold"][0])[diff.numpy()]
                assert (gap <= 1e-5 * records[n][i].max()).all(), n


# ---------------------------------------------------------------- random layers (hypothesis)
layer = st.fixed_dictionaries({
    "cg": st.integers(1, 5), "og": st.integers(1, 3), "groups": st.sampled_from([1, 1, 2, 3, -1]),
    "kernel": st.sampled_from([1, 2, 3, 5]), "stride": st.integers(1, 3), "padding": st.integers(0, 2),
    "dilation": st.integers(1, 2), "bias": st.booleans(), "bn": st.booleans(),
    "act": st.sampled_from([None, "relu", "relu6"]), "n": st.integers(1, 5), "hw": st.integers(6, 12),
    "density": st.floats(0.0, 1.0), "seed": st.integers(0, 2**16),
})


@settings(deadline=None, derandomize=True, max_examples=40)
@given(layer)
def test_property_random_conv_layers(cfg):
    torch.manual_seed(cfg["seed"])
    if cfg["groups"] == -1:  # depthwise, maybe with a channel multiplier
        groups = ci = cfg["cg"] + 1
        co = ci * (1 + cfg["og"] % 2)
    else:
        groups, ci, co = cfg["groups"], cfg["cg"] * cfg["groups"], cfg["og"] * cfg["groups"]
    k, d = cfg["kernel"], cfg["dilation"]
    hw = max(cfg["hw"], d * (k - 1) + 1)
    conv = nn.Conv2d(ci, co, k, cfg["stride"], cfg["padding"], d, groups, bias=cfg["bias"])
    layers: list[nn.Module] = [nn.Conv2d(3, ci, 1), nn.ReLU(), conv]
    if cfg["bn"]:
        layers.append(nn.BatchNorm2d(co))
    if cfg["act"]:
        layers.append(nn.ReLU() if cfg["act"] == "relu" else nn.ReLU6())
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(co, 4)]
    model = randomize_bn(nn.Sequential(*layers), cfg["seed"])
    x = torch.randn(cfg["n"], 3, hw, hw)
    rep = find_prune_points(model, x[:1])
    assert rep.names() == ["2", f"{len(layers) - 1}"]
    plan = plan_for(rep, {n: 0.5 for n in rep.names()}, ThresholdConfig("max", 0.0))
    engine = to_dynamic(model, rep, plan)
    ref = MaskedModel(model, rep, plan.taus, plan.thresholds)
    masks = {p.name: torch.rand(cfg["n"], p.channels) < cfg["density"] for p in rep.points}
    ref.forced = engine.forced = masks
    with torch.no_grad():
        expect = ref(x)
    ref.remove()
    for strategy in ENGINE_STRATEGIES:
        engine.strategy = strategy
        assert_close(engine(x), expect)


# ---------------------------------------------------------------- accounting, layouts, fallback, errors
def test_dense_fold_and_channels_last_equal_the_model():
    model, rep, size = model_and_points("mobilenet_v2")
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expect = model(x)
    for cl in (False, True):
        dense = fold_dense(model, rep, channels_last=cl)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in dense.modules())
        assert_close(dense(x), expect)
    taus = median_taus(model, rep, x)
    nchw, cl = to_dynamic(model, rep, plan_for(rep, taus)), to_dynamic(model, rep, plan_for(rep, taus),
                                                                      channels_last=True)
    for n in (1, 3):
        masks = random_masks(rep, n, "mixed", torch.Generator().manual_seed(n))
        nchw.forced = cl.forced = masks
        assert_close(cl(x[:n]), nchw(x[:n]))


def test_constant_of_pruned_depthwise_channel_is_reproduced():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6),
                                       nn.BatchNorm2d(6), nn.ReLU6(), nn.Conv2d(6, 4, 1)), 7)
    x = torch.randn(1, 3, 8, 8)
    rep = find_prune_points(model, x)
    engine = to_dynamic(model, rep, plan_for(rep, {"2": 0.0}))
    mask = torch.tensor([[True, False, True, False, False, True]])
    engine.forced = {"2": mask}
    engine.strategy = "loop"
    seen = {}
    engine.net.get_submodule("5").register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    engine(x)
    assert engine.strategies()["2"] == "loop"  # the pruned channels are never computed
    bn = model[3]
    const = (bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()
             + model[2].bias * bn.weight / (bn.running_var + bn.eps).sqrt()).clamp(0, 6)
    for c in (1, 3, 4):
        assert torch.allclose(seen["x"][0, c], const[c].expand(8, 8), atol=1e-6)


def test_macs_accounting_and_other_resolution():
    model, rep, size = model_and_points("resnet20")
    taus = {n: 0.5 for n in rep.names()}
    engine = to_dynamic(model, rep, plan_for(rep, taus))
    ref = MaskedModel(model, rep, taus, CFG)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ref(x)
    engine(x)
    assert torch.allclose(engine.instance_macs(), ref.instance_macs())
    ref.remove()
    big = torch.randn(2, 3, 40, 40)
    engine(big)
    rep40 = find_prune_points(model, big[:1])
    active = {n: m.sum(1) for n, m in engine.last_masks().items()}
    assert torch.allclose(engine.instance_macs(), dynamic_macs(rep40.dense_macs, rep40.points, active))
    s = engine.summary()
    assert s["dense_macs"] == rep40.dense_macs and s["overhead_macs"] == sum(p.overhead_macs for p in rep40)


def test_untraceable_model_uses_module_replacement():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            y = torch.relu(self.stem(x))
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                y = y * 1.0
            y = torch.relu(self.bn(self.conv(y)))
            return self.fc(y.mean((2, 3)))

    model = randomize_bn(Branchy(), 5)
    x = torch.randn(3, 3, 9, 9)
    rep = find_prune_points(model, x[:1])
    engine = to_dynamic(model, rep, plan_for(rep, {"conv": 0.3, "fc": 0.1}))
    assert engine.method == "modules" and isinstance(engine.net.bn, nn.Identity)
    ref = MaskedModel(model, rep, {"conv": 0.3, "fc": 0.1}, CFG)
    ref.forced = engine.forced = random_masks(rep, 3, "mixed", torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(engine(x), ref(x))
    ref.remove()


def test_original_model_is_untouched_and_errors():
    model, rep, size = model_and_points("tiny_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = to_dynamic(model, rep, plan_for(rep, {n: 0.5 for n in rep.names()}))
    engine(torch.randn(2, 3, size, size))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(type(m).__name__.startswith("Dynamic") for m in model.modules())
    with pytest.raises(ConfigError):
        engine.strategy = "fastest"
    with pytest.raises(ConfigError):
        engine.forced = {}
    other, rep20, _ = model_and_points("resnet20")
    with pytest.raises(PlanMismatchError):
        to_dynamic(other, rep20, plan_for(rep, {n: 0.5 for n in rep.names()}))


def test_benchmark_plan_rows_and_breakdown():
    from instaprune.engine.bench import benchmark_plan

    model, rep, size = model_and_points("tiny_resnet")
    plan = plan_for(rep, {n: 0.5 for n in rep.names()})
    rows = benchmark_plan(model, rep, plan, torch.randn(4, 3, size, size), batch_sizes=(1, 2), pairs=1,
                          max_images=3)
    assert [(r["batch"], r["threads"]) for r in rows] == [(1, 1), (2, 1)]
    for r in rows:  # no timing assertions: fields present and consistent
        assert r["dense_variant"] in r["dense_candidates_ms"] and r["dense_ms"] > 0 and r["dynamic_ms"] > 0
        assert r["efficiency"] == pytest.approx(r["measured_speedup"] / r["theoretical_speedup"])
        assert set(r["breakdown_ms"]) == {"saliency", "gather", "conv", "other"}
        assert r["executed_flops_reduction"] <= r["flops_reduction"] + 1e-9
    assert rows[0]["dynamic_latency_ms"]["n"] == 3


def test_auto_tuning_settles_and_every_trial_is_exact():
    from instaprune.engine._modules import DynamicConv2d

    model, rep, size = model_and_points("resnet20")
    plan = plan_for(rep, {n: 0.5 for n in rep.names()})
    engine = to_dynamic(model, rep, plan)
    ref = MaskedModel(model, rep, plan.taus, CFG)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(8, 3, size, size, generator=gen)
    ref.forced = engine.forced = random_masks(rep, 8, 0.5, gen)
    with torch.no_grad():
        expect = ref(x)
    ref.remove()
    for _ in range(8):  # the trials run different strategies; each must be exact
        assert_close(engine(x), expect)
    layers = [m for m in engine.dynamic.values() if isinstance(m, DynamicConv2d)]
    assert any(m._tuned for m in layers) and not any(m.tuning for m in layers)
    assert engine.warmup(x) == 1
    engine.tune = False
    assert_close(engine(x), expect)


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_batch1_layouts_exact_and_layout_tuning_settles(name):
    model, rep, size = model_and_points(name)
    plan = plan_for(rep, {n: 0.5 for n in rep.names()})
    ref = MaskedModel(model, rep, plan.taus, CFG)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 3, size, size, generator=gen)
    cases = [(keep, random_masks(rep, 1, keep, gen)) for keep in ("floor", 0.5, 1.0)]
    expect = []
    for _, masks in cases:
        ref.forced = masks
        with torch.no_grad():
            expect.append(ref(x))
    ref.remove()
    for cl in (False, True):  # each layout on its own, depthwise and gathered convs included
        engine = to_dynamic(model, rep, plan, channels_last=cl)
        for (_, masks), e in zip(cases, expect, strict=True):
            engine.forced = masks
            assert_close(engine(x), e)
    engine = to_dynamic(model, rep, plan)  # auto: the first batch-1 call of a shape times both layouts
    assert not engine._layouts  # to_dynamic's own check is no timing trial
    engine.forced = cases[1][1]
    assert_close(engine(x), expect[1])  # the probe (all channels kept) leaves the caller's masks in force
    (choice,) = engine._layouts.values()
    assert isinstance(choice, bool) and engine.warmup(x) == 1 and not engine.tuning
    assert torch.equal(engine.last_masks()[rep.names()[0]], cases[1][1][rep.names()[0]])
    engine.tune = False  # no tuning: NCHW for a new shape
    assert engine._layout(torch.zeros(1, 3, size + 8, size + 8)) is False
