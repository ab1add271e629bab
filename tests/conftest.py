from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_TEST = SHARED / "data" / "cifar10-test-jpeg"
RESNET20 = SHARED / "models" / "resnet20-cifar10.th"
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_module(name: str):
    """A benchmark module by file path, as ``python benchmarks/<script>.py`` would import it (no sys.path edit;
    its sibling imports such as ``_common`` resolve once the sibling was loaded this way first)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


def require_shared() -> None:
    if not CIFAR_TEST.is_dir() or not RESNET20.is_file():
        pytest.skip(f"shared data not found at {SHARED} (CI provides ../shared next to the repo)")


def tiny_cnn() -> torch.nn.Module:
    """A small CNN with plain, strided, depthwise, pointwise convs and a linear head."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 24, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    ).eval()


def assert_clean_error(code, err, *needles):
    """The CLI's bad-input contract: exit 2, one line on stderr starting ``instaprune: error:``, no traceback."""
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("instaprune: error:") and "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An ImageFolder of 3 classes x 12 random 32x32 PNGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(12):
            arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"class{c}" / f"{i}.png")
    return root


def random_channel_masks(units, n: int, keep, gen: torch.Generator, floor) -> dict[str, torch.Tensor]:
    """Per-image keep masks for ``units`` ((name, channels) pairs): ``floor`` (only ``floor(C)`` kept), a ratio
    (the same count for every image), ``mixed`` (a count drawn per image from [floor, all]) or 1.0; the channels
    are drawn independently per image."""
    out = {}
    for name, c in units:
        lo = floor(c)
        if keep == "floor":
            ks = [lo] * n
        elif keep == "mixed":
            ks = torch.randint(lo, c + 1, (n,), generator=gen).tolist()
        else:
            ks = [max(lo, round(float(keep) * c))] * n
        m = torch.zeros(n, c, dtype=torch.bool)
        for i, k in enumerate(ks):
            m[i, torch.randperm(c, generator=gen)[:k]] = True
        out[name] = m
    return out


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Eval mode with random running statistics and affine parameters, so BN folding and channel slicing are
    really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()

