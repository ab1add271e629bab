"""VGG-16 with BatchNorm for 32x32 inputs (the common CIFAR variant).

``features``: thirteen ``conv3x3-BN-ReLU`` layers in five groups, each group closed by a 2x2 max pool
(cfg ``64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M``), so a 32x32 image ends as 512x1x1;
then ``flatten`` and one ``classifier = Linear(512, num_classes)``. Inputs must be 32x32 (the classifier
expects exactly 512 features). ReLUs are not in-place so hooks that keep a conv's input never see it change.
Init: Kaiming-normal (fan_out, ReLU) convs, ``BN(1, 0)``, classifier ``N(0, 0.01)`` with zero bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from instaprune.core.errors import ConfigError

__all__ = ["VGG16_CFG", "CifarVGG", "vgg16_bn_cifar"]

VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                    512, 512, 512, "M", 512, 512, 512, "M")


class CifarVGG(nn.Module):
    def __init__(self, cfg: Sequence[int | str] = VGG16_CFG, num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg16_bn_cifar(num_classes: int = 10) -> CifarVGG:
    return CifarVGG(VGG16_CFG, num_classes)
