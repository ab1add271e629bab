"""Predicted gates (method.gates, pipeline.gated): discovery on every model family, per-image MACs against a model
sliced by hand and counted by FlopCounterMode, budgets, training under masks (resume, save/reload), plans."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from instaprune.core.config import Preprocessing
from instaprune.core.errors import ConfigError, PlanMismatchError
from instaprune.data.datasets import ImageSet
from instaprune.data.synthetic import make_dataset, mean_std
from instaprune.method.gates import (
    GATES_ATTR,
    GateConfig,
    GatedModel,
    GatePlan,
    GateRamp,
    attach_predictors,
    find_gates,
    fit_predictors,
    uniform_keep_for_target,
)
from instaprune.method.plan import Plan
from instaprune.method.points import find_prune_points
from instaprune.models import build_model
from instaprune.pipeline.gated import GateSchedule, train_gated
from instaprune.pipeline.stages import LoadedModel, load_model
from instaprune.training.checkpoint import save_checkpoint
from instaprune.training.loop import TrainConfig

FAMILIES = [  # (model, input size, minimum number of gates)
    ("resnet20", 32, 9),
    ("vgg16_bn_cifar", 32, 12),
    ("resnet18", 32, 8),
    ("resnet50", 32, 32),
    ("resnext50_32x4d", 32, 28),
    ("mobilenet_v2", 32, 17),
    ("mobilenet_v3_small", 32, 3),
    ("efficientnet_b0", 32, 1),
    ("densenet121", 32, 40),
    ("regnet_x_400mf", 32, 20),
    ("shufflenet_v2_x0_5", 32, 10),
]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    m = build_model(name).eval()
    for mod in m.modules():  # non-trivial BN so a wrong channel shows in the output
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


@pytest.mark.parametrize("name,size,least", FAMILIES)
def test_discovery_gives_every_conv_input_a_gate_or_a_reason(name, size, least):
    m = _model(name)
    rep = find_gates(m, torch.zeros(1, 3, size, size))
    assert len(rep) >= least
    convs = {n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    accounted = set(rep.names()) | {n for n, _ in rep.not_gateable} | {n for n, _ in rep.disabled}
    assert convs <= accounted  # nothing is dropped silently
    assert all(why for _, why in rep.not_gateable)
    producers = [p for s in rep for p in s.producers]
    assert len(producers) == len(set(producers))  # no conv's output is controlled by two gates
    for s in rep:
        assert s.channels > 0 and s.in_channels > 0 and s.name not in s.producers


def test_residual_stream_and_concatenation_are_not_gated():
    rep = find_gates(_model("resnet20"), torch.zeros(1, 3, 32, 32))
    reasons = dict(rep.not_gateable)
    assert "layer1.0.conv1" in reasons and "also read elsewhere" in reasons["layer1.0.conv1"]
    assert rep.names() == [f"layer{i}.{j}.conv2" for i in (1, 2, 3) for j in range(3)]
    dense = dict(find_gates(_model("densenet121"), torch.zeros(1, 3, 32, 32)).not_gateable)
    assert "concatenation" in dense["features.denseblock1.denselayer1.conv1"]


def _chain_bns(model: nn.Module, consumer: str) -> list[str]:
    """BatchNorm modules on the path from a gate's first producer to its consumer (found independently with fx)."""
    import torch.fx

    gm = torch.fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == consumer)
    out, cur = [], node.args[0]
    while True:
        if cur.op == "call_module" and isinstance(mods[cur.target], nn.BatchNorm2d):
            out.append(cur.target)
        if cur.op == "call_module" and isinstance(mods[cur.target], nn.Conv2d):
            m = mods[cur.target]
            if not (m.groups > 1 and m.groups == m.in_channels):
                return out
        if cur.op == "placeholder":
            return out
        cur = cur.args[0]


