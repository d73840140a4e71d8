"""What every architecture of :mod:`mtnorm.arch` shares: per-task module containers and routing.

Two rules keep the balancers and the trainer right for any architecture:

* Parameters that only one task's output depends on (MTAN's attention branch of task t, the gate
  of task t in MMoE) live in a :class:`TaskModules`, a routed container, so
  :func:`mtnorm.task_parameters` lists them as task t's own and a gradient balancer gives them task
  t's gradient. Everything else a task's loss reaches (experts, cross-stitch columns, which all
  tasks' outputs depend on) is shared and receives the balancer's combined direction.
* An architecture's ``forward`` computes the tasks :func:`active_tasks` names: all of them when no
  task is chosen (one pass, as :func:`mtnorm.forward_tasks` runs a model without task norms), or
  the chosen one inside ``use_task`` (the sequential passes of a model whose shared norms were
  converted, e.g. MTAN + TSσBN). Architectures do not run the batched mode; they subclass
  :class:`Architecture`, which tells ``forward_tasks(mode="auto")`` so.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from mtnorm.norm.routing import BATCHED, TaskRouted


class TaskModules(TaskRouted):
    """``{task: module}`` whose parameters belong to one task each (see the module docstring)."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__(list(modules))
        self.per_task = nn.ModuleDict(dict(modules))
        for p in self.per_task.parameters():  # so a balancer warns when they are passed as shared
            p._mtnorm_task_specific = True  # type: ignore[attr-defined]

    def __getitem__(self, task: str) -> nn.Module:
        return self.per_task[task]

    def forward(self, *args, **kwargs):  # a container, never called itself
        raise TypeError("TaskModules is a container: call one task's module, modules[task](x)")


class Architecture(nn.Module):
    """Base of the architectures: a model computed jointly for all tasks, never batched by task.

    ``mtnorm_batched = False`` makes :func:`mtnorm.choose_mode` pick sequential task passes.
    """

    mtnorm_batched = False


def active_tasks(routed: TaskRouted) -> tuple[str, ...]:
    """The tasks a forward pass must produce, read from a routed module of the model (its heads).

    Raises:
        ValueError: the model is in the batched mode, which the architectures do not run.
    """
    route = routed.route
    if route is None:
        return routed.tasks
    if route == BATCHED:
        raise ValueError(
            "mtnorm.arch architectures compute their tasks jointly and do not run "
            "forward_tasks(mode='batched'); use mode='sequential' or 'auto'"
        )
    return (routed.tasks[route],)
