from __future__ import annotations

import copy
import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from instaprune.core.config import IMAGENET_MEAN, IMAGENET_STD
from instaprune.core.errors import ConfigError, ModelError
from instaprune.models import CIFAR_MODELS, build_model, default_preprocessing, is_cifar_model, list_models
from instaprune.models.cifar_resnet import PadShortcut, resnet20

SHARED = Path(__file__).resolve().parents[2] / "shared"
RESNET20 = SHARED / "models" / "resnet20-cifar10.th"

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "resnext50_32x4d", "densenet121", "efficientnet_b0",
               "mobilenet_v3_small", "vgg11_bn"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def _skip_if_missing(name: str) -> None:
    if name == "tiny_resnet" and importlib.util.find_spec("instaprune.models.tiny_resnet") is None:
        pytest.skip("instaprune.models.tiny_resnet is not written yet")


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_cifar_models_forward(name: str) -> None:
    _skip_if_missing(name)
    for classes in (None, 7):
        model = build_model(name, classes).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 10 if classes is None else classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_forward(name: str) -> None:
    model = build_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 5)


def test_torchvision_default_head_has_1000_classes() -> None:
    model = build_model("resnet18").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("depth,params", [(20, 269_722), (56, 853_018)])
def test_cifar_resnet_parameter_count_matches_paper(depth: int, params: int) -> None:
    model = build_model(f"resnet{depth}")
    assert sum(p.numel() for p in model.parameters()) == params
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1  # 6n convs in blocks + the stem; option A adds no shortcut convs


def test_resnet_names_match_public_checkpoint_layout() -> None:
    keys = set(resnet20().state_dict())
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
              "layer2.0.conv1.weight", "layer3.2.conv2.weight", "linear.weight", "linear.bias"):
        assert k in keys
    assert not any("shortcut" in k for k in keys)  # parameter-free shortcuts
    if RESNET20.is_file():
        state = torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"]
        public = {k.removeprefix("module.") for k in state}
        assert public == {k for k in keys if not k.endswith("num_batches_tracked")}


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    sc = PadShortcut(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])  # planes // 4 = 8 zero channels on each side
    assert not y[:, :8].any() and not y[:, 24:].any()
    assert list(sc.parameters()) == []
    model = resnet20()
    assert isinstance(model.layer2[0].shortcut, PadShortcut)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)


def test_models_pickle_and_deepcopy() -> None:
    model = resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    clone = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
        assert torch.equal(copy.deepcopy(model)(x), model(x))


def test_vgg16_bn_layout() -> None:
    model = build_model("vgg16_bn_cifar", 100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == len(bns) == 13 and len(pools) == 5
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 100)


def test_unknown_model_raises_model_error_with_suggestion() -> None:
    with pytest.raises(ModelError) as exc:
        build_model("resnet_20")
    msg = str(exc.value)
    assert "resnet20" in msg and "\n" not in msg
    with pytest.raises(ModelError):
        build_model("no-such-net")
    with pytest.raises(ModelError):
        default_preprocessing("no-such-net")


def test_bad_num_classes() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError):
            build_model("resnet20", bad)  # type: ignore[arg-type]


def test_list_models_and_is_cifar() -> None:
    names = list_models()
    assert names[: len(CIFAR_MODELS)] == list(CIFAR_MODELS)
    assert {"resnet50", "mobilenet_v2", "vgg11_bn"} <= set(names)
    assert len(names) == len(set(names))
    assert not any(n.startswith(("fasterrcnn", "deeplabv3", "r3d_", "raft")) for n in names)
    assert is_cifar_model("resnet20") and is_cifar_model("ResNet56 ") and is_cifar_model("vgg16_bn_cifar")
    assert not is_cifar_model("resnet18") and not is_cifar_model("whatever")


def test_default_preprocessing() -> None:
    cifar = default_preprocessing("resnet20")
    assert cifar.input_size == 32 and cifar.resize is None
    assert cifar.mean == IMAGENET_MEAN and cifar.std == IMAGENET_STD
    tv = default_preprocessing("resnet50")
    assert (tv.input_size, tv.resize) == (224, 256)
    assert tv.mean == pytest.approx(IMAGENET_MEAN) and tv.std == pytest.approx(IMAGENET_STD)
    assert default_preprocessing("inception_v3").input_size == 299


def test_import_is_cheap() -> None:
    code = ("import sys, instaprune.models, instaprune.training.checkpoint; "
            "print(any(m.startswith('torchvision') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