def _slice_conv(c: nn.Conv2d, in_idx, out_idx) -> nn.Conv2d:
    dw = c.groups > 1 and c.groups == c.in_channels == c.out_channels
    w = c.weight.detach()
    if dw:
        w = w[out_idx]
        n = len(out_idx)
        new = nn.Conv2d(n, n, c.kernel_size, c.stride, c.padding, c.dilation, groups=n, bias=c.bias is not None)
    else:
        if out_idx is not None:
            w = w[out_idx]
        if in_idx is not None:
            assert c.groups == 1 or in_idx is None or len(in_idx) == c.in_channels or c.groups == 1, "grouped"
            w = w[:, in_idx]
        new = nn.Conv2d(w.shape[1] * c.groups, w.shape[0], c.kernel_size, c.stride, c.padding, c.dilation,
                        groups=c.groups, bias=c.bias is not None)
    new.weight.data = w.clone()
    if c.bias is not None:
        new.bias.data = c.bias.detach()[out_idx].clone() if out_idx is not None else c.bias.detach().clone()
    return new


def _slice_bn(b: nn.BatchNorm2d, idx) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), b.eps).eval()
    for a in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, a).data = getattr(b, a).detach()[idx].clone()
    return new


def _set(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, mod)


def _hand_sliced(model: nn.Module, gated: GatedModel, i: int) -> nn.Module:
    """Image ``i``'s model with every skipped channel physically removed (written independently of gates.py)."""
    new = copy.deepcopy(model)
    delattr(new, GATES_ATTR)
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    bns: dict[str, torch.Tensor] = {}
    for s in gated.gates:
        keep = gated.masks[s.name][i].nonzero().flatten()
        ins[s.name] = keep
        for p in s.producers:
            outs[p] = keep
        for b in _chain_bns(model, s.name):
            bns[b] = keep
    mods = dict(model.named_modules())
    for name in set(ins) | set(outs):
        _set(new, name, _slice_conv(mods[name], ins.get(name), outs.get(name)))
    for name, idx in bns.items():
        _set(new, name, _slice_bn(mods[name], idx))
    return new.eval()


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet50", 32), ("mobilenet_v2", 32),
                                       ("vgg16_bn_cifar", 32)])
def test_per_image_macs_equal_flop_counter_on_the_hand_sliced_model(name, size):
    model = _model(name)
    gates = find_gates(model, torch.zeros(1, 3, size, size))
    # (grouped convs gated on both sides cannot be sliced into one conv per image: counted pair by pair in
    # test_grouped_conv_gated_on_both_sides_counts_pairs_within_groups)
    cfg = GateConfig(selection="threshold", multiplier="hard", min_keep=0.05)  # outputs = the sliced model
    attach_predictors(model, gates, cfg)
    torch.manual_seed(1)
    for p in getattr(model, GATES_ATTR).parameters():  # random predictors: per-image budgets differ
        nn.init.normal_(p, 0, 3)
    gated = GatedModel(model, gates, cfg, taus=dict.fromkeys(gates.names(), 0.5))
    x = torch.randn(3, 3, size, size) * torch.tensor([0.5, 1.0, 3.0]).view(3, 1, 1, 1) + torch.tensor(
        [-1.0, 0.0, 2.0]).view(3, 1, 1, 1)
    with torch.no_grad():
        y_ref = gated(x)
    per_image = gated.instance_macs()
    assert len(set(per_image.tolist())) > 1  # per-image budgets really differ
    for i in range(x.shape[0]):
        sliced = _hand_sliced(model, gated, i)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            y = sliced(x[i:i + 1])
        assert fc.get_total_flops() // 2 == int(per_image[i]), i
        torch.testing.assert_close(y, y_ref[i:i + 1], rtol=1e-4, atol=1e-4)  # the reference is the sliced model
    assert gated.overhead_macs() > 0
    gated.remove()


@pytest.mark.parametrize("multiplier", ["hard", "ste", "value"])
def test_gates_start_open(multiplier):
    model = _model("resnet20")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
    gates = find_gates(model, x[:1])
    cfg = GateConfig(keep=1.0, multiplier=multiplier)
    attach_predictors(model, gates, cfg)
    gated = GatedModel(model, gates, cfg)
    with torch.no_grad():
        torch.testing.assert_close(gated(x), dense)
    assert all(bool((v == 1).all()) for v in gated.values.values())
    assert float(gated.instance_macs()[0]) == gates.dense_macs


