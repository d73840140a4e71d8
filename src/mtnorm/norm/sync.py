r"""Per-task synchronized batch normalization for DistributedDataParallel.

Like ``nn.SyncBatchNorm``, but per task: each task's batch statistics are computed over the union
of that task's chunks on every process, so T tasks on N processes normalize exactly as one process
on the concatenated batch would.

Each process i first reduces its own chunk, for every task and channel: the count :math:`n_i`, the
mean :math:`m_i` and the squared deviations from that mean, :math:`M2_i = \sum (x - m_i)^2`. One
all-gather of the packed ``[m_i, M2_i, n_i]`` hands every process all of them, and each process
combines them with the pairwise formula of Chan, Golub and LeVeque (1979, "Updating formulae and a
pairwise algorithm for computing sample variances"), which never subtracts two large sums:

.. math:: n = \sum_i n_i,\qquad \mu = \frac{1}{n} \sum_i n_i m_i,\qquad
          M2 = \sum_i M2_i + \sum_i n_i (m_i - \mu)^2,\qquad \sigma^2 = \frac{M2}{n}

(the biased variance, which the local layers also normalize with). So a layer costs ONE collective
per pass in forward (the all-gather; a batched pass covers every task at once) and ONE in backward
(an all-reduce of the gathered statistics' gradient), as ``nn.SyncBatchNorm`` does, which also
gathers per-process statistics. Both carry gradients (:class:`_AllGather`).

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


class _AllGather(torch.autograd.Function):
    """Differentiable all-gather: a ``[k]`` tensor on every process gives ``[world, k]``, row r
    being rank r's tensor.

    Row r of *every* process's output is rank r's input, so rank r's input gradient is the sum over
    processes of row r of their upstream gradients: one all-reduce of the ``[world, k]`` gradient,
    of which each rank keeps its row (:class:`_SumRow`; gloo has no reduce-scatter).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.contiguous()
        out = tensor.new_empty(dist.get_world_size(group), tensor.numel())
        # the list form into the rows of one tensor: gloo and nccl, and not deprecated
        # (``all_gather_into_tensor`` warns in torch 2.13)
        dist.all_gather(list(out.unbind(0)), tensor, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _SumRow.apply(grad, ctx.group), None


class _SumRow(torch.autograd.Function):
    """The adjoint of :class:`_AllGather`: ``[world, k]`` on every process, summed over processes
    (one all-reduce), of which this rank keeps its own row ``[k]``.

    Its backward is an all-gather again, so a double backward (a gradient penalty) also works.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total[dist.get_rank(group)].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllGather.apply(grad, ctx.group), None


def _local_pack(xs: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """This process's ``[m_i, M2_i, n_i]`` for ``xs = [K, B, C, L]``: ``2 K C + 1`` values.

    ``m_i`` and ``M2_i = n_i var_i`` (``[K, C]`` each, flattened) come from ``torch.var_mean`` in
    ``acc``: a stable reduction (deviations from the local mean, not ``E[x^2] - E[x]^2``) that,
    unlike an explicit two-pass ``(x - m_i)^2``, keeps no centered copy of the activations for
    backward. (An empty chunk never gets here: its ``[K, 0, C, -1]`` view is rejected earlier.)
    """
    n_i = xs.shape[1] * xs.shape[3]
    var, mean = torch.var_mean(xs.to(acc), dim=(1, 3), correction=0)
    count = torch.tensor([float(n_i)], dtype=acc, device=xs.device)
    return torch.cat([mean.flatten(), (var * n_i).flatten(), count])


def _combine(packs: torch.Tensor, k: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Biased variance and mean ``[K, C]`` and the total count from every process's pack
    ``[world, 2 K C + 1]`` (Chan, Golub and LeVeque, 1979):

    .. math:: n = \sum_i n_i,\quad \mu = \sum_i \tfrac{n_i}{n} m_i,\quad
              \sigma^2 = \frac{1}{n}\Big(\sum_i M2_i + \sum_i n_i (m_i - \mu)^2\Big)

    The between-process term uses differences of means, which are small where the data share a
    large offset, so no cancellation of large numbers occurs.
    """
    kc = k * c
    means = packs[:, :kc].view(-1, k, c)
    m2s = packs[:, kc : 2 * kc].view(-1, k, c)
    counts = packs[:, -1].detach()  # sample counts: constants, no gradient
    total = counts.sum()
    weights = (counts / total)[:, None, None]
    mean = (weights * means).sum(0)
    between = (counts[:, None, None] * (means - mean).square()).sum(0)
    var = (m2s.sum(0) + between) / total
    return var, mean, total


class _SyncStats:
    """Mixin: replaces local batch moments with moments over every process of ``process_group``.

    As in ``nn.SyncBatchNorm``, statistics are synchronized only in training mode: in eval mode
    (with ``track_running_stats=False``) each process normalizes with its local batch, so an
    evaluation that runs on one rank only cannot hang.

    A synchronizing layer computes in at least float32 (moments, their combination, counts, and
    the normalization itself) on a half input cast up once and returns half
    (``_stats.full_precision`` on the reduced path it runs), as the native batch-norm kernel of
    the local path does internally (its mean and inverse deviation are float32; its input gradient
    is rounded to half once). Left in half under fp16 loss scaling, the normalization's backward
    overflows and loses digits where the native one does not (issue 12; toy benchmark, step 1,
    scale 2**16): the backward of ``rsqrt(var + eps)`` in fp16 is ``0.5 * 277 * 9**3 = 1.0e5 >
    65504``, inf on one rank, so both ranks skip a step one process takes; and the input gradient
    is the fp16 sum of two separately rounded, nearly cancelling terms (the affine's and the
    statistics'), off by 1.5e-2 of its largest element in tests/norm/test_sync.py (now 1.7e-4).
    """

    _native_single_task = False
    # the statistics pool every process's batch, so one local sample per task can be fine
    _local_batch_stats = False
    process_group: Any = None

    def _synchronizes(self) -> bool:
        """Whether this pass pools statistics over processes (else the layer is its local one)."""
        return (
            self.training  # type: ignore[attr-defined]
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def _batch_moments(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Moments of ``xs = [K, B, C, L]`` over every process: one all-gather (see the module)."""
        group = self.process_group
        if not self._synchronizes():
            return super()._batch_moments(xs)  # type: ignore[misc]
        acc = torch.promote_types(xs.dtype, torch.float32)
        packs = _AllGather.apply(_local_pack(xs, acc), group)
        var, mean, total = _combine(packs, xs.shape[0], xs.shape[2])
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
