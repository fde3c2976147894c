"""Pre-activation ResNet-18, with the module names and parameter shapes of BackdoorBench's ``preactresnet18``.

He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016). BackdoorBench's
version (``models/preact_resnet.py``, itself from the WaNet release) has a 3x3 stem with
no pooling, four stages of two ``PreActBlock``s, an adaptive average pool and a
``linear`` head; a block's projection shortcut is ``shortcut.0``. Written here from
that description so that its ``state_dict`` loads BackdoorBench records key for key.
``width`` (64 in BackdoorBench) scales every stage, for models small enough to train
on a CPU; only ``width=64, in_chans=3`` is BackdoorBench's model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PreActBlock", "PreActResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice, plus the identity (or a 1x1 projection when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """A pre-activation ResNet for small images.

    Args:
        num_blocks: Blocks per stage (``(2, 2, 2, 2)`` is ResNet-18).
        num_classes: Output classes.
        width: Channels of the first stage; later stages double it.
        in_chans: Input channels.
    """

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: int = 64,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = width
        for stage, blocks in enumerate(num_blocks):
            planes = width * 2**stage
            strides = [1 if stage == 0 else 2] + [1] * (blocks - 1)
            layer = []
            for stride in strides:
                layer.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))