def test_topk_budget_and_uniform_keep_reach_the_target():
    model = _model("resnet20")
    gates = find_gates(model, torch.zeros(1, 3, 32, 32))
    cfg = GateConfig()
    attach_predictors(model, gates, cfg)
    gated = GatedModel(model, gates, cfg)
    r = uniform_keep_for_target(gates, 0.6, overhead=gated.overhead_macs())
    gated.set_keep(dict.fromkeys(gates.names(), r))
    nn.init.normal_(getattr(model, GATES_ATTR)["layer1__0__conv2"].fc.weight)
    with torch.no_grad():
        gated(torch.randn(5, 3, 32, 32))
    for s in gates:
        assert set(gated.active[s.name].tolist()) == {round(r * s.channels)}  # every image the same count
    red = 1 - (gated.instance_macs() + gated.overhead_macs()) / gates.dense_macs
    assert abs(float(red.mean()) - 0.6) < 0.01
    with pytest.raises(ConfigError, match="unreachable"):
        uniform_keep_for_target(gates, 0.999)
    with pytest.raises(ConfigError):
        gated.set_keep({"layer1.0.conv2": 0.0})
    with pytest.raises(ConfigError):
        GateConfig(keep=1.5)


def test_plan_without_predictors_is_refused():
    model = _model("resnet20")
    gates = find_gates(model, torch.zeros(1, 3, 32, 32))
    with pytest.raises(PlanMismatchError, match="no gate predictors"):
        GatedModel(model, gates)
    attach_predictors(model, gates.subset(gates.names()[:3]), GateConfig())
    with pytest.raises(PlanMismatchError, match="do not cover"):
        GatedModel(model, gates)


def _warmed(multiplier: str) -> tuple[nn.Module, list[float], dict[str, torch.Tensor]]:
    model = _model("resnet20")
    gates = find_gates(model, torch.zeros(1, 3, 32, 32))
    cfg = GateConfig(multiplier=multiplier)
    attach_predictors(model, gates, cfg)
    gated = GatedModel(model, gates, cfg)
    torch.manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(GATES_ATTR)}
    return model, fit_predictors(gated, batches, epochs=5, lr=0.05), before


@pytest.mark.parametrize("multiplier", ["hard", "value"])
def test_warmup_fit_lowers_the_fit_loss(multiplier):
    model, losses, before = _warmed(multiplier)
    assert losses[-1] < 0.5 * losses[0]
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the network stayed frozen


def test_warmup_fits_the_dense_network_whatever_the_multiplier():
    """The warm-up fits each predictor to the *dense* network's saliency: a ``value`` multiplier does not scale T
    by the predictions being fitted (it compounded over depth and overflowed to NaN on ResNet-56)."""
    (m_hard, l_hard, _), (m_value, l_value, _) = _warmed("hard"), _warmed("value")
    assert l_value == pytest.approx(l_hard, rel=1e-6)
    for k, v in m_hard.state_dict().items():
        torch.testing.assert_close(m_value.state_dict()[k], v)


def test_ramp_opens_then_reaches_the_budget():
    model = _model("resnet20")
    gates = find_gates(model, torch.zeros(1, 3, 32, 32))
    attach_predictors(model, gates, GateConfig())
    gated = GatedModel(model, gates)
    ramp = GateRamp(gated, dict.fromkeys(gates.names(), 0.4), ramp=0.5)
    assert all(k == 1.0 for k in gated.keep.values())
    ramp.step(0.25)
    assert all(0.4 < k < 1.0 for k in gated.keep.values())
    ramp.step(0.5)
    assert all(abs(k - 0.4) < 1e-9 for k in gated.keep.values())


