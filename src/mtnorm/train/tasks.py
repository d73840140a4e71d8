"""Per-task losses and metrics, keyed by the kind of prediction a task makes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtnorm import metrics


def _depth_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # L1 over valid pixels only (depth 0 marks missing measurements, as in MTAN)
    valid = target != 0
    return (pred - target).abs()[valid].mean()


def _normal_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # 1 - cosine similarity over pixels that carry a normal
    valid = target.abs().sum(dim=1) > 0
    return 1.0 - (pred * target).sum(dim=1)[valid].mean()


def _binary_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype))


@dataclass(frozen=True)
class TaskSpec:
    """How one task is trained and evaluated: ``loss(pred, target)`` and a fresh metric."""

    kind: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[], metrics.Metric]


def classification(num_classes: int) -> TaskSpec:
    """Single-label classification: cross-entropy, accuracy."""
    return TaskSpec("classification", F.cross_entropy, metrics.Accuracy)


def segmentation(num_classes: int, ignore_index: int = -1) -> TaskSpec:
    """Semantic segmentation: pixel-wise cross-entropy, mIoU and pixel accuracy."""
    return TaskSpec(
        "segmentation",
        lambda p, t: F.cross_entropy(p, t, ignore_index=ignore_index),
        lambda: metrics.SegmentationMetric(num_classes, ignore_index=ignore_index),
    )


def depth() -> TaskSpec:
    """Depth regression: L1 on valid pixels, absolute and relative error."""
    return TaskSpec("depth", _depth_loss, metrics.DepthMetric)


def normal() -> TaskSpec:
    """Surface normals: 1 - cosine, angle statistics."""
    return TaskSpec("normal", _normal_loss, metrics.NormalMetric)


def binary() -> TaskSpec:
    """A binary attribute: logistic loss, F1 and accuracy."""
    return TaskSpec("binary", _binary_loss, metrics.BinaryF1)
