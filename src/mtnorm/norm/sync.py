"""Per-task synchronized batch normalization for DistributedDataParallel.

Like ``nn.SyncBatchNorm``, but per task: each task's batch statistics are computed over the union
of that task's chunks on every process, so T tasks on N processes normalize exactly as one process
on the concatenated batch would. Statistics are combined in two all-reduces (sums, then squared
deviations from the global mean) through ``torch.distributed.nn``, which carries gradients.
Without an initialized process group (or with one process) the layers behave like their local
counterparts, so a converted model runs unchanged outside ``torchrun``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtnorm.norm.adaptive import AdaINBatchNorm, DynamicWeightedBatchNorm
from mtnorm.norm.batchnorm import TaskBatchNorm, TaskSigmoidBatchNorm, _TaskBatchNormBase


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of every process's copy of the sum reaches every
    process's summand, so the backward is itself an all-reduce of the upstream gradients.

    (``torch.distributed.nn.functional.all_reduce`` computes the same but is deprecated and warns
    with a ``FutureWarning`` on every call.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def _all_reduce(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    return _AllReduceSum.apply(tensor, group)


class _SyncStats:
    """Mixin: replaces local batch moments with moments over every process of ``process_group``.

    As in ``nn.SyncBatchNorm``, statistics are synchronized only in training mode: in eval mode
    (with ``track_running_stats=False``) each process normalizes with its local batch, so an
    evaluation that runs on one rank only cannot hang. Sums are accumulated in at least float32
    (and the per-process counts with them), then cast back to the input's dtype.
    """

    _native_single_task = False
    # the statistics pool every process's batch, so one local sample per task can be fine
    _local_batch_stats = False
    process_group: Any = None

    def _batch_moments(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        group = self.process_group
        if (
            not self.training  # type: ignore[attr-defined]
            or not (dist.is_available() and dist.is_initialized())
            or dist.get_world_size(group) == 1
        ):
            return super()._batch_moments(xs)  # type: ignore[misc]
        acc = torch.promote_types(xs.dtype, torch.float32)
        local = xs.shape[1] * xs.shape[3]
        count = torch.tensor([float(local)], dtype=acc, device=xs.device)
        sums = _all_reduce(torch.cat([xs.sum(dim=(1, 3), dtype=acc).flatten(), count]), group)
        total = sums[-1]
        mean = (sums[:-1] / total).view(xs.shape[0], xs.shape[2])
        centered = xs.to(acc) - mean[:, None, :, None]
        sq = _all_reduce(centered.square().sum(dim=(1, 3)), group)
        var = sq / total
        return var.to(xs.dtype), mean.to(xs.dtype), int(total.item())


class TaskSyncBatchNorm(_SyncStats, TaskBatchNorm):
    """:class:`TaskBatchNorm` with statistics synchronized across processes."""


class TaskSigmoidSyncBatchNorm(_SyncStats, TaskSigmoidBatchNorm):
    """:class:`TaskSigmoidBatchNorm` with statistics synchronized across processes."""


class DynamicWeightedSyncBatchNorm(_SyncStats, DynamicWeightedBatchNorm):
    """:class:`DynamicWeightedBatchNorm` with statistics synchronized across processes."""


class AdaINSyncBatchNorm(_SyncStats, AdaINBatchNorm):
    """:class:`AdaINBatchNorm` whose batch branch is synchronized (instance stats are per sample)."""


_SYNC_OF: dict[type, type] = {
    TaskBatchNorm: TaskSyncBatchNorm,
    TaskSigmoidBatchNorm: TaskSigmoidSyncBatchNorm,
    DynamicWeightedBatchNorm: DynamicWeightedSyncBatchNorm,
    AdaINBatchNorm: AdaINSyncBatchNorm,
}


def convert_sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every task-specific batch norm of a converted model synchronize across processes.

    Call it before wrapping the model in ``DistributedDataParallel``, as with
    ``nn.SyncBatchNorm.convert_sync_batchnorm``. Layers keep their parameters and buffers (the
    same tensor objects, so an optimizer built earlier stays valid); only their class changes.
    Returns the model.
    """
    for module in model.modules():
        if not isinstance(module, _TaskBatchNormBase) or isinstance(module, _SyncStats):
            continue
        sync_cls = _SYNC_OF.get(type(module))
        if sync_cls is None:
            raise TypeError(
                f"no synchronized variant of {type(module).__name__}; supported: "
                f"{sorted(c.__name__ for c in _SYNC_OF)}"
            )
        module.__class__ = sync_cls
        module.process_group = process_group
    return model
