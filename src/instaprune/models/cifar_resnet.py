"""CIFAR ResNets of He et al. (2016), section 4.2: depth ``6n + 2`` (20, 32, 44, 56, 110).

Layout: ``conv3x3(3->16)-BN-ReLU`` -> three stages of ``n`` :class:`BasicBlock` with 16 / 32 / 64 channels and
strides 1 / 2 / 2 -> global average pool -> ``Linear(64, num_classes)``. Shortcuts are the paper's *option A*:
parameter-free, spatial subsampling ``x[:, :, ::2, ::2]`` plus zero channels padded equally on both sides
(:class:`PadShortcut`), so the network has exactly the parameters of the paper (0.27M for ResNet-20).

Module and parameter names (``conv1``, ``bn1``, ``layerK.J.{conv1,bn1,conv2,bn2}``, ``linear``) are those
of the widely used public CIFAR-10 checkpoints (``{"state_dict": {"module.conv1.weight": ...},
"best_prec1": ...}``), which :func:`instaprune.checkpoint.load_weights` loads directly. Every block has a
submodule named ``shortcut`` (``nn.Identity`` when the shape is unchanged) so prune-point patterns such as
``*shortcut*`` apply uniformly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from instaprune.core.errors import ConfigError

__all__ = ["PadShortcut", "BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56",
           "resnet110"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad ``out - in`` channels (half on each side).

    For the usual doubling of width this pads ``planes // 4`` channels on each side, as in the paper."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ConfigError(f"option-A shortcut cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        lo = extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, extra - lo)) if extra else x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convs."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = PadShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (works on any size thanks to the global average pool)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), "
                              f"got {depth}")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, num_classes)
