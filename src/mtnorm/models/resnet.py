"""ResNet-18 and ResNet-50 defined in-repo (no torchvision needed), dilated to output stride 8.

Layer names follow torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ...), so
a user-provided torchvision ``resnet18`` / ``resnet50`` state dict loads with ``load_state_dict``
(``model.checkpoint`` in a config; drop its ``fc.*`` keys); nothing is ever downloaded.

Dilation follows the DeepLab practice of LibMTL's ``ResnetDilated`` (and torchvision's
``replace_stride_with_dilation`` for ResNet-50): layer3 and layer4 drop their stride; the 3x3
convolution that had the stride gets half the layer's dilation (1 in layer3, 2 in layer4), every other 3x3
convolution of the layer gets the full dilation (2 in layer3, 4 in layer4). The 1x1 downsampling keeps
stride 1 there. Padding equals dilation, so the output is 1/8 of the input resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from mtnorm.models.factory import norm_layer


def _conv3x3(cin: int, cout: int, stride: int, dilation: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


def _downsample(cin: int, cout: int, stride: int, norm: str) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (the first strided), each followed by a norm; residual add (ResNet-18/34).

    ``first_dilation`` is the first convolution's dilation (the one that carries the stride in an
    undilated network), ``dilation`` the second's.
    """

    expansion = 1

    def __init__(
        self, cin: int, width: int, stride: int, dilation: int, norm: str, first_dilation: int | None = None
    ) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv3x3(cin, width, stride, first_dilation or dilation)
        self.bn1 = norm_layer(norm, width)
        self.conv2 = _conv3x3(width, cout, 1, dilation)
        self.bn2 = norm_layer(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided or dilated), 1x1 expand, each followed by a norm; residual add.

    ``first_dilation`` (default ``dilation``) is the 3x3 convolution's dilation: the block's only 3x3.
    """

    expansion = 4

    def __init__(
        self, cin: int, width: int, stride: int, dilation: int, norm: str, first_dilation: int | None = None
    ) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = norm_layer(norm, width)
        self.conv2 = _conv3x3(width, width, stride, first_dilation or dilation)
        self.bn2 = norm_layer(norm, width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = norm_layer(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


DILATED_PLAN = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))
"""(width, stride, dilation) of layer1..layer4 at output stride 8."""

PLAN = ((64, 1, 1), (128, 2, 1), (256, 2, 1), (512, 2, 1))
"""(width, stride, dilation) of layer1..layer4 at output stride 32 (the classification network)."""


class _ResNet(nn.Module):
    """The trunk shared by :class:`ResNet18` and :class:`ResNet50`: stem, then layer1..layer4."""

    block: type[BasicBlock] | type[Bottleneck]

    def __init__(self, in_channels: int, norm: str, blocks: tuple[int, ...], dilated: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = norm_layer(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        plan = DILATED_PLAN if dilated else PLAN
        for i, ((width, stride, dilation), count) in enumerate(zip(plan, blocks, strict=True), start=1):
            layers = []
            for b in range(count):
                # the convolution that lost its stride to dilation gets half the layer's dilation
                first = max(dilation // 2, 1) if b == 0 else dilation
                layers.append(self.block(cin, width, stride if b == 0 else 1, dilation, norm, first))
                cin = width * self.block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.out_channels = cin
        self.output_stride = 8 if dilated else 32

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


class ResNet50(_ResNet):
    """ResNet-50 trunk without the classifier; layer3/4 dilated (2, 4) so the output stride is 8.

    ``forward`` returns the 2048-channel feature map at 1/8 of the input resolution
    (``dilated=False``: the classification trunk, 1/32).
    """

    block = Bottleneck

    def __init__(
        self,
        in_channels: int = 3,
        norm: str = "bn",
        blocks: tuple[int, ...] = (3, 4, 6, 3),
        dilated: bool = True,
    ) -> None:
        super().__init__(in_channels, norm, blocks, dilated)


class ResNet18(_ResNet):
    """ResNet-18 trunk (BasicBlocks, 2-2-2-2) without the classifier.

    ``dilated=True`` (default): layer3/4 dilated as for :class:`ResNet50`, a 512-channel map at 1/8 of
    the input resolution (DeepLabV3 heads); ``dilated=False``: the classification trunk, 1/32.
    11,176,512 parameters, torchvision's ``resnet18`` without its ``fc``.
    """

    block = BasicBlock

    def __init__(
        self,
        in_channels: int = 3,
        norm: str = "bn",
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        dilated: bool = True,
    ) -> None:
        super().__init__(in_channels, norm, blocks, dilated)
