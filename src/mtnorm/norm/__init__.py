"""Task-specific normalization: layers, model conversion, routing, extraction."""

from mtnorm.norm.convert import NORMS, ConvertReport, convert, inverse_sigmoid
from mtnorm.norm.extract import extract
from mtnorm.norm.importance import importance
from mtnorm.norm.layers import (
    AdaINBatchNorm,
    AdaINSyncBatchNorm,
    DynamicWeightedBatchNorm,
    DynamicWeightedSyncBatchNorm,
    TaskBatchNorm,
    TaskLayerNorm,
    TaskNorm,
    TaskSigmoidBatchNorm,
    TaskSigmoidLayerNorm,
    TaskSigmoidSyncBatchNorm,
    TaskSyncBatchNorm,
)
from mtnorm.norm.optim import param_groups, shared_parameters, task_parameters
from mtnorm.norm.registry import register_norm
from mtnorm.norm.rmsnorm import TaskRMSNorm, TaskSigmoidRMSNorm
from mtnorm.norm.routing import (
    BATCHED,
    PerTask,
    TaskHeads,
    TaskRouted,
    batched_tasks,
    choose_mode,
    forward_tasks,
    tasks_of,
    use_task,
    validate_tasks,
)
from mtnorm.norm.sync import convert_sync
from mtnorm.norm.wrappers import TaskNormWrapper

__all__ = [
    "BATCHED",
    "NORMS",
    "AdaINBatchNorm",
    "AdaINSyncBatchNorm",
    "ConvertReport",
    "DynamicWeightedBatchNorm",
    "DynamicWeightedSyncBatchNorm",
    "PerTask",
    "TaskBatchNorm",
    "TaskHeads",
    "TaskLayerNorm",
    "TaskNorm",
    "TaskNormWrapper",
    "TaskRMSNorm",
    "TaskRouted",
    "TaskSigmoidBatchNorm",
    "TaskSigmoidLayerNorm",
    "TaskSigmoidRMSNorm",
    "TaskSigmoidSyncBatchNorm",
    "TaskSyncBatchNorm",
    "batched_tasks",
    "choose_mode",
    "convert",
    "convert_sync",
    "extract",
    "forward_tasks",
    "importance",
    "inverse_sigmoid",
    "param_groups",
    "register_norm",
    "shared_parameters",
    "task_parameters",
    "tasks_of",
    "use_task",
    "validate_tasks",
]
