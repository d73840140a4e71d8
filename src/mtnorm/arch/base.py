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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtnorm.norm.routing import BATCHED, TaskRouted, validate_tasks

NORM_OPTIONS = (None, "bn", "sigma", "dw", "adain")
"""Values of every architecture's ``norm`` option: None keeps plain shared BatchNorms, the others
are the kinds of :func:`mtnorm.convert` applied to the architecture's shared parts."""


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

    def task_penalties(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{task: scalar}`` terms the trainer adds to those tasks' training losses on batch ``x``.

        A penalty belongs to the task whose modules it regularizes (DSelect-k: the entropy of task
        t's gate), so it is part of ``l_t`` before any balancer sees it: equal weighting minimizes
        ``sum_t (l_t + p_t)``; a balancer weighs ``p_t`` with ``l_t``. None by default.
        """
        return {}


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


def check_options(
    method: str,
    given: Mapping[str, Any],
    defaults: Mapping[str, Any],
    choices: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, Any]:
    """``defaults`` updated by ``given`` (a method's ``method_kwargs``), checked.

    ``norm`` must be one of :data:`NORM_OPTIONS` when the method has it; ``choices`` lists the
    allowed values of other options.

    Raises:
        TypeError: an unknown option name (the message lists the method's options and defaults).
        ValueError: a value outside its choices.
    """
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        raise TypeError(
            f"method {method!r}: unknown option(s) {unknown} (method_kwargs); its options and "
            f"defaults are: {valid}"
        )
    options = {**defaults, **given}
    allowed = {**({"norm": NORM_OPTIONS} if "norm" in defaults else {}), **(choices or {})}
    for key, values in allowed.items():
        if options[key] not in values:
            raise ValueError(
                f"method {method!r}: unknown {key} {options[key]!r}; {key} must be one of {list(values)}"
                + (" (None keeps plain shared BatchNorms)" if key == "norm" else "")
            )
    return options


def check_heads(tasks: Sequence[str], heads: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """``{task: head}`` in the order of ``tasks``; every task needs exactly one head.

    Raises:
        ValueError: a task without a head, or a head for a task that is not in ``tasks``.
    """
    names = validate_tasks(tasks)
    missing = [t for t in names if t not in heads]
    extra = [t for t in heads if t not in names]
    if missing or extra:
        raise ValueError(
            f"tasks and heads disagree: tasks {list(names)}, heads for {list(heads)} "
            f"(no head for {missing}, heads without a task: {extra}); give one head per task"
        )
    return {t: heads[t] for t in names}


def holds_norm(module: nn.Module) -> bool:
    """Whether ``module`` contains a normalization layer (a registered norm class or a task norm)."""
    from mtnorm.norm.batchnorm import TaskNorm
    from mtnorm.norm.registry import is_norm

    return any(isinstance(m, TaskNorm) or is_norm(m) for m in module.modules())


def convert_shared(module: nn.Module, tasks: Sequence[str], norm: str | None) -> nn.Module:
    """``module`` with its norms made task-specific by :func:`mtnorm.convert` (``norm`` is the
    kind), or unchanged for ``norm=None`` and for a module without norm layers."""
    if norm is None or not holds_norm(module):
        return module
    from mtnorm.norm import convert

    return convert(module, tasks, norm=norm)


def fork_carry(carry: dict) -> dict:
    """A copy of a stage carry that a child can change without changing its parent's: dicts and
    lists are copied one level deep (SegNet's stacks of pooling indices), tensors are shared."""
    return {
        k: list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v for k, v in carry.items()
    }
