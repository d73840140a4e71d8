"""A backbone as a sequence of stages: the points where soft-sharing architectures interact.

Cross-stitch units mix the task columns after each stage, MTAN's attention modules read the
shared features at each stage, PLE's extraction levels are stages. So that every architecture
works on any backbone, a backbone is cut into stages once, here:

* a backbone with a ``stages()`` method (:class:`~mtnorm.models.SegNet`,
  :class:`~mtnorm.models.resnet.ResNet50`) says where its stages are itself;
* an ``nn.Sequential`` is cut after every top-level child that is an activation or a container
  holding a normalization layer (a conv-norm-ReLU block), parameter-free children at the end
  (pooling, flattening) joining the last stage.

A stage is a callable ``stage(x, carry) -> x``. ``carry`` is a dict private to one forward pass of
one backbone (one per column in cross-stitch), for state that skips stages: SegNet's max-pool
indices travel from encoder to decoder through it. Running the stages of a backbone in order is
its ``forward``; :func:`run_stages` does it and is what the backbones' own ``forward`` calls.

Stages are built anew from the backbone on every call of :func:`stages_of` (a list of closures
over its submodules): they hold no parameters of their own, so nothing is registered twice and a
copy of the backbone has its own stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mtnorm.arch.base import holds_norm

Stage = Callable[[torch.Tensor, dict], torch.Tensor]
"""``stage(x, carry) -> x``: one stage of a backbone's forward pass."""

_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
)


def _ends_stage(child: nn.Module) -> bool:
    if isinstance(child, _ACTIVATIONS):
        return True
    return len(list(child.children())) > 0 and holds_norm(child)


def sequential_groups(backbone: nn.Sequential) -> list[list[nn.Module]]:
    """The children of ``backbone`` grouped into stages (see the module docstring)."""
    groups: list[list[nn.Module]] = [[]]
    for child in backbone:
        groups[-1].append(child)
        if _ends_stage(child):
            groups.append([])
    tail = groups.pop()
    if tail:
        if groups and not any(p.requires_grad for m in tail for p in m.parameters()):
            groups[-1].extend(tail)  # pooling / flattening after the last block
        else:
            groups.append(tail)
    return groups


def _chain(modules: Sequence[nn.Module]) -> Stage:
    def stage(x: torch.Tensor, carry: dict) -> torch.Tensor:
        for m in modules:
            x = m(x)
        return x

    return stage


def stages_of(backbone: nn.Module) -> list[Stage]:
    """The stages of ``backbone``, in order; running them is ``backbone(x)``.

    Raises:
        TypeError: the backbone is neither an ``nn.Sequential`` nor defines ``stages()``.
    """
    custom = getattr(backbone, "stages", None)
    if callable(custom):
        return list(custom())
    if isinstance(backbone, nn.Sequential):
        return [_chain(group) for group in sequential_groups(backbone)]
    raise TypeError(
        f"cannot cut a {type(backbone).__name__} into stages: soft-sharing architectures need an "
        "nn.Sequential backbone or one with a stages() method returning callables "
        "stage(x, carry) -> x whose composition is its forward (see mtnorm.arch.stages)"
    )


def run_stages(stages: Sequence[Stage], x: torch.Tensor, carry: dict | None = None) -> torch.Tensor:
    """Apply ``stages`` in order with one fresh ``carry``."""
    carry = {} if carry is None else carry
    for stage in stages:
        x = stage(x, carry)
    return x


@torch.no_grad()
def stage_shapes(backbone: nn.Module, example_input: torch.Tensor) -> list[tuple[int, ...]]:
    """The output shape of every stage on ``example_input`` (batch dimension included).

    Runs in eval mode on a copy of the training flag, so running statistics do not move.
    """
    training = backbone.training
    backbone.eval()
    try:
        shapes = []
        x, carry = example_input, {}
        for stage in stages_of(backbone):
            x = stage(x, carry)
            shapes.append(tuple(x.shape))
        return shapes
    finally:
        backbone.train(training)


def channels(shape: Sequence[int]) -> int:
    """Features of one stage output: channels of a map ``[B, C, ...]``, width of a vector ``[B, C]``."""
    return int(shape[1])


def describe(backbone: nn.Module, example_input: Any) -> str:
    """One line per stage with its output shape (for error messages and docs)."""
    return "; ".join(f"stage {i}: {tuple(s)}" for i, s in enumerate(stage_shapes(backbone, example_input)))