@pytest.fixture(scope="module")
def tiny_data():
    d = make_dataset(96, seed=3, size=16)
    mean, std = mean_std(d)
    return ImageSet(d.images, d.labels, d.class_names), Preprocessing(mean, std, 16)


def _lm(pre: Preprocessing) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("tiny_resnet", build_model("tiny_resnet", 10), pre, {})


@pytest.mark.parametrize("selection,static", [("topk", 0.0), ("threshold", 0.0), ("topk", 0.2)])
def test_gated_training_saves_reloads_and_plans_round_trip(tiny_data, tmp_path, selection, static):
    data, pre = tiny_data
    lm = _lm(pre)
    cfg = GateConfig(selection=selection, multiplier="ste", decay=0.1)
    sched = GateSchedule(target=0.4, ramp=0.5, warmup_batches=2, static_target=static)
    tcfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=1, distill=0.5)
    plan, metrics = train_gated(lm, data, data, cfg, sched, tcfg, tmp_path / "run", resume=None)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2] and "train_top1" in metrics["history"][0]
    assert abs(metrics["calibration"]["flops_reduction"] - 0.4) <= 0.02
    if selection == "threshold":
        assert plan.gates.taus and metrics["calibration"]["selection"] == "threshold"
    assert (plan.gates.static is not None) == (static > 0)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    meta = {"model_name": "tiny_resnet", "num_classes": 10, "preprocessing": pre.to_dict(),
            "gates": plan.gates.to_dict()}
    save_checkpoint(tmp_path / "model.pt", lm.model, meta)
    back = load_model("tiny_resnet", tmp_path / "model.pt")
    x = torch.randn(4, 3, 16, 16)
    from instaprune.evaluation.accuracy import dynamic_model
    from instaprune.pipeline.stages import discover

    a = dynamic_model(lm.model, discover(lm.model, pre), again, pre)
    b = dynamic_model(back.model, discover(back.model, back.pre), again, back.pre)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
        assert torch.equal(a.instance_macs(), b.instance_macs())


@pytest.mark.parametrize("static", [0.0, 0.2])
def test_slim_gated_off_removes_never_kept_channels_exactly(tiny_data, tmp_path, static):
    """Section 10's gated static part: channels no image keeps are removed physically (producer filters, BN,
    consumer inputs, predictor rows; composed with an L1 static part when there is one); top-k keeps the same k,
    so outputs and per-image MACs are unchanged on the images measured, and the checkpoint reloads."""
    from instaprune.method.gates import channel_usage, gated_from_plan
    from instaprune.pipeline.gated import slim_gated_off
    from instaprune.pipeline.stages import cached_batches

    data, pre = tiny_data
    lm = _lm(pre)
    sched = GateSchedule(target=0.4, ramp=0.5, warmup_batches=2, static_target=static)
    plan, _ = train_gated(lm, data, data, GateConfig(), sched, TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=1),
                          None, resume=None)
    name = plan.gates.sites[0].name
    fc = getattr(lm.model, GATES_ATTR)[name.replace(".", "__")].fc
    with torch.no_grad():  # two channels this predictor never opens
        fc.weight[:2] = 0
        fc.bias[:2] = -1
    x0 = torch.zeros(1, 3, 16, 16)
    calib = cached_batches(data, pre)
    ref = gated_from_plan(lm.model.eval(), find_gates(lm.model, x0), plan.gates)
    with torch.no_grad():
        want = [(ref(x), ref.instance_macs()) for x, _ in calib]
    usage = channel_usage(ref, calib)
    ref.remove()
    assert float(usage[name][:2].max()) == 0
    never = sum(int((u == 0).sum()) for u in usage.values())
    u = min(float(v[v > 0].min()) for v in usage.values())  # below every channel some image keeps
    new_plan, info = slim_gated_off(lm, plan.gates, calib, None, usage=u / 2)
    assert info["removed"][name] >= 2 and sum(info["removed"].values()) == never
    assert new_plan.static is not None and new_plan.static["flops_reduction"] > (plan.gates.static or {}).get(
        "flops_reduction", 0.0)
    g = gated_from_plan(lm.model, find_gates(lm.model, x0), new_plan)
    with torch.no_grad():
        for (x, _), (y, macs) in zip(calib, want, strict=True):
            torch.testing.assert_close(g(x), y)
            torch.testing.assert_close(g.instance_macs(), macs)
    g.remove()
    meta = {"model_name": "tiny_resnet", "num_classes": 10, "preprocessing": pre.to_dict(),
            "gates": new_plan.to_dict()}
    save_checkpoint(tmp_path / "model.pt", lm.model, meta)
    back = load_model("tiny_resnet", tmp_path / "model.pt")
    gb = gated_from_plan(back.model, find_gates(back.model, x0), new_plan)
    with torch.no_grad():
        torch.testing.assert_close(gb(calib[0][0]), want[0][0])


