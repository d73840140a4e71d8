"""Data parallelism: every process a full replica, gradients averaged over processes each step.

Every process holds a full replica, reads its own shard of each global batch, and averages the
step's gradients over processes. ``MTNORM_GRAD_SYNC`` (:func:`grad_sync`) chooses how; the default
``auto`` (:func:`resolve_grad_sync`) picks, per run, the path that fits the balancer:

* equal weighting, STL and loss weighting (UW, DWA, RLW, GLS, IMTL-L, log, FAMO, and
  ``log_losses`` over one of them: every balancer with ``requires_grads=False``) run on
  DistributedDataParallel (:mod:`mtnorm.train.ddp_model`): ONE DDP forward covers every task
  pass, and the one ``.backward()`` of ``sum_t w_t l_t`` (``w_t = 1`` for equal weighting) fires
  DDP's buckets, all-reduced while the rest of backward runs. Before it, the T loss values are
  averaged in one small all-reduce: loss weighting computes its weights from the global batch's
  losses (every rank gets the same ``w``, learned weights such as UW's move exactly as in one
  process), and the finiteness check sees the same values on every rank. Per step: the buckets
  + 1 (+ 1 used-parameter bitmap when the model declares unused parameters, see
  :func:`mtnorm.train.ddp_model.wrap`);
* gradient balancers (PCGrad, DB-MTL, MGDA, Nash-MTL, ...) use the flat path: they must average the
  per-task gradients ``G`` (T x P) *before* combining them (a balancer is nonlinear: PCGrad of
  averaged gradients is not the average of PCGrads), which DDP cannot do, and they take their
  gradients with ``torch.autograd.grad``, which DDP's reducer never sees.
  ``Balancer.backward(..., reduce=average_flat_)`` averages the loss values, ``G`` and every
  task-specific gradient in ONE flat all-reduce (:func:`average_flat_`, in buckets of at most
  :data:`BUCKET_BYTES`) before the method combines them: 1 collective per step.

The other values:

* ``flat``: the flat path for everything: equal weighting all-reduces every ``.grad`` and the T
  loss values in one buffer after backward (:func:`average_grads`, 1 collective); loss weighting
  averages the T loss values, then the gradient of its one weighted backward (2 collectives);
  gradient balancers as above. The same average as DDP's (a sum over ranks of each gradient
  element and a division by their number; DDP divides first), without the overlap of
  communication and backward;
* ``ddp``: the same as ``auto`` (a gradient balancer falls back to ``flat``, with a message);
* ``hooks``: the first path, a hook on every parameter averaging each gradient as it is produced
  (one collective per parameter per task pass), kept for comparison in
  ``benchmarks/bench_distributed.py``.

Every path adds one scalar per step, the stop flag (a signal to one rank stops all at the same
step).

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


GRAD_SYNCS = ("auto", "flat", "hooks", "ddp")

#: The largest all-reduce :func:`average_flat_` issues; longer buffers go in several (DDP's
#: default bucket is 25 MiB, chosen for overlap with backward, which a post-backward reduce does not
#: have, so fewer, larger buckets are better here; the cap bounds NCCL's temporary buffers).
BUCKET_BYTES = 256 * 2**20


def grad_sync() -> str:
    """How gradients are averaged, as requested (env ``MTNORM_GRAD_SYNC``, one of
    :data:`GRAD_SYNCS`): ``"auto"`` (default), ``"flat"``, ``"hooks"`` or ``"ddp"``; see the module
    docstring, and :func:`resolve_grad_sync` for the path a run takes."""
    name = os.environ.get("MTNORM_GRAD_SYNC", "auto")
    if name not in GRAD_SYNCS:
        raise ValueError(f"MTNORM_GRAD_SYNC={name!r}; choose one of {list(GRAD_SYNCS)}")
    return name


def resolve_grad_sync(requested: str, task_gradients: bool) -> str:
    """The path a run takes: ``"ddp"``, ``"flat"`` or ``"hooks"``.

    ``task_gradients``: the balancer combines per-task gradients (PCGrad, DB-MTL, ...), which must
    be averaged before they are combined, so it takes ``"flat"`` under ``"auto"`` and ``"ddp"``;
    equal weighting, STL and loss weighting (one backward of ``sum_t w_t l_t``) take ``"ddp"``.
    """
    if requested not in GRAD_SYNCS:
        raise ValueError(f"grad sync {requested!r}; choose one of {list(GRAD_SYNCS)}")
    if requested in ("auto", "ddp"):
        return "flat" if task_gradients else "ddp"
    return requested


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
