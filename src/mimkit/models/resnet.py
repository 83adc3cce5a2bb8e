"""CIFAR ResNet-18 for class-incremental classification: 3x3 stem, no max-pool, widths nf, 2nf, 4nf, 8nf.

    resnet18_cifar(nf=64)   # Mammoth's `resnet18` (11.2M parameters with a 10-class head)
    resnet18_cifar(nf=20)   # the slim ResNet-18 of GEM (Lopez-Paz & Ranzato 2017) and Avalanche's SlimResNet18

The backbone ends at global average pooling: `forward(imgs (N, C, H, W)) -> features (N, 8 * nf)`; the
classifier over the classes seen so far lives outside (mimkit.tasks.incremental.model.IncrementalClassifier).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKBONES = {"resnet18": 64, "slim_resnet18": 20}  # name -> nf


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual; a 1x1 conv-BN shortcut when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_planes, H, W) -> (N, planes, H / stride, W / stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool) and 4 stages of BasicBlocks."""

    def __init__(self, num_blocks: tuple[int, ...] = (2, 2, 2, 2), nf: int = 64, in_chans: int = 3) -> None:
        super().__init__()
        self.nf = nf
        self.in_planes = nf
        self.conv1 = nn.Conv2d(in_chans, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.layer1 = self._make_layer(nf, num_blocks[0], 1)
        self.layer2 = self._make_layer(nf * 2, num_blocks[1], 2)
        self.layer3 = self._make_layer(nf * 4, num_blocks[2], 2)
        self.layer4 = self._make_layer(nf * 8, num_blocks[3], 2)
        self.feat_dim = nf * 8 * BasicBlock.expansion

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W) -> globally average-pooled features (N, 8 * nf)."""
        out = F.relu(self.bn1(self.conv1(imgs)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def resnet18_cifar(nf: int = 64, in_chans: int = 3) -> CifarResNet:
    """ResNet-18 (2, 2, 2, 2 BasicBlocks) with the CIFAR stem; nf=64 as Mammoth, nf=20 as GEM / Avalanche."""
    return CifarResNet((2, 2, 2, 2), nf, in_chans)
