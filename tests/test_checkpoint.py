from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path

import pytest
import torch

from instaprune.core.config import Preprocessing
from instaprune.core.errors import CheckpointError
from instaprune.models import build_model, default_preprocessing
from instaprune.training.checkpoint import load_weights, read_meta, save_checkpoint, save_safetensors

SHARED = Path(__file__).resolve().parents[2] / "shared"
RESNET20 = SHARED / "models" / "resnet20-cifar10.th"
CIFAR_TEST = SHARED / "data" / "cifar10-test-jpeg"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _meta() -> dict:
    pre = Preprocessing(input_size=32, class_names=("cat", "dog"))
    return {"model_name": "resnet20", "num_classes": 10, "preprocessing": pre.to_dict(),
            "notes": {"lam": 0.1, "epochs": [1, 2]}, "flag": None}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _trained_like(name: str = "resnet20", classes: int = 10, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, classes)
    for m in model.modules():  # non-default BN statistics so buffers are checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model


def _public(model: torch.nn.Module, path: Path) -> Path:
    """Write ``model`` in the public CIFAR format: DataParallel prefix, no BN counters, extra scalars."""
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"best_prec1": 91.5, "state_dict": sd}, path)
    return path


def test_instaprune_checkpoint_round_trip(tmp_path: Path) -> None:
    src = _trained_like()
    path = save_checkpoint(tmp_path / "sub" / "model.pt", src, _meta())
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "instaprune-checkpoint" and raw["version"] == 1
    dst = build_model("resnet20")
    assert load_weights(dst, path) == _meta()
    _assert_same_weights(src, dst)
    assert read_meta(path) == _meta()
    assert Preprocessing.from_dict(read_meta(path)["preprocessing"]).class_names == ("cat", "dog")


def test_meta_objects_become_plain_data(tmp_path: Path) -> None:
    pre = default_preprocessing("resnet20")
    meta_in = {"preprocessing": pre, "out": tmp_path}
    path = save_checkpoint(tmp_path / "m.pt", build_model("resnet20"), meta_in)
    meta = read_meta(path)
    assert Preprocessing.from_dict(meta["preprocessing"]) == pre
    assert meta["out"] == str(tmp_path)
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "bad.pt", build_model("resnet20"), {"x": object()})


def test_safetensors_round_trip(tmp_path: Path) -> None:
    src = _trained_like("vgg16_bn_cifar", 5)
    path = save_safetensors(tmp_path / "model.safetensors", src, _meta())
    assert read_meta(path) == _meta()
    dst = build_model("vgg16_bn_cifar", 5)
    assert load_weights(dst, path) == _meta()
    _assert_same_weights(src, dst)
    # detected by content too, whatever the suffix
    os.replace(path, tmp_path / "model.bin")
    assert load_weights(build_model("vgg16_bn_cifar", 5), tmp_path / "model.bin") == _meta()


def test_public_format_and_plain_state_dict(tmp_path: Path) -> None:
    src = _trained_like()
    dst = build_model("resnet20")
    meta = load_weights(dst, _public(src, tmp_path / "public.th"))
    assert meta == {"best_prec1": 91.5}
    sa, sb = src.state_dict(), dst.state_dict()
    for k in sa:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(sa[k], sb[k]), k
    torch.save(collections.OrderedDict(src.state_dict()), tmp_path / "plain.pt")
    dst2 = build_model("resnet20")
    assert load_weights(dst2, tmp_path / "plain.pt") == {}
    _assert_same_weights(src, dst2)


