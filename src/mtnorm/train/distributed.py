"""Data parallelism: every process a full replica, one flat all-reduce of gradients per step.

Design: every process holds a full replica, reads its own shard of each global batch, and
averages the step's gradients over processes with ONE flat all-reduce (:func:`average_flat_`, in
buckets of at most :data:`BUCKET_BYTES`), not one collective per parameter:

* equal weighting (one backward of the summed loss): after backward, every ``.grad`` and the T
  loss values (for the logs and the finiteness check) are flattened into one buffer, averaged
  and written back (:func:`average_grads`): 1 collective per step;
* loss weighting (UW, DWA, ...): the weights need the global batch's losses, so the T loss values
  are averaged first, then the gradient of the one weighted backward: 2 collectives per step;
* gradient balancers (PCGrad, DB-MTL, ...): ``Balancer.backward(..., reduce=average_flat_)``
  averages the loss values, the per-task gradients ``G`` (T x P) of the shared parameters and
  every task-specific gradient in one collective *before* the method combines them (a balancer
  is nonlinear: PCGrad of averaged gradients is not the average of PCGrads): 1 per step.

Plus one scalar per step, the stop flag (a signal to one rank stops all at the same step).

DistributedDataParallel is not the default: a step here is several forward passes (one per task,
sequential, each with its own graph) and, with gradient balancers, per-task gradients taken by
``torch.autograd.grad``, which DDP's reducer (it hooks ``.backward()`` into ``.grad`` and expects
one forward per backward) does not see. The flat reduce does the same arithmetic (a sum over
ranks of each gradient element, then a division) without overlap of communication and backward.

The previous path, a hook on every parameter averaging each gradient as it is produced (one
collective per parameter per task pass), stays available with ``MTNORM_GRAD_SYNC=hooks`` (for
comparison in ``benchmarks/bench_distributed.py``). ``MTNORM_GRAD_SYNC=ddp`` runs equal weighting
on DistributedDataParallel, whose buckets overlap with backward (:mod:`mtnorm.train.ddp_model`;
other balancers then use the flat path).

Norm statistics are synchronized with :func:`mtnorm.convert_sync` (task norms) or
``nn.SyncBatchNorm`` (shared norms).

Launch with ``torchrun --nproc_per_node=N -m mtnorm train CONFIG``: the ``RANK``, ``WORLD_SIZE``
and ``MASTER_ADDR``/``MASTER_PORT`` variables it sets are all this module reads (and
``MTNORM_GRAD_SYNC``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
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


GRAD_SYNCS = ("flat", "hooks", "ddp")

#: The largest all-reduce :func:`average_flat_` issues; longer buffers go in several (DDP's
#: default bucket is 25 MiB, chosen for overlap with backward, which a post-backward reduce does not
#: have, so fewer, larger buckets are better here; the cap bounds NCCL's temporary buffers).
BUCKET_BYTES = 256 * 2**20


def grad_sync() -> str:
    """How gradients are averaged (env ``MTNORM_GRAD_SYNC``): ``"flat"`` (default), ``"hooks"`` or
    ``"ddp"`` (equal weighting only, :mod:`mtnorm.train.ddp_model`; others use ``"flat"``)."""
    name = os.environ.get("MTNORM_GRAD_SYNC", "flat")
    if name not in GRAD_SYNCS:
        raise ValueError(f"MTNORM_GRAD_SYNC={name!r}; choose one of {list(GRAD_SYNCS)}")
    return name


def average(grad: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of a gradient over the default process group (a new tensor); the per-parameter
    hook of the ``hooks`` path."""
    out = grad.clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


def average_flat_(flat: torch.Tensor, bucket_bytes: int | None = None) -> torch.Tensor:
    """All-reduce mean, in place, of a contiguous 1-D tensor: one collective per
    ``bucket_bytes`` (default :data:`BUCKET_BYTES`) chunk; returns ``flat``."""
    if not flat.is_contiguous() or flat.dim() != 1:
        raise ValueError("average_flat_ needs a contiguous 1-D tensor")
    cap = max(1, (bucket_bytes or BUCKET_BYTES) // flat.element_size())
    for chunk in flat.split(cap):
        dist.all_reduce(chunk)
    return flat.div_(dist.get_world_size())


def average_grads(
    params: Iterable[torch.Tensor], head: torch.Tensor | None = None, bucket_bytes: int | None = None
) -> torch.Tensor | None:
    """Average every ``.grad`` of ``params`` over processes through one flat buffer per dtype.

    ``head`` (e.g. the T loss values) rides in the same buffer; its average is returned. Parameters
    whose ``.grad`` is ``None`` are skipped: every process must have the same ones (the same model
    and tasks give the same graph).
    """
    grads = [p.grad for p in params if p.grad is not None]
    tensors = ([head] if head is not None else []) + grads
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for idx in by_dtype.values():
        flat = average_flat_(torch.cat([tensors[i].reshape(-1) for i in idx]), bucket_bytes)
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = piece.view_as(tensors[i])
    offset = 1 if head is not None else 0
    with torch.no_grad():
        for g, avg in zip(grads, out[offset:]):
            g.copy_(avg)
    return out[0] if head is not None else None


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
