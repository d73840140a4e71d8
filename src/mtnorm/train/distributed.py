"""Data parallelism without DistributedDataParallel.

Design: every process holds a full replica, reads its own shard of each global batch, and
averages each gradient over processes as it is produced (a hook, see
:mod:`mtnorm.train.gradients`). DDP is not used because a step here is several forward passes
(one per task, sequential) and, with gradient balancers, several backward passes, which DDP's
reducer (one all-reduce per bucket per backward, unused-parameter tracking) does not support
cleanly; averaging per gradient makes every per-task gradient the global-batch gradient *before* a
balancer combines them, so each process computes the same update. Norm statistics are synchronized
with :func:`mtnorm.convert_sync` (task norms) or ``nn.SyncBatchNorm`` (shared norms).

Launch with ``torchrun --nproc_per_node=N -m mtnorm train CONFIG``: the ``RANK``, ``WORLD_SIZE``
and ``MASTER_ADDR``/``MASTER_PORT`` variables it sets are all this module reads.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mtnorm.norm import convert_sync


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_from_env(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA).

    Returns a one-process :class:`World` when no ``WORLD_SIZE`` > 1 is set or a group already
    exists with one member.
    """
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size())


def average(grad: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of a gradient over the default process group (a new tensor)."""
    out = grad.clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Synchronized norms and identical initial parameters on every process.

    Task-specific norms synchronize on any backend. Shared BatchNorms become ``nn.SyncBatchNorm``
    only on CUDA, where PyTorch supports it; on CPU they keep per-process statistics (a warning
    says so), which makes shared-BN methods (STL, HPS) differ slightly from one-process runs.
    """
    convert_sync(model)
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules()):
        warnings.warn(
            "distributed on CPU: shared BatchNorm layers use per-process batch statistics "
            "(nn.SyncBatchNorm needs CUDA); task-specific norms are synchronized",
            stacklevel=2,
        )
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
    return model


def shard(indices: torch.Tensor, world: World) -> torch.Tensor:
    """This process's contiguous share of a global batch's indices (sizes differ by at most 1)."""
    return indices.tensor_split(world.size)[world.rank]


def all_mean(value: float, device: torch.device) -> float:
    """Mean of a Python number over processes (for logging)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()
