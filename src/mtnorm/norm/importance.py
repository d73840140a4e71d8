"""``mtnorm.importance``: the task-filter importance matrices of a converted model (paper §5)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from mtnorm.norm.batchnorm import TaskNorm


def importance(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """``{layer name: I [T, F]}`` for every task-specific norm layer, in module order.

    ``I[t, i]`` is the importance task t gives filter i: the gate ``sigmoid(gamma)`` for TSσBN and
    σLN layers (paper §5, in [0, 1]) and ``|gamma|`` for TSBN, DW-BN, AdaIN-BN and task LN. The
    tensors are detached copies; layers without affine parameters are skipped.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, TaskNorm):
            try:
                out[name or "<root>"] = module.importance().clone()
            except ValueError:
                continue
    if not out:
        raise ValueError("the model has no task-specific norm layers; convert it with mtnorm.convert")
    return out
