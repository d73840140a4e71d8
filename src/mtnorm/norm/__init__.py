"""Task-specific normalization: layers, model conversion, routing, extraction."""

from mtnorm.norm.routing import (
    BATCHED,
    PerTask,
    TaskHeads,
    TaskRouted,
    batched_tasks,
    forward_tasks,
    tasks_of,
    use_task,
    validate_tasks,
)

__all__ = [
    "BATCHED",
    "PerTask",
    "TaskHeads",
    "TaskRouted",
    "batched_tasks",
    "forward_tasks",
    "tasks_of",
    "use_task",
    "validate_tasks",
]
