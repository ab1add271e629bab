"""A small CIFAR-style residual CNN for the built-in demo (and tests).

Layout: stem ``conv3x3-BN-ReLU`` -> three stages of :class:`BasicBlock` with widths ``w, 2w, 4w`` and strides
``1, 2, 2`` -> global average pool -> ``Linear``. Shortcuts that change shape are a projection (``1x1 conv + BN``,
``shortcut="B"``, default) or the parameter-free zero-padding of the original CIFAR ResNet (``shortcut="A"``).
Every block's shortcut module is named ``shortcut`` (an ``nn.Identity`` when shapes match), so prune-point
patterns such as ``*.shortcut.*`` work. Plain ``nn.Module``s only; Kaiming-normal init (fan_out, ReLU) for
convs, ``BN(1, 0)``, ``Linear`` with PyTorch's default init and a zero bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from instaprune.core.errors import ConfigError

__all__ = ["BasicBlock", "PadShortcut", "TinyResNet", "tiny_resnet"]


class PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling by ``stride`` and zero-padding of the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, blocks: Sequence[int] = (1, 1, 1),
                 shortcut: str = "B", in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1 or width < 1 or in_channels < 1:
            raise ConfigError(f"tiny_resnet: num_classes, width and in_channels must be >= 1, got "
                              f"{num_classes}, {width}, {in_channels}")
        if len(blocks) != 3 or any(int(b) < 1 for b in blocks):
            raise ConfigError(f"tiny_resnet: blocks must be three counts >= 1, got {tuple(blocks)}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"tiny_resnet: shortcut must be 'A' (zero-pad) or 'B' (projection), got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages: list[nn.Module] = []
        cin = width
        for i, (n, stride) in enumerate(zip(blocks, (1, 2, 2), strict=True)):
            cout = width * 2**i
            layers = []
            for j in range(int(n)):
                layers.append(BasicBlock(cin, cout, stride if j == 0 else 1, shortcut))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_resnet(num_classes: int = 10, width: int = 16, blocks: Sequence[int] = (1, 1, 1),
                shortcut: str = "B") -> TinyResNet:
    """A CIFAR-style residual CNN: widths ``w, 2w, 4w``, ``blocks[i]`` BasicBlocks per stage (1 or 2 each)."""
    return TinyResNet(num_classes=num_classes, width=width, blocks=blocks, shortcut=shortcut)
