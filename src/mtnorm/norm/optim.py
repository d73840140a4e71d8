"""Parameter partitions of a converted model: shared vs task-specific, and optimizer groups."""

from __future__ import annotations

from typing import Any

from torch import nn

from mtnorm.norm.batchnorm import TaskNorm
from mtnorm.norm.registry import is_norm
from mtnorm.norm.routing import TaskRouted

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)

#: A module attribute: the learning-rate multiplier :func:`param_groups` gives the parameters the
#: module owns directly (not its children's).
LR_MULT = "mtnorm_lr_mult"


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    """Map each parameter (by id) to the innermost module that owns it directly."""
    owner: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner[id(p)] = module
    return owner


def task_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters inside task-routed modules (task norms and task heads): each serves one task."""
    seen: set[int] = set()
    out = []
    for module in model.modules():
        if isinstance(module, TaskRouted):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters used by every task: all but those of :func:`task_parameters`."""
    specific = {id(p) for p in task_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in specific]


def param_groups(
    model: nn.Module,
    lr: float,
    norm_lr_mult: float = 100.0,
    layernorm_lr_mult: float = 10.0,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with the paper's discriminative learning rates (§4).

    * ``"norm"``: parameters of task-specific batch norms (TSσBN's gates, TSBN's affine, DW-BN's
      mixture, AdaIN-BN's gate) at ``lr * norm_lr_mult`` (α_σBN = 100 in the paper);
    * ``"layernorm"``: parameters of task-specific layer norms at ``lr * layernorm_lr_mult`` (10);
    * ``"other_norm"``: parameters of plain (shared) norm layers at ``lr``;
    * ``"lr_x<m>"``: parameters of a module that declares ``mtnorm_lr_mult = m`` (``m != 1``; e.g.
      Cross-Stitch's units with ``stitch_lr_mult``) at ``lr * m``, without weight decay;
    * ``"rest"``: everything else (convolutions, linears, heads) at ``lr`` with ``weight_decay``.

    Norm parameters get no weight decay. Frozen parameters and empty groups are left out. Each
    group carries a ``"name"`` key, which torch optimizers keep and ignore.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    owner = _owners(model)
    groups: dict[str, dict[str, Any]] = {
        "norm": {"lr": lr * norm_lr_mult, "weight_decay": 0.0},
        "layernorm": {"lr": lr * layernorm_lr_mult, "weight_decay": 0.0},
        "other_norm": {"lr": lr, "weight_decay": 0.0},
        "rest": {"lr": lr, "weight_decay": weight_decay},
    }
    members: dict[str, list[nn.Parameter]] = {k: [] for k in groups}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        module = owner[id(p)]
        mult = float(getattr(module, LR_MULT, 1.0))
        if mult != 1.0:
            key = f"lr_x{mult:g}"
            if key not in groups:
                groups[key] = {"lr": lr * mult, "weight_decay": 0.0}
                members[key] = []
        elif isinstance(module, TaskNorm):
            key = "layernorm" if module.family == "layer" else "norm"
        elif isinstance(module, _NORM_TYPES) or is_norm(module):
            key = "other_norm"
        else:
            key = "rest"
        members[key].append(p)
    return [
        {"name": key, "params": members[key], **groups[key]} for key in groups if members[key]
    ]
