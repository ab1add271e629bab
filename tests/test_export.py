"""Export of the dynamic model (torch.export and ONNX) and portable artifacts (safetensors + plan).

The exported graphs compute each image's masks themselves: on inputs whose masks differ, onnxruntime and the
saved torch.export program give the masked reference model's outputs (logits within 1e-4, kept-channel
counts exactly)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from instaprune.cli.main import main
from instaprune.core.config import Preprocessing
from instaprune.core.errors import CheckpointError, PlanMismatchError
from instaprune.evaluation.export import DynamicExport, export_model, load_program, run_onnx
from instaprune.method.masked import MaskedModel
from instaprune.method.plan import Plan
from instaprune.method.points import find_prune_points
from instaprune.method.thresholds import ThresholdConfig
from instaprune.models import build_model
from instaprune.models.tiny_resnet import tiny_resnet
from instaprune.training.artifacts import load_portable, save_portable

ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
LOGIT_TOL = 1e-4  # float32 kernels of onnxruntime vs PyTorch; measured ~5e-8 on tiny_resnet


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def make_plan(model, size: int, tau: float = 0.45, name: str = "tiny_resnet", include=None) -> Plan:
    points = find_prune_points(model, torch.zeros(1, 3, size, size), include=include)
    taus = {n: tau for n in points.names()}
    return Plan(name, points.fingerprint(), Plan.signature(points), taus, ThresholdConfig("max", 0.1),
                preprocessing=Preprocessing(input_size=size))


def model_and_plan(size: int = 16):
    torch.manual_seed(0)
    model = build_model("tiny_resnet", 10).eval()
    return model, make_plan(model, size)


def probe(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return x * torch.linspace(0.2, 3.0, n).view(n, 1, 1, 1)  # different contrasts -> different masks


def test_export_wrapper_equals_the_masked_reference_and_masks_vary():
    model, plan = model_and_plan()
    x = probe(8, 16)
    ref = MaskedModel(model, find_prune_points(model, torch.zeros(1, 3, 16, 16)), plan.taus, plan.thresholds,
                      record_masks=True)
    with torch.no_grad():
        expected = ref(x)
        active_ref = torch.stack([ref.active[n] for n in plan.selected], dim=1)
    ref.remove()
    wrapper = DynamicExport(model, plan, return_active=True)
    with torch.no_grad():
        logits, active = wrapper(x)
    wrapper.remove()
    assert torch.equal(logits, expected) and torch.equal(active, active_ref)
    assert len({tuple(r.tolist()) for r in active}) > 1  # instances keep different channel counts
    assert (active < torch.tensor([p[2] for p in plan.points if p[0] in plan.taus])).any()  # something pruned


@pytest.mark.skipif(not ONNX, reason="onnx, onnxscript and onnxruntime are needed (pip install -e .[test])")
def test_onnx_and_torch_export_match_pytorch_on_inputs_with_different_masks(tmp_path):
    model, plan = model_and_plan()
    x = probe(6, 16)
    res = export_model(model, tmp_path, plan, return_active=True, verify_inputs=x)
    assert {"pt2", "onnx", "info"} <= set(res.paths)
    assert res.max_abs_diff["onnx"] <= LOGIT_TOL and res.max_abs_diff["pt2"] <= 1e-6
    for op in ("ReduceMean", "ReduceMax", "Sqrt", "Greater", "TopK", "ScatterElements", "Mul"):
        assert op in res.onnx_ops, op  # the mask computation is in the graph, data-dependent
    wrapper = DynamicExport(model, plan, return_active=True)
    for n in (1, 3):  # the batch dimension is dynamic
        xb = probe(n, 16, seed=n)
        with torch.no_grad():
            logits, active = wrapper(xb)
        o_logits, o_active = run_onnx(res.paths["onnx"], xb)
        assert o_logits.shape == (n, 10) and (o_logits - logits).abs().max() <= LOGIT_TOL
        assert torch.equal(o_active.long(), active)
        p_logits, p_active = load_program(res.paths["pt2"]).module()(xb)
        assert (p_logits - logits).abs().max() <= 1e-6 and torch.equal(p_active, active)
    wrapper.remove()
    assert not model._forward_pre_hooks and all(not m._forward_pre_hooks for m in model.modules())


def test_portable_artifacts_round_trip_and_name_what_differs(tmp_path):
    model, plan = model_and_plan(32)
    paths = save_portable(tmp_path, model, plan, {"model_name": "tiny_resnet", "num_classes": 10})
    assert paths["weights"].name == "model.safetensors" and paths["plan"].name == "plan.json"
    torch.manual_seed(1)
    other_init = build_model("tiny_resnet", 10)
    loaded = load_portable(other_init, paths["weights"], paths["plan"])
    assert loaded.plan == plan and loaded.meta["plan_fingerprint"] == plan.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other_init.state_dict().values(),
                                                 strict=True))
    with pytest.raises(CheckpointError, match="mis-shaped keys") as info:  # weights of a narrower network
        load_portable(tiny_resnet(10, width=8), paths["weights"], paths["plan"])
    assert "\n" not in str(info.value)
    foreign = make_plan(build_model("resnet20", 10), 32, name="resnet20")
    with pytest.raises(PlanMismatchError, match="plan was made for model 'resnet20'") as info:
        load_portable(build_model("tiny_resnet", 10), paths["weights"], foreign)
    assert "points missing in the model" in str(info.value) and "\n" not in str(info.value)
    subset = make_plan(model, 32, include=["layer1.*"])
    with pytest.raises(PlanMismatchError, match="other prune points"):
        load_portable(build_model("tiny_resnet", 10), paths["weights"], subset)


@pytest.mark.skipif(not ONNX, reason="onnx, onnxscript and onnxruntime are needed (pip install -e .[test])")
def test_cli_export_writes_everything_and_rejects_a_plan_for_another_model(tmp_path, capsys):
    model, plan = model_and_plan(32)
    save_portable(tmp_path / "src", model, plan, {"model_name": "tiny_resnet", "num_classes": 10})
    out = tmp_path / "export"
    code = main(["export", "--model", "tiny_resnet", "--checkpoint", str(tmp_path / "src" / "model.safetensors"),
                 "--plan", str(tmp_path / "src" / "plan.json"), "--output-dir", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    for f in ("model.pt2", "model.onnx", "model.safetensors", "plan.json", "export.json", "config.yaml"):
        assert (out / f).is_file(), f
    assert "onnx: max |difference|" in text
    x = probe(4, 32)
    with torch.no_grad():
        w = DynamicExport(model, plan)
        expected = w(x)
        w.remove()
    assert (run_onnx(out / "model.onnx", x)[0] - expected).abs().max() <= LOGIT_TOL
    foreign = make_plan(build_model("resnet20", 10), 32, name="resnet20")
    foreign.save(tmp_path / "foreign.json")
    code = main(["export", "--model", "tiny_resnet", "--plan", str(tmp_path / "foreign.json"),
                 "--output-dir", str(tmp_path / "bad"), "--format", "pt2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "plan was made for model 'resnet20'" in err
