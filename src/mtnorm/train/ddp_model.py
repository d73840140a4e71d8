"""Training on ``torch.nn.parallel.DistributedDataParallel``: equal weighting, STL and loss weighting.

This is the path ``MTNORM_GRAD_SYNC=auto`` (the default) and ``ddp`` take for every run whose step
is one ``.backward()`` of a combined loss ``L = sum_t w_t l_t`` (:mod:`mtnorm.train.distributed`):

* equal weighting and STL: ``w_t = 1``;
* loss weighting (UW, DWA, RLW, GLS, IMTL-L, log, FAMO): ``w`` comes from the T loss values
  averaged over processes (one small all-reduce) and is a constant of the backward, so
  ``Balancer.weighted_objective`` builds ``L`` and the trainer calls ``L.backward()``.

DDP's reducer all-reduces gradients in buckets *while* that backward runs, overlapping
communication with the rest of the backward. DDP expects one forward per backward, so
:class:`TaskForward` makes one forward of all task passes (:func:`mtnorm.forward_tasks`) that
returns every task's output. Gradient balancers do not fit: they must average the per-task
gradients before combining them, and take them with ``torch.autograd.grad``, which DDP's reducer
never sees (it hooks the accumulation into ``.grad``); they use the flat path.

The wrapper only runs the training forward; the trainer keeps the plain model for evaluation,
checkpoints (no ``module.`` prefix) and everything else. Buffers are not broadcast at every forward
(``forward_sync_buffers=False``, ``broadcast_buffers=False`` before torch 2.13): task-specific
norms synchronize their statistics themselves (:func:`mtnorm.convert_sync`) and shared CPU
BatchNorms keep per-process statistics, as on the other paths.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtnorm.norm import forward_tasks

#: A module whose forward may leave some of its parameters out of a step's graph declares it with
#: this class attribute set to ``True`` (e.g. :class:`mtnorm.arch.ltb.LearningToBranch` once its
#: tree is frozen); :func:`wrap` then turns on DDP's ``find_unused_parameters``.
FIND_UNUSED = "ddp_find_unused_parameters"


class TaskForward(nn.Module):
    """``forward(x)`` is ``forward_tasks(model, x, mode=mode)``: every task pass in one call."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return forward_tasks(self.model, *args, mode=self.mode, **kwargs)


def declares_unused_parameters(model: nn.Module) -> bool:
    """Whether any module of ``model`` declares (:data:`FIND_UNUSED`) that a step may not use all of
    its parameters."""
    return any(getattr(m, FIND_UNUSED, False) for m in model.modules())


def wrap(model: nn.Module, mode: str, device: torch.device, bucket_cap_mb: float | None = None) -> nn.Module:
    """``model``'s training forward under DDP (the model's parameters are shared, not copied).

    ``find_unused_parameters`` is off unless a module of ``model`` declares :data:`FIND_UNUSED`:
    the combined loss of all tasks reaches every parameter of a multi-task model, and DDP raises at
    the next step if one is not. On, DDP walks the autograd graph after every forward to mark the
    unused parameters ready, and all-reduces a used-parameter bitmap each step (one more
    collective); a parameter no rank used keeps ``.grad = None``, as in one process.
    """
    kwargs: dict[str, Any] = {"find_unused_parameters": declares_unused_parameters(model)}
    # torch >= 2.13 renames broadcast_buffers (which still works, with a FutureWarning)
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    if bucket_cap_mb is not None:
        kwargs["bucket_cap_mb"] = bucket_cap_mb
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
    return DistributedDataParallel(TaskForward(model, mode), **kwargs)
