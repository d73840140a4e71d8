"""#P/#F profile of a model: trainable parameters and forward FLOPs (paper Tables 1-4).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts a multiply-add as 2 FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Profile:
    """Parameter count and forward FLOPs; ratios are relative to a baseline model when one is given."""

    params: int
    flops: int
    params_ratio: float | None = None
    flops_ratio: float | None = None


def _count(model: nn.Module, example_input: object) -> tuple[int, int]:
    from mtnorm.norm import TaskRouted, forward_tasks

    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        if any(isinstance(m, TaskRouted) for m in model.modules()):
            # a multi-task model: the FLOPs of producing every task's output (T task passes for
            # task-specific norms, one pass for hard sharing), as the paper's #F counts them
            forward_tasks(model, example_input, mode="sequential")
        else:
            model(example_input)
    return params, counter.get_total_flops()


def profile(model: nn.Module, example_input: object, baseline: nn.Module | None = None) -> Profile:
    """Count #P (trainable parameters) and #F (forward FLOPs) of ``model`` on ``example_input``.

    With ``baseline`` (e.g. the HPS model), also report #P and #F as ratios to it, as the paper's tables do.
    """
    params, flops = _count(model, example_input)
    if baseline is None:
        return Profile(params, flops)
    base_params, base_flops = _count(baseline, example_input)
    if base_params == 0 or base_flops == 0:
        raise ValueError("baseline has no trainable parameters or no FLOPs; pass a real baseline model")
    return Profile(params, flops, params / base_params, flops / base_flops)
