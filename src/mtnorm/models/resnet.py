"""ResNet-50 defined in-repo (no torchvision needed), dilated to output stride 8 for DeepLabV3.

Layer names follow torchvision's, so a user-provided torchvision ``resnet50`` state dict loads
with ``load_state_dict`` (``model.checkpoint`` in a config); nothing is ever downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from mtnorm.models.factory import norm_layer


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided or dilated), 1x1 expand, each followed by a norm; residual add."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, dilation: int, norm: str) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = norm_layer(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(norm, width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = norm_layer(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """ResNet-50 trunk without the classifier; layer3/4 dilated (2, 4) so the output stride is 8.

    ``forward`` returns the 2048-channel feature map at 1/8 of the input resolution.
    """

    def __init__(
        self, in_channels: int = 3, norm: str = "bn", blocks: tuple[int, ...] = (3, 4, 6, 3)
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        plan = [(64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4)]  # (width, stride, dilation)
        for i, ((width, stride, dilation), count) in enumerate(zip(plan, blocks), start=1):
            layers = []
            for b in range(count):
                layers.append(Bottleneck(cin, width, stride if b == 0 else 1, dilation, norm))
                cin = width * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.out_channels = cin

    def stages(self) -> list:
        """Stem (conv, norm, ReLU, max-pool), then layer1..layer4: five stages for :mod:`mtnorm.arch`."""

        def stem(x: torch.Tensor, carry: dict) -> torch.Tensor:
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))

        def layer(module: nn.Module):
            return lambda x, carry: module(x)

        return [stem, *(layer(getattr(self, f"layer{i}")) for i in range(1, 5))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
