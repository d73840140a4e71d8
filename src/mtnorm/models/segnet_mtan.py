"""The SegNet of MTAN's NYUv2 / Cityscapes protocol (Liu et al. 2019), layer for layer.

VGG-16-shaped: filters 64-128-256-512-512, 13 encoder and 13 decoder 3x3 conv-norm-ReLU layers,
2x2 max-pooling with indices and max-unpooling. The layer plan follows MTAN's
``model_segnet_*.py`` (``encoder_block`` + ``conv_block_enc``, ``decoder_block`` + ``conv_block_dec``):

* encoder level ``k`` (blocks of 2, 2, 3, 3, 3 convolutions): the first convolution goes from the
  previous level's channels to ``filters[k]``, the others keep ``filters[k]``; then max-pooling;
* decoder level ``k`` (from the deepest, ``k = 4``, to ``k = 0``; blocks of 3, 3, 3, 2, 2): max-unpooling
  with level ``k``'s indices, a first convolution from ``filters[k]`` to ``filters[k-1]`` (``filters[0]``
  at ``k = 0``), the others keep that width. So the channel reductions sit at the *start* of each decoder
  block, as in MTAN, and the output has ``filters[0] = 64`` channels at full resolution.

MTAN's ``conv_layer`` keeps the convolution's bias in front of BatchNorm (redundant under BN, 0.03% of
the parameters); ``bias=True`` (default) reproduces it, ``bias=False`` drops it. With ``norm="none"`` the
bias is always kept. Convolutions are initialized as in MTAN (Xavier-normal weights, zero bias). Norms
come from :func:`~mtnorm.models.factory.norm_layer`.

The smaller :class:`~mtnorm.models.segnet.SegNet` (two convolutions per level, configurable width) stays
what the FashionScenes benchmark uses.
"""

from __future__ import annotations

import torch
from torch import nn

from mtnorm.models.factory import norm_layer
from mtnorm.models.segnet import pool_stage, unpool_stage

MTAN_FILTERS = (64, 128, 256, 512, 512)
"""Channels of the five levels of MTAN's SegNet."""

ENCODER_DEPTHS = (2, 2, 3, 3, 3)
"""Convolutions per encoder level (VGG-16); the decoder mirrors it."""


def _conv(cin: int, cout: int, norm: str, bias: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=bias or norm == "none"),
        norm_layer(norm, cout, dims=2),
        nn.ReLU(inplace=True),
    )


class MTANSegNet(nn.Module):
    """MTAN's SegNet encoder-decoder: 26 conv-norm-ReLU layers, ``out_channels = filters[0]``.

    Args:
        in_channels: image channels (3 for NYUv2 / Cityscapes).
        norm: the kind handed to :func:`~mtnorm.models.factory.norm_layer`.
        filters: channels of the five levels (MTAN: 64, 128, 256, 512, 512; smaller only for tests).
        bias: keep the convolutions' bias before the norm, as MTAN does.

    The input side must be divisible by 32 (five poolings); other sizes work as far as max-unpooling
    restores each level's size (it is given the pre-pooling sizes).
    """

    def __init__(
        self,
        in_channels: int = 3,
        norm: str = "bn",
        filters: tuple[int, ...] = MTAN_FILTERS,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if len(filters) != len(ENCODER_DEPTHS):
            raise ValueError(f"filters: MTAN's SegNet has {len(ENCODER_DEPTHS)} levels, got {tuple(filters)}")
        f = tuple(filters)
        self.encoder = nn.ModuleList()
        cin = in_channels
        for k, depth in enumerate(ENCODER_DEPTHS):
            self.encoder.append(
                nn.Sequential(*(_conv(cin if i == 0 else f[k], f[k], norm, bias) for i in range(depth)))
            )
            cin = f[k]
        # decoder[j] serves level k = 4 - j: unpool, f[k] -> f[k-1] (f[0] at k = 0), then keep the width
        self.decoder = nn.ModuleList()
        for k in reversed(range(len(f))):
            cout = f[max(k - 1, 0)]
            depth = ENCODER_DEPTHS[k]
            self.decoder.append(
                nn.Sequential(*(_conv(f[k] if i == 0 else cout, cout, norm, bias) for i in range(depth)))
            )
        self.filters = f
        self.out_channels = f[0]
        # MTAN's initialization: Xavier-normal convolutions with zero bias (norms keep weight 1, bias 0)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def stages(self) -> list:
        """Each encoder level (ending in max-pooling), each decoder level (starting with max-unpooling):
        ten stages for :mod:`mtnorm.arch`. The pooling indices and sizes travel in the carry, last in
        first out, as in :meth:`SegNet.stages() <mtnorm.models.segnet.SegNet.stages>`."""

        return [
            *(pool_stage(b, start=i == 0) for i, b in enumerate(self.encoder)),
            *(unpool_stage(b) for b in self.decoder),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from mtnorm.arch.stages import run_stages

        return run_stages(self.stages(), x)
