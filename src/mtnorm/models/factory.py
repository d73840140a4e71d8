"""``norm_layer``: the one place that decides which normalization a backbone gets.

Backbones never instantiate a norm class themselves; they ask ``norm_layer(kind, channels, dims)``.
That is what lets one backbone definition serve every method: ``"bn"`` for STL, HPS and the
task-specific variants (``mtnorm.convert`` later swaps the BatchNorms), ``"ln"`` and ``"gn"`` for the
shared-normalization baselines of the AdaBN paper, ``"none"`` for ablations.
"""

from __future__ import annotations

from torch import nn

NORM_KINDS = ("bn", "ln", "gn", "none")
"""The kinds ``norm_layer`` understands."""

GROUPS = 8
"""Target number of groups for ``"gn"`` (lowered to a divisor of the channel count)."""


def _groups(channels: int, target: int = GROUPS) -> int:
    g = min(target, channels)
    while channels % g:
        g -= 1
    return g


def norm_layer(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """A fresh normalization layer for ``channels`` features.

    Args:
        kind: ``"bn"`` (BatchNorm), ``"ln"`` (LayerNorm), ``"gn"`` (GroupNorm), ``"none"`` (identity).
        channels: number of features (channels of a feature map, width of a vector).
        dims: 2 for feature maps ``[B, C, H, W]``, 1 for vectors ``[B, C]``.

    For feature maps, ``"ln"`` is ``GroupNorm(1, C)``, i.e. LayerNorm over (C, H, W) of each sample,
    the usual meaning of LayerNorm in a CNN (``nn.LayerNorm`` would need the spatial size).
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; choose one of {list(NORM_KINDS)}")
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 (vectors) or 2 (feature maps), got {dims}")
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels) if dims == 2 else nn.LayerNorm(channels)
    return nn.GroupNorm(_groups(channels), channels)
