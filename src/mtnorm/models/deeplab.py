"""DeepLabV3 task heads (ASPP) as in LibMTL's NYUv2/Cityscapes protocol, and the CelebA CNN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtnorm.models.factory import norm_layer


class ASPPHead(nn.Module):
    """ASPP (rates 12, 24, 36), a 3x3 conv, a 1x1 classifier, upsampled by ``upsample``.

    Heads are task-specific by construction, so their BatchNorms are plain ones (methods convert
    only the shared encoder).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid: int = 256,
        rates: tuple[int, ...] = (12, 24, 36),
        upsample: int = 8,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        branches = [
            nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), norm_layer("bn", mid), nn.ReLU())
        ]
        for r in rates:
            branches.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, mid, 3, padding=r, dilation=r, bias=False),
                    norm_layer("bn", mid),
                    nn.ReLU(),
                )
            )
        self.branches = nn.ModuleList(branches)
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, mid, 1, bias=False), nn.ReLU()
        )
        self.project = nn.Sequential(
            nn.Conv2d(mid * (len(rates) + 2), mid, 1, bias=False),
            norm_layer("bn", mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            norm_layer("bn", mid),
            nn.ReLU(),
            nn.Conv2d(mid, out_channels, 1),
        )
        self.upsample = upsample
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        y = self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))
        y = F.interpolate(y, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return F.normalize(y, dim=1) if self.normalize else y


class CelebACNN(nn.Sequential):
    """A CelebA backbone: four conv-norm-ReLU-pool blocks, global average pooling.

    64x64 RGB in, a ``channels[-1]``-dimensional vector out. At ``channels=(64, 128, 256, 512)`` (the
    config's ``width: 64``) it has 1,551,936 parameters (tests/models/test_protocol_backbones.py).

    This is *smaller than* the reference network of the CelebA protocol the paper adopts (FAMO,
    Liu et al. 2024, ``experiments/celeba/models.py``; also used by FairGrad, Ban & Ji 2024; Nash-MTL
    has no CelebA experiment). That network is seven bias-free 3x3 conv-BN-ReLU layers, 64 | 128, 128 |
    256, 256 | 512, 512, with 2x2 max-pooling after the first three groups (not after the last),
    global average pooling, then two Linear(512, 512, bias=False)-BatchNorm1d-ReLU layers and one
    Linear(512, 1) head per attribute: 5,176,640 encoder parameters. Ours is kept as is (one
    convolution per block, a pool after each, no MLP), so CelebA numbers from it are not the paper's
    protocol.
    """

    def __init__(
        self, in_channels: int = 3, channels: tuple[int, ...] = (64, 128, 256, 512), norm: str = "bn"
    ) -> None:
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in channels:
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
                norm_layer(norm, cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(*layers)
        self.out_features = cin


class BinaryHead(nn.Linear):
    """A linear layer to one logit, returned as ``[B]`` (what BCE and F1 expect)."""

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(1)
