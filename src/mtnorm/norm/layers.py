"""All task-specific normalization layers, in one import."""

from mtnorm.norm.adaptive import AdaINBatchNorm, DynamicWeightedBatchNorm
from mtnorm.norm.batchnorm import TaskBatchNorm, TaskNorm, TaskSigmoidBatchNorm
from mtnorm.norm.layernorm import TaskLayerNorm, TaskSigmoidLayerNorm
from mtnorm.norm.sync import (
    AdaINSyncBatchNorm,
    DynamicWeightedSyncBatchNorm,
    TaskSigmoidSyncBatchNorm,
    TaskSyncBatchNorm,
)

__all__ = [
    "AdaINBatchNorm",
    "AdaINSyncBatchNorm",
    "DynamicWeightedBatchNorm",
    "DynamicWeightedSyncBatchNorm",
    "TaskBatchNorm",
    "TaskLayerNorm",
    "TaskNorm",
    "TaskSigmoidBatchNorm",
    "TaskSigmoidLayerNorm",
    "TaskSigmoidSyncBatchNorm",
    "TaskSyncBatchNorm",
]
