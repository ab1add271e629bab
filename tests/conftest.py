from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_TEST = SHARED / "data" / "cifar10-test-jpeg"
RESNET20 = SHARED / "models" / "resnet20-cifar10.th"


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