def test_resumed_gated_run_reaches_identical_weights(tiny_data, tmp_path):
    data, pre = tiny_data
    cfg = GateConfig(multiplier="ste")
    sched = GateSchedule(target=0.4, ramp=0.5, warmup_batches=2)
    tcfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=1, checkpoint_every=2)
    ref = _lm(pre)
    train_gated(ref, data, None, cfg, sched, tcfg, tmp_path / "ref", resume=None)

    def crash(d):
        if d["global_step"] == 9:
            raise RuntimeError("simulated crash")

    first = _lm(pre)
    with pytest.raises(RuntimeError, match="simulated"):
        train_gated(first, data, None, cfg, sched, tcfg, tmp_path / "run", resume=None, progress=crash)
    second = _lm(pre)
    train_gated(second, data, None, cfg, sched, tcfg, tmp_path / "run", resume="auto")
    want = ref.model.state_dict()
    for k, v in second.model.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_gate_plan_rejects_bad_budgets_and_foreign_models():
    model = _model("resnet20")
    gates = find_gates(model, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError):
        GatePlan(GateConfig(), gates.sites, {"layer1.0.conv2": 1.5})
    with pytest.raises(ConfigError, match="unknown gates"):
        GatePlan(GateConfig(), gates.sites, {"nope": 0.5})
    plan = GatePlan(GateConfig(), gates.sites, dict.fromkeys(gates.names(), 0.5))
    other = find_gates(_model("resnet32"), torch.zeros(1, 3, 32, 32))
    assert len(plan.report(other)) == len(gates)  # resnet32 has these gates too
    vgg = find_gates(_model("vgg16_bn_cifar"), torch.zeros(1, 3, 32, 32))
    with pytest.raises(PlanMismatchError, match="missing"):
        plan.report(vgg)
    assert json.loads(json.dumps(plan.to_dict()))["keep"] == plan.keep


def test_prune_points_never_include_predictors():
    model = _model("resnet20")
    gates = find_gates(model, torch.zeros(1, 3, 32, 32))
    attach_predictors(model, gates, GateConfig(predictor="bottleneck"))
    pts = find_prune_points(model, torch.zeros(1, 3, 32, 32))
    assert not any(GATES_ATTR in p.name for p in pts)
    assert not any(GATES_ATTR in n for n, _ in pts.skipped)


def test_grouped_conv_gated_on_both_sides_counts_pairs_within_groups():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 8, 1)).eval()
    gates = find_gates(net, torch.zeros(1, 8, 6, 6))
    assert gates.names() == ["3", "6"]
    attach_predictors(net, gates, GateConfig())
    gated = GatedModel(net, gates)
    m_in = torch.rand(5, 16) > 0.5
    m_out = torch.rand(5, 16) > 0.4
    m_in[:, 0] = m_out[:, 0] = True
    gated.forced = {"3": m_in, "6": m_out}
    with torch.no_grad():
        gated(torch.randn(5, 8, 6, 6))
    hw = 36
    for i in range(5):
        want = hw * 8 * int(m_in[i].sum())  # conv1: its kept output filters
        for o in range(16):  # conv2: kept (input, output) pairs inside each group
            if m_out[i, o]:
                g = o // 4
                want += hw * 9 * int(m_in[i, 4 * g:4 * g + 4].sum())
        want += hw * 8 * int(m_out[i].sum())  # conv3: its kept input channels
        assert int(gated.instance_macs()[i]) == want


