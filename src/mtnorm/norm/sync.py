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


class _SyncStats:
    """Mixin: replaces local batch moments with moments over every process of ``process_group``."""

    _native_single_task = False
    _fused_batch_stats = False
    process_group: Any = None

    def _batch_moments(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        group = self.process_group
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return super()._batch_moments(xs)  # type: ignore[misc]
        from torch.distributed.nn.functional import all_reduce

        local = xs.shape[1] * xs.shape[3]
        count = torch.tensor([float(local)], dtype=xs.dtype, device=xs.device)
        sums = all_reduce(torch.cat([xs.sum(dim=(1, 3)).flatten(), count]), group=group)
        total = sums[-1]
        mean = (sums[:-1] / total).view(xs.shape[0], xs.shape[2])
        centered = xs - mean[:, None, :, None]
        sq = all_reduce(centered.square().sum(dim=(1, 3)), group=group)
        return sq / total, mean, int(total.item())


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
