"""MTAN, the Multi-Task Attention Network (Liu, Johns, Davison, CVPR 2019), on any backbone cut into
stages."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtnorm.arch.base import (
    Architecture,
    TaskModules,
    active_tasks,
    check_heads,
    check_options,
    convert_shared,
)
from mtnorm.arch.stages import stage_shapes, stages_of
from mtnorm.models.methods import BackboneFactory, register_method
from mtnorm.norm import PerTask, TaskHeads


def _map_or_vector(shape: Sequence[int], k: int, shapes: Sequence[Sequence[int]]) -> bool:
    """True for a feature map ``[B, C, H, W]``, False for a vector ``[B, C]``."""
    if len(shape) not in (2, 4):
        listed = "; ".join(f"stage {i}: {tuple(s)}" for i, s in enumerate(shapes))
        raise ValueError(
            f"MTAN attends to feature maps [B, C, H, W] and vectors [B, C]; stage {k} outputs "
            f"{tuple(shape)} ({listed})"
        )
    return len(shape) == 4


def _block(cin: int, cout: int, spatial: bool, kernel: int = 1, last: nn.Module | None = None) -> list:
    """Conv (or Linear for vectors) without bias, BatchNorm, then ReLU (or ``last``)."""
    if spatial:
        layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    else:
        layers = [nn.Linear(cin, cout, bias=False), nn.BatchNorm1d(cout)]
    return [*layers, last if last is not None else nn.ReLU(inplace=True)]


class AttentionStage(nn.Module):
    """Task t's attention module at stage k: ``â^k = a^k ⊙ p^k`` with

        a^0 = g_0(p^0),    a^k = g_k([p^k, f_k(â^{k-1})])  (k >= 1, concatenated along channels),

    ``g``: 1x1 conv-BN-ReLU, 1x1 conv-BN-sigmoid (the paper's attention module; Linear for vectors);
    ``f``: the shared-to-next feature combination, a 3x3 conv-BN-ReLU from stage k-1's channels
    (Linear-BN-ReLU on the flattened features when stage k-1 is a map and stage k a vector, as the
    backbone's own flatten; on the vector when both are vectors), resampled to stage k's size:
    ``f`` then adaptive max-pooling when the size shrinks (MTAN's encoder: conv, then 2x2 max-pool),
    bilinear ``F.interpolate`` then ``f`` when it grows (MTAN's decoder: upsample, then conv).
    ``g`` and ``f`` have ``C_k // reduction`` inner channels (1: the paper's SegNet; LibMTL's
    ResNet MTAN uses 4).
    """

    def __init__(self, shape: Sequence[int], previous: Sequence[int] | None, reduction: int = 1) -> None:
        super().__init__()
        c = int(shape[1])
        inner = max(1, c // reduction)
        spatial = len(shape) == 4
        self.size = tuple(shape[2:])
        self.f: nn.Sequential | None = None
        self.grow = False
        cin = c
        if previous is not None:
            prev_spatial = len(previous) == 4
            if spatial and not prev_spatial:
                raise ValueError(
                    f"MTAN cannot resample a vector stage {tuple(previous)} to the feature map {tuple(shape)}"
                )
            if spatial:
                self.f = nn.Sequential(*_block(int(previous[1]), inner, True, kernel=3))
                self.grow = any(n > p for n, p in zip(shape[2:], previous[2:]))
            elif prev_spatial:
                flat = math.prod(int(n) for n in previous[1:])
                self.f = nn.Sequential(nn.Flatten(), *_block(flat, inner, False))
            else:
                self.f = nn.Sequential(*_block(int(previous[1]), inner, False))
            cin = c + inner
        self.g = nn.Sequential(*_block(cin, inner, spatial), *_block(inner, c, spatial, last=nn.Sigmoid()))

    def combine(self, previous: torch.Tensor) -> torch.Tensor:
        """``f_k(â^{k-1})`` at stage k's size."""
        assert self.f is not None
        if self.grow:
            return self.f(F.interpolate(previous, size=self.size, mode="bilinear", align_corners=False))
        out = self.f(previous)
        if out.dim() == 4 and tuple(out.shape[2:]) != self.size:
            out = F.adaptive_max_pool2d(out, self.size)
        return out

    def forward(self, p: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        inputs = p if self.f is None else torch.cat([p, self.combine(previous)], dim=1)
        return self.g(inputs) * p


class MTAN(Architecture):
    """MTAN: one shared backbone, one attention branch per task (Liu, Johns, Davison, CVPR 2019).

    The shared backbone's stages give ``p^k``; task t's branch applies a soft mask at every stage,

        â_t^k = a_t^k ⊙ p^k,    a_t^k = sigmoid(g_t^k([p^k, f_t^k(â_t^{k-1})])),

    (:class:`AttentionStage`) and task t's head reads ``â_t^{K-1}``. Choices against the paper:

    * the paper's mask reads the first layer ``u^k`` of block k and multiplies its last ``p^k``;
      stages are opaque callables here, so ``p^k`` is both (one stage = one MTAN block);
    * ``reduction`` narrows ``f`` and ``g`` (see :class:`AttentionStage`);
    * ``f``'s output is resampled to stage k's size by adaptive max-pooling (smaller) or bilinear
      interpolation (larger); a map followed by a vector is flattened; a vector followed by a map is
      refused.

    The attention branches live in a :class:`~mtnorm.arch.TaskModules` (task t's parameters);
    the backbone is shared. Inside ``use_task(model, t)`` only task t's branch and head run.

    Args:
        backbone: the shared backbone (its norms may be converted, e.g. MTAN + TSσBN).
        heads: ``{task: head}``; each reads features shaped like the backbone's output.
        branches: ``{task: nn.ModuleList of AttentionStage}`` (see :func:`attention_branch`).
    """

    def __init__(
        self, backbone: nn.Module, heads: Mapping[str, nn.Module], branches: Mapping[str, nn.ModuleList]
    ) -> None:
        super().__init__()
        if list(branches) != list(heads):
            raise ValueError(f"branches for {list(branches)} but heads for {list(heads)}")
        self.backbone = backbone
        self.heads = TaskHeads(dict(heads))
        self.attention = TaskModules(dict(branches))
        counts = {len(b) for b in branches.values()} | {len(stages_of(backbone))}
        if len(counts) != 1:
            raise ValueError(f"the backbone's stages and the attention branches differ in length: {counts}")

    def forward(self, x: torch.Tensor) -> PerTask:
        tasks = active_tasks(self.heads)
        attended: dict[str, torch.Tensor | None] = {t: None for t in tasks}
        carry: dict = {}
        for k, stage in enumerate(stages_of(self.backbone)):
            x = stage(x, carry)
            for t in tasks:
                attended[t] = self.attention[t][k](x, attended[t])
        return PerTask({t: self.heads.heads[t](attended[t]) for t in tasks})


def attention_branch(shapes: Sequence[Sequence[int]], reduction: int = 1) -> nn.ModuleList:
    """One task's attention modules, one per stage, sized from the backbone's stage shapes."""
    if reduction < 1:
        raise ValueError(f"reduction must be a positive integer, got {reduction}")
    for k, s in enumerate(shapes):
        _map_or_vector(s, k, shapes)
    return nn.ModuleList(
        AttentionStage(s, shapes[k - 1] if k else None, reduction) for k, s in enumerate(shapes)
    )


@register_method(
    "mtan",
    "MTAN (Liu et al. 2019): a shared backbone and one soft-attention branch per task",
    needs_example_input=True,
)
def build_mtan(
    backbone_factory: BackboneFactory,
    tasks: Sequence[str],
    heads: Mapping[str, nn.Module],
    *,
    example_input: torch.Tensor,
    **options: Any,
) -> MTAN:
    """Options: ``reduction`` (1), ``norm`` (None: plain BatchNorm; ``"bn"`` / ``"sigma"`` / ...:
    the shared backbone's norms converted by :func:`mtnorm.convert`, e.g. MTAN + TSσBN; the
    attention branches are per task already and keep plain BatchNorm)."""
    o = check_options("mtan", options, {"reduction": 1, "norm": None})
    heads = check_heads(tasks, heads)
    tasks = tuple(heads)
    backbone = backbone_factory("bn")
    shapes = stage_shapes(backbone, example_input)
    branches = {t: attention_branch(shapes, o["reduction"]) for t in tasks}
    return MTAN(convert_shared(backbone, tasks, o["norm"]), heads, branches)
