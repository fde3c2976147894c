"""A narrow VGG-19 with batch norm for 28-32 pixel images, in the layout of torchvision's ``vgg19_bn``.

BackdoorBench's ``vgg19_bn`` is torchvision's: 16 conv-BN-ReLU layers in five stages of
64/128/256/512/512 channels, each stage ended by a 2x2 max pool (all in ``features``), then
``avgpool`` (adaptive, to 7x7) and a ``classifier`` of 7*7*512 -> 4096 -> 4096 -> classes. On a
32-pixel image the last pool gives 1x1, which torchvision's avgpool copies 49 times into 25,088
features. :class:`VGG` keeps the module names (``features.N``, ``avgpool``, ``classifier.N``) and
the layer sequence, and differs, for CPU budgets, in three places:

- every width is divided by ``width_divisor`` (8 gives stages of 8/16/32/64/64 channels);
- the pools use ``ceil_mode=True``, so five of them take 28 pixels to 1x1 (28-14-7-4-2-1) as
  they take 32 to 1x1; with torchvision's floor the fifth pool of a 28-pixel image would be empty;
- ``avgpool`` pools to 1x1 and the head is ``classifier`` = Linear(C, 4096 / d) - ReLU - Dropout -
  Linear - ReLU - Dropout - Linear(classes) on those C features, not on 49 copies of them.

So its state dict is not BackdoorBench's ``vgg19_bn`` (which it cannot load); it is registered
under names of its own (``vgg19_bn_w8``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["VGG", "VGG19_CONFIG"]

# torchvision's configuration "E" (VGG-19): output channels of each conv, "M" for a 2x2 max pool.
VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """VGG with batch norm, narrowed by ``width_divisor``, with a small head for small images.

    Args:
        num_classes: Output classes.
        width_divisor: Divides every channel count of ``config`` and the head's 4096 hidden units.
        config: Conv output channels and ``"M"`` (max pool), torchvision's layout.
        in_chans: Input channels (3 keeps BackdoorBench's stem; grey data is repeated to three).
        dropout: Dropout probability in the head (torchvision's 0.5).
    """

    def __init__(
        self,
        num_classes: int = 10,
        width_divisor: int = 8,
        config: Sequence[int | str] = VGG19_CONFIG,
        in_chans: int = 3,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                out = max(1, int(item) // width_divisor)
                layers += [
                    nn.Conv2d(channels, out, kernel_size=3, padding=1),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                ]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        hidden = max(1, 4096 // width_divisor)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
