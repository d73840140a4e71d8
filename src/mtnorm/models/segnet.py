"""A small SegNet-like encoder-decoder and MTAN-style dense heads for FashionScenes.

The encoder halves the resolution ``levels`` times (two conv-norm-ReLU per level, max-pool with
indices), the decoder mirrors it with max-unpooling, as in SegNet. The output is a full-resolution
feature map of ``width`` channels that every task head reads, as in MTAN's SegNet protocol.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtnorm.models.factory import norm_layer


def _conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
        norm_layer(norm, cout, dims=2),
        nn.ReLU(inplace=True),
    )


def pool_stage(block: nn.Module, start: bool = False):
    """A SegNet encoder stage: ``block``, then 2x2 max-pooling whose indices and input size are
    pushed onto the carry (``start``: the first stage, which opens the carry's stacks)."""

    def stage(x: torch.Tensor, carry: dict) -> torch.Tensor:
        if start:
            carry["indices"], carry["sizes"] = [], []
        x = block(x)
        carry["sizes"].append(x.shape[-2:])
        x, idx = F.max_pool2d(x, 2, return_indices=True)
        carry["indices"].append(idx)
        return x

    return stage


def unpool_stage(block: nn.Module):
    """A SegNet decoder stage: max-unpooling with the indices popped from the carry, then ``block``."""

    def stage(x: torch.Tensor, carry: dict) -> torch.Tensor:
        x = F.max_unpool2d(x, carry["indices"].pop(), 2, output_size=carry["sizes"].pop())
        return block(x)

    return stage


class SegNet(nn.Module):
    """Encoder-decoder with a norm after every convolution.

    Args:
        in_channels: image channels.
        width: channels at full resolution; level ``k`` has ``width * 2**k``.
        levels: number of down/up-sampling stages (the input side must be divisible by 2**levels).
        norm: the kind handed to :func:`~mtnorm.models.factory.norm_layer`.
        max_width: cap on the channels of deep levels (MTAN's SegNet: 64..512 over 5 levels).
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 16,
        levels: int = 3,
        norm: str = "bn",
        max_width: int | None = None,
    ) -> None:
        super().__init__()
        cap = max_width or width * 2 ** (levels - 1)
        chans = [min(width * 2**k, cap) for k in range(levels)]
        self.stem = _conv(in_channels, chans[0], norm)
        self.down = nn.ModuleList(
            nn.Sequential(_conv(chans[max(k - 1, 0)], chans[k], norm), _conv(chans[k], chans[k], norm))
            for k in range(levels)
        )
        self.up = nn.ModuleList(
            nn.Sequential(_conv(chans[k], chans[k], norm), _conv(chans[k], chans[max(k - 1, 0)], norm))
            for k in reversed(range(levels))
        )
        self.levels = levels
        self.out_channels = chans[0]

    def stages(self) -> list:
        """Stem, each encoder level (ending in max-pooling), each decoder level (starting with
        max-unpooling): ``1 + 2 * levels`` stages for :mod:`mtnorm.arch`. The pooling indices and
        sizes travel in the carry, last in first out."""

        def stem(x: torch.Tensor, carry: dict) -> torch.Tensor:
            carry["indices"], carry["sizes"] = [], []
            return self.stem(x)

        return [stem, *(pool_stage(b) for b in self.down), *(unpool_stage(b) for b in self.up)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mtnorm.arch.stages import run_stages

        return run_stages(self.stages(), x)


class DenseHead(nn.Module):
    """MTAN's prediction head: 3x3 conv, ReLU, 1x1 conv to ``out_channels``.

    ``normalize=True`` projects the output onto the unit sphere (surface normals).
    """

    def __init__(self, in_channels: int, out_channels: int, normalize: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1),
        )
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return F.normalize(y, dim=1) if self.normalize else y


class PooledHead(nn.Module):
    """Global average pooling then a linear layer: image-level outputs (the ``has_*`` attributes)."""

    def __init__(self, in_channels: int, out_features: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.mean(dim=(2, 3)))
        return y.squeeze(1) if y.shape[1] == 1 else y