def test_training_checkpoint_with_optimizer_state_loads(tmp_path: Path) -> None:
    src = _trained_like()
    opt = torch.optim.SGD(src.parameters(), lr=0.1, momentum=0.9)
    src(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    torch.save({"format": "instaprune-checkpoint", "version": 1, "model": src.state_dict(), "meta": {"a": 1},
                "optimizer": opt.state_dict(), "epoch": 3, "history": [{"epoch": 1}]}, tmp_path / "ck.pt")
    dst = build_model("resnet20")
    assert load_weights(dst, tmp_path / "ck.pt") == {"a": 1}
    _assert_same_weights(src, dst)


def test_missing_keys_named(tmp_path: Path) -> None:
    path = _public(_trained_like("resnet20"), tmp_path / "r20.th")
    with pytest.raises(CheckpointError) as exc:
        load_weights(build_model("resnet56"), path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    assert "missing keys: layer1.3.conv1.weight" in msg and "more)" in msg
    assert "unexpected" not in msg and "mis-shaped" not in msg


def test_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "r20.pt", _trained_like("resnet20", 10), {})
    with pytest.raises(CheckpointError) as exc:
        load_weights(build_model("resnet20", 100), path)
    msg = str(exc.value)
    assert "2 mis-shaped keys" in msg and "linear.weight checkpoint (10, 64) vs model (100, 64)" in msg
    assert "(10,)" in msg and "(100,)" in msg and "\n" not in msg
    sd = _trained_like().state_dict()
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: extra\.weight"):
        load_weights(build_model("resnet20"), tmp_path / "extra.pt")


def test_mismatch_lists_are_truncated(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "vgg.pt", _trained_like("vgg16_bn_cifar"), {})
    with pytest.raises(CheckpointError) as exc:
        load_weights(build_model("resnet20"), path)
    msg = str(exc.value)
    assert "(+" in msg and "more)" in msg and "no key in common" in msg and "\n" not in msg


def test_non_strict_loads_matching_keys(tmp_path: Path) -> None:
    src = _trained_like("resnet20", 10)
    path = save_checkpoint(tmp_path / "r20.pt", src, {"k": "v"})
    dst = build_model("resnet20", 100)
    head = dst.linear.weight.detach().clone()
    assert load_weights(dst, path, strict=False) == {"k": "v"}
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    assert torch.equal(dst.linear.weight, head)  # mis-shaped: model keeps its own


@pytest.mark.parametrize("kind", ["random", "truncated", "truncated_safetensors", "empty"])
def test_corrupt_files(tmp_path: Path, kind: str) -> None:
    model = build_model("resnet20")
    if kind == "random":
        path = tmp_path / "bad.pt"
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "empty":
        path = tmp_path / "empty.pt"
        path.write_bytes(b"")
    else:
        st = kind.endswith("safetensors")
        good = tmp_path / ("good.safetensors" if st else "good.pt")
        (save_safetensors if st else save_checkpoint)(good, model, {})
        path = tmp_path / ("cut.safetensors" if st else "cut.pt")
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as exc:
        load_weights(model, path)
    msg = str(exc.value)
    assert msg.startswith(f"cannot read checkpoint {path}: ") and "\n" not in msg
    with pytest.raises(CheckpointError):
        read_meta(path)


def test_other_errors(tmp_path: Path) -> None:
    model = build_model("resnet20")
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(model, tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        read_meta(tmp_path)
    v2 = {"format": "instaprune-checkpoint", "version": 2, "model": model.state_dict()}
    torch.save(v2, tmp_path / "v2.pt")
    with pytest.raises(CheckpointError, match="version 2"):
        load_weights(model, tmp_path / "v2.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nostate.pt")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_weights(model, tmp_path / "nostate.pt")
    torch.save({"state_dict": model.state_dict(), "cfg": argparse.Namespace(a=1)}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="weights_only"):  # arbitrary pickled objects are refused
        load_weights(model, tmp_path / "obj.pt")
    (tmp_path / "meta.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_meta(tmp_path / "meta.safetensors")


def _require_shared() -> None:
    if not RESNET20.is_file() or not CIFAR_TEST.is_dir():
        pytest.skip(f"shared checkpoint/data not found at {SHARED} (a `shared` folder next to the repo)")


def test_public_resnet20_checkpoint_loads_and_is_accurate() -> None:
    _require_shared()
    from torchvision import datasets, transforms

    model = build_model("resnet20")
    missing, unexpected = model.load_state_dict(
        {k.removeprefix("module."): v for k, v in
         torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"].items()}, strict=False)
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)
    model = build_model("resnet20")
    meta = load_weights(model, RESNET20)  # strict: zero missing / unexpected keys
    assert meta["best_prec1"] == pytest.approx(91.78, abs=0.01)
    model.eval()
    pre = default_preprocessing("resnet20")
    ds = datasets.ImageFolder(str(CIFAR_TEST), transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)]))
    assert ds.classes == sorted(ds.classes) and len(ds.classes) == 10
    # the first 50 images of every class (500 in all): the first 500 of the folder would all be airplanes
    per_class: dict[int, list[int]] = {}
    for i, (_, y) in enumerate(ds.samples):
        if len(per_class.setdefault(y, [])) < 50:
            per_class[y].append(i)
    idx = [i for v in per_class.values() for i in v]
    assert len(idx) == 500
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=250)
    correct = 0
    with torch.inference_mode():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    assert correct / len(idx) > 0.7, correct / len(idx)


def test_public_checkpoint_meta_readable_without_model() -> None:
    _require_shared()
    meta = read_meta(RESNET20)
    assert set(meta) == {"best_prec1"} and json.dumps(meta)
