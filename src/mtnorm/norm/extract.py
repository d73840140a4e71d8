"""``mtnorm.extract``: the single-task network of one task, made of standard PyTorch layers."""

from __future__ import annotations

import copy

from torch import nn

from mtnorm.norm.batchnorm import TaskNorm
from mtnorm.norm.routing import TaskHeads, TaskRouted, tasks_of
from mtnorm.norm.wrappers import TaskNormWrapper, into_template


def extract(model: nn.Module, task: str) -> nn.Module:
    """A deep copy of ``model`` that computes ``task`` alone, with no mtnorm module inside.

    Every task-specific norm becomes a layer of the class the model had, computing the same
    eval-mode function (``nn.BatchNorm*d`` with the sigmoid gate folded into its weight,
    ``nn.LayerNorm``, ``nn.RMSNorm``, or the third-party class it was converted from, e.g. timm's
    ``BatchNormAct2d`` or torchvision's ``FrozenBatchNorm2d``; DW-BN folds its mixture into the
    running statistics), and :class:`TaskHeads` becomes the task's own
    head, so the copy returns the head's output itself where ``use_task`` returns
    ``PerTask({task: output})``. The copy has the size and speed of the original single-task
    network and scripts / exports wherever the original model did. ``model`` is left unchanged.
    """
    tasks = tasks_of(model)
    if task not in tasks:
        raise KeyError(f"unknown task {task!r}; this model's tasks are {list(tasks)}")

    def standard(module: nn.Module) -> nn.Module | None:
        if isinstance(module, TaskNormWrapper):
            new = module.to_standard(task)
        elif isinstance(module, TaskNorm):
            new = module.to_standard(task)
            template = getattr(module, "_mtnorm_template", None)
            if template is not None:  # the class the model had (e.g. FrozenBatchNorm2d)
                new = into_template(template, new)
        elif isinstance(module, TaskHeads):
            new = module.heads[task]
        else:
            return None
        return new.train(module.training)

    def walk(module: nn.Module) -> None:
        for name, child in module.named_children():
            new = standard(child)
            if new is None:
                walk(child)
            else:
                walk(new)  # a head may itself hold task-routed modules
                setattr(module, name, new)

    single = copy.deepcopy(model)
    root = standard(single)
    if root is not None:
        single = root
    walk(single)
    left = [type(m).__name__ for m in single.modules() if isinstance(m, TaskRouted)]
    if left:
        raise TypeError(f"extract could not replace these task-routed modules: {left}")
    return single