@pytest.mark.parametrize("multiplier", ["hard", "value"])
def test_gated_export_matches_the_reference(tmp_path, multiplier):
    pytest.importorskip("onnxruntime")
    from instaprune.evaluation.export import export_model
    from instaprune.pipeline.stages import discover

    model = _model("resnet20")
    gates = find_gates(model, torch.zeros(1, 3, 32, 32))
    cfg = GateConfig(selection="topk", multiplier=multiplier)
    attach_predictors(model, gates, cfg)
    torch.manual_seed(0)
    for p in getattr(model, GATES_ATTR).parameters():  # many g = 0: ties broken the same way everywhere
        nn.init.normal_(p, 0.0, 0.3)
        if multiplier == "value":  # g near 1, as trained gates give: x g over 9 blocks stays O(1) (the 0.3 init
            if p.dim() == 1:  # above compounds to outputs of 1e20, where float rounding alone is larger than 1e-3)
                nn.init.normal_(p, 1.0, 0.3)
            else:
                nn.init.normal_(p, 0.0, 0.02)
    pre = Preprocessing(input_size=32)
    points = discover(model, pre)
    gp = GatePlan(cfg, gates.sites, dict.fromkeys(gates.names(), 0.4), {}, gates.dense_macs)
    plan = Plan("resnet20", points.fingerprint(), Plan.signature(points), {}, preprocessing=pre, gates=gp)
    x = torch.randn(6, 3, 32, 32)
    res = export_model(model, tmp_path, plan, 32, return_active=True, verify_inputs=x)
    if multiplier == "hard":  # the same ops in the same order
        assert res.max_abs_diff["pt2"] == 0.0 and res.max_abs_diff["onnx"] < 1e-3
    else:  # x * g: the exported graph may fuse or reorder the products (float rounding only)
        assert res.max_abs_diff["pt2"] < 1e-4 and res.max_abs_diff["onnx"] < 1e-3
    assert "TopK" in res.onnx_ops
    info = json.loads((tmp_path / "export.json").read_text())
    assert info["method"] == "gates" and info["selected_points"] == gates.names()


def test_greedy_allocation_reaches_the_target_and_never_loses_to_uniform():
    from instaprune.method.gates import allocate_keep

    model = _model("resnet20")
    gates = find_gates(model, torch.zeros(1, 3, 32, 32))
    cfg = GateConfig()
    attach_predictors(model, gates, cfg)
    torch.manual_seed(0)
    for p in getattr(model, GATES_ATTR).parameters():
        nn.init.normal_(p, 0.0, 0.3)
    gated = GatedModel(model, gates, cfg)
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(2)]
    keep, info = allocate_keep(gated, batches, 0.5, "greedy", rungs=4)
    assert info["chosen"] in ("greedy", "uniform") and info["evaluations"] > len(gates)
    gated.set_keep(keep)
    with torch.no_grad():
        gated(batches[0][0])
    red = 1 - (float(gated.instance_macs().mean()) + gated.overhead_macs()) / gates.dense_macs
    assert red >= 0.5 - 0.01
    if info["chosen"] == "greedy":
        assert info["greedy"]["top1"] >= info["uniform"]["top1"]
    uni, info_u = allocate_keep(gated, batches, 0.5, "uniform")
    assert len(set(uni.values())) == 1 and info_u["chosen"] == "uniform"


