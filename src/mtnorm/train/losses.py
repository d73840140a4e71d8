"""The training loss of each kind of task (see :mod:`mtnorm.data.spec` for the kinds)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from mtnorm.data.spec import TaskSpec

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _depth(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # L1 over valid pixels only: depth 0 marks a missing measurement (MTAN)
    valid = target != 0
    return (pred - target).abs()[valid].mean()


def _normal(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # 1 - cosine over pixels that carry a normal (the zero vector marks invalid ones)
    valid = target.abs().sum(dim=1) > 0
    return 1.0 - (F.normalize(pred, dim=1) * target).sum(dim=1)[valid].mean()


def _binary(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(pred.reshape(target.shape), target.to(pred.dtype))


def _regression(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.reshape(target.shape) - target).abs().mean()


def loss_for(spec: TaskSpec) -> LossFn:
    """``loss(pred, target)`` for a task spec; predictions arrive in fp32."""
    if spec.kind == "classification":
        return F.cross_entropy
    if spec.kind == "segmentation":
        ignore = spec.ignore_index if spec.ignore_index is not None else -100
        return lambda p, t: F.cross_entropy(p, t, ignore_index=ignore)
    return {"depth": _depth, "normal": _normal, "binary": _binary, "regression": _regression}[spec.kind]
