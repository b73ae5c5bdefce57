"""The CIFAR ResNets of He et al. 2016 (section 4.2): ``resnet20``, ``resnet32``, ``resnet56``,
``resnet110`` (depth 6n + 2 with n = 3, 5, 9, 18).

A 3x3 stem conv with 16 channels, BN and ReLU (no max-pool); three stages ``layer1``..``layer3``
of n torchvision ``BasicBlock`` s at 16, 32 and 64 planes, stride 2 in the first block of
``layer2`` and ``layer3``; global average pooling and a linear classifier. The module layout
(``conv1``, ``bn1``, ``layerS.i.conv1/bn1/conv2/bn2/downsample``, ``fc``) is torchvision's, so
the ResNet adapter handles these models and torchvision's ResNet-18/34 alike.

Shortcut at a width/resolution change: a 1x1 stride-2 conv + BN (the paper's *option B*), not
option A's zero-padded identity. A module shortcut has weights that slicing a stage's planes
co-slices (its output channels are the stage's planes, its input channels the previous
stage's), exactly as in torchvision's ResNets; option A's padding has no weights to slice and
would tie the stage's first channels to the previous stage's. Compared with the option-A
figures usually quoted (ResNet-56: 0.85M parameters, 125.5M MACs at 32x32), option B adds the
two shortcuts, at every depth: (16*32 + 2*32) + (32*64 + 2*64) = 2,752 parameters and
16*32*16*16 + 32*64*8*8 = 262,144 MACs.

There are no ImageNet weights for these models: they train from scratch.

Example:
    >>> model = cifar_resnet("resnet56", num_classes=10)
    >>> [len(model.layer1), len(model.layer2), len(model.layer3)]
    [9, 9, 9]
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3

BLOCKS_PER_STAGE = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}
"""Model name -> n, the BasicBlocks in each of the three stages."""
PLANES = (16, 32, 64)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet with ``blocks`` BasicBlocks per stage and option-B shortcuts."""

    def __init__(self, blocks: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, PLANES[0])
        self.bn1 = nn.BatchNorm2d(PLANES[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(PLANES[0], PLANES[0], blocks, stride=1)
        self.layer2 = _stage(PLANES[0], PLANES[1], blocks, stride=2)
        self.layer3 = _stage(PLANES[1], PLANES[2], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(PLANES[2], num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation (He et al.'s)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks; the first one strides and, when the width or resolution changes,
    has a 1x1 conv + BN shortcut (option B)."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def cifar_resnet(name: str, num_classes: int) -> CifarResNet:
    """``resnet20`` / ``resnet32`` / ``resnet56`` / ``resnet110`` with fresh weights."""
    return CifarResNet(BLOCKS_PER_STAGE[name], num_classes)