def test_one_model_mixes_gates_and_post_hoc_points():
    model = _model("resnet20")
    x = torch.randn(4, 3, 32, 32)
    gates = find_gates(model, x[:1])
    points = find_prune_points(model, x[:1])
    stream = [p.name for p in points if p.name.endswith("conv1") and p.name.startswith("layer")]  # residual stream
    cfg = GateConfig()
    attach_predictors(model, gates, cfg)
    with pytest.raises(ConfigError, match="either gated or a post-hoc point"):
        GatedModel(model, gates, cfg, points=points, point_taus={"layer1.0.conv2": 0.1})
    mixed = GatedModel(model, gates, cfg, keep=dict.fromkeys(gates.names(), 0.5), points=points,
                       point_taus=dict.fromkeys(stream, 0.5))
    only = GatedModel(model, gates, cfg, keep=dict.fromkeys(gates.names(), 0.5))
    only.enabled = False
    with torch.no_grad():
        mixed(x)
    only.remove()
    assert set(mixed.posthoc.active) == set(stream)
    for name in stream:  # the block's conv1 reads a post-hoc mask and writes a gated tensor: both fractions
        site = next(s for s in gates if name in s.producers)
        f_in = mixed.posthoc.active[name].double() / next(p.channels for p in points if p.name == name)
        f_out = mixed.active[site.name].double() / site.channels
        assert torch.all(f_in < 1) and torch.all(f_out < 1)
    gated_only = GatedModel(model, gates, cfg, keep=dict.fromkeys(gates.names(), 0.5))
    mixed.enabled = mixed.posthoc.enabled = False  # its hooks stay attached: switch them off
    with torch.no_grad():
        gated_only(x)
    layer = dict(gates.layer_macs)
    saved = sum(layer[n] * (1 - mixed.posthoc.active[n].double() / next(p.channels for p in points if p.name == n))
                * (mixed.active[next(s.name for s in gates if n in s.producers)].double()
                   / next(s.channels for s in gates if n in s.producers)) for n in stream)
    torch.testing.assert_close(mixed.instance_macs(), gated_only.instance_macs() - saved)
    assert mixed.overhead_macs() > gated_only.overhead_macs()
    mixed.remove()
    gated_only.remove()


