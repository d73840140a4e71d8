"""Equal weighting on ``torch.nn.parallel.DistributedDataParallel`` (``MTNORM_GRAD_SYNC=ddp``).

DDP's reducer all-reduces gradients in buckets *while* backward runs, overlapping communication
with the rest of the backward; the default flat path (:mod:`mtnorm.train.distributed`) reduces
after backward in one collective. DDP expects one forward per backward, so :class:`TaskForward`
makes one forward of all task passes (:func:`mtnorm.forward_tasks`); the summed loss's one
``.backward()`` then fires every bucket. Only equal weighting (and STL) fits: loss weighting and
gradient balancers take their gradients with ``torch.autograd.grad``, which DDP's reducer never
sees (it hooks the accumulation into ``.grad``), and gradient balancers must average the per-task
gradients before combining them, which DDP cannot do.

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


class TaskForward(nn.Module):
    """``forward(x)`` is ``forward_tasks(model, x, mode=mode)``: every task pass in one call."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model = model
        self.mode = mode

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return forward_tasks(self.model, *args, mode=self.mode, **kwargs)


def wrap(model: nn.Module, mode: str, device: torch.device, bucket_cap_mb: float | None = None) -> nn.Module:
    """``model``'s training forward under DDP (the model's parameters are shared, not copied).

    ``find_unused_parameters=False``: every parameter of a multi-task model is reached by the
    summed loss of all tasks; DDP raises at the next step if one is not.
    """
    kwargs: dict[str, Any] = {"find_unused_parameters": False}
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