def test_cli_lists_gates_and_recalibrates_a_gated_checkpoint(tiny_data, tmp_path, capsys):
    from instaprune.cli.main import main

    data, pre = tiny_data
    lm = _lm(pre)
    plan, _ = train_gated(lm, data, data, GateConfig(), GateSchedule(target=0.4, warmup_batches=1),
                          TrainConfig(epochs=1, batch_size=16, lr=0.05), None, resume=None)
    meta = {"model_name": "tiny_resnet", "num_classes": 10, "preprocessing": pre.to_dict(),
            "gates": plan.gates.to_dict()}
    save_checkpoint(tmp_path / "model.pt", lm.model, meta)
    from PIL import Image

    folder = tmp_path / "images"  # the tiny set as an ImageFolder of PNGs (uint8 N, C, H, W)
    for i, (img, y) in enumerate(zip(data.images[:40], data.labels[:40], strict=True)):
        (folder / data.class_names[int(y)]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / data.class_names[int(y)] / f"{i}.png")
    assert main(["points", "--model", "resnet20", "--gates", "--output-dir", str(tmp_path / "pts")]) == 0
    listed = json.loads((tmp_path / "pts" / "gates.json").read_text())
    assert len(listed["gates"]) == 9 and any("skip connection" in r["reason"] for r in listed["not_gateable"])
    assert main(["calibrate", "--model", "tiny_resnet", "--checkpoint", str(tmp_path / "model.pt"), "--data-path",
                 str(folder), "--target", "0.3", "--output-dir", str(tmp_path / "cal")]) == 0
    new = Plan.load(tmp_path / "cal" / "plan.json")
    assert new.gates is not None and new.target == 0.3
    assert abs(new.calibration["flops_reduction"] - 0.3) <= 0.02
    assert new.gates.keep[plan.gates.sites[0].name] > plan.gates.keep[plan.gates.sites[0].name]
    # --gate-slim-off: the channels the gates keep for < 60% of the images go; the slim weights are saved with
    # the plan, and evaluate accepts the pair (fingerprints match) with the same FLOPs as calibrated
    cal = tmp_path / "slim"
    assert main(["calibrate", "--model", "tiny_resnet", "--checkpoint", str(tmp_path / "model.pt"), "--data-path",
                 str(folder), "--target", "0.4", "--gate-slim-off", "0.6", "--output-dir", str(cal)]) == 0
    sp = Plan.load(cal / "plan.json")
    removed = sp.calibration["slim_off"]["removed"]
    assert sp.gates.static is not None and sum(removed.values()) > 0 and sp.calibration["static_flops_reduction"] > 0
    back = load_model("tiny_resnet", cal / "model.safetensors")
    widths = {s.name: s.channels for s in find_gates(back.model, torch.zeros(1, 3, 16, 16))}
    for site in plan.gates.sites:
        assert widths[site.name] == site.channels - removed.get(site.name, 0)
    assert main(["evaluate", "--model", "tiny_resnet", "--checkpoint", str(cal / "model.pt"), "--plan",
                 str(cal / "plan.json"), "--data-path", str(folder), "--output-dir", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert abs(ev["flops_reduction"] - sp.calibration["flops_reduction"]) <= 1e-6


@pytest.mark.parametrize(("flags", "distill"), [(["--static-target", "0.3"], 0.5),
                                               (["--static-target", "0.3", "--distill", "0"], 0.0),
                                               (["--gates", "--target", "0.4", "--gate-warmup-batches", "1"], 0.5),
                                               ([], 0.0)])
def test_cli_train_distils_gated_and_static_runs_by_default_and_records_the_weight(tiny_data, tmp_path, flags,
                                                                                      distill):
    """``--distill`` unset: gates and static slimming distil from the dense starting model at the study's weight
    (0.5); the post-hoc method (no teacher) does not; the weight used is what the checkpoint records."""
    from PIL import Image

    from instaprune.cli.main import main

    data, pre = tiny_data
    folder = tmp_path / "images"
    for i, (img, y) in enumerate(zip(data.images[:48], data.labels[:48], strict=True)):
        (folder / data.class_names[int(y)]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / data.class_names[int(y)] / f"{i}.png")
    save_checkpoint(tmp_path / "dense.pt", _lm(pre).model, {"model_name": "tiny_resnet", "num_classes": 10,
                                                            "preprocessing": pre.to_dict()})
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny_resnet", "--checkpoint", str(tmp_path / "dense.pt"), "--data-path",
                 str(folder), "--holdout", "16", "--epochs", "1", "-b", "16", "--lr", "0.05", *flags,
                 "--output-dir", str(out)]) == 0
    assert load_model("tiny_resnet", out / "model.pt").meta["train_config"]["distill"] == distill
    if "--gates" in flags:  # unset --static-target: half the target slimmed statically first, recorded as used
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["schedule"]["static_target"] == pytest.approx(0.2) and metrics["static"]


def test_cli_refuses_a_gated_plan_on_weights_without_gates_and_leaves_nothing(tmp_path, capsys):
    from instaprune.cli.main import main

    model = _model("resnet20")
    pre = Preprocessing(input_size=32)
    gates = find_gates(model, torch.zeros(1, 3, 32, 32))
    points = find_prune_points(model, torch.zeros(1, 3, 32, 32))
    gp = GatePlan(GateConfig(), gates.sites, dict.fromkeys(gates.names(), 0.5), {}, gates.dense_macs)
    Plan("resnet20", points.fingerprint(), Plan.signature(points), {}, preprocessing=pre, gates=gp).save(
        tmp_path / "plan.json")
    save_checkpoint(tmp_path / "plain.pt", model, {"model_name": "resnet20", "num_classes": 10})
    (tmp_path / "img" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "a" / "0.png")
    out = tmp_path / "out"
    code = main(["evaluate", "--model", "resnet20", "--checkpoint", str(tmp_path / "plain.pt"), "--plan",
                 str(tmp_path / "plan.json"), "--data-path", str(tmp_path / "img"), "--output-dir", str(out),
                 "--allow-other-weights"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no gate predictors" in err[0]
    assert not out.exists()  # nothing half-written
