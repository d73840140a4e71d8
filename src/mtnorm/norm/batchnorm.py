"""Task-specific batch normalization: TSBN and the sigmoid-gated TSσBN.

Every task t keeps its own normalization statistics and its own affine parameters; the
convolutions around the layer stay shared. A layer runs one task (``use_task``) with PyTorch's
native ``F.batch_norm`` on that task's slice of the parameters and buffers, or all tasks at once
on a batch of T chunks (``forward_tasks(mode="batched")``) with one reduction and one fused
multiply-add over the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtnorm.norm import _stats
from mtnorm.norm.routing import BATCHED, TaskRouted

_BN_DIMS = {1: (2, 3), 2: (4,), 3: (5,)}


class TaskNorm(TaskRouted):
    """Base of every task-specific normalization layer.

    ``family`` is ``"batch"`` or ``"layer"``; :func:`mtnorm.param_groups` gives each family its own
    learning-rate multiplier.
    """

    family: str = "batch"

    def importance(self) -> torch.Tensor:
        """The task-filter importance ``[T, C]`` of this layer (paper §5): the gate or |gamma|."""
        raise NotImplementedError

    def to_standard(self, task: str) -> nn.Module:
        """A standard PyTorch layer computing this layer's eval-mode function for ``task``."""
        raise NotImplementedError


class _TaskBatchNormBase(TaskNorm):
    """Statistics, buffers and routing shared by the batch-norm family.

    Buffers follow ``nn.BatchNorm``: ``running_mean``/``running_var`` ``[S, C]`` and
    ``num_batches_tracked`` ``[S]``, with S = T (task statistics) or S = 1 (``share_stats``: one
    running estimate pooled over every task's passes). In training each pass always normalizes with
    its own batch statistics; ``share_stats`` changes only what is tracked and used in eval.
    """

    # Sync and adaptive subclasses compute statistics that are not one chunk's own (across
    # processes, or mixed across tasks), so they cannot use the native kernel.
    _native_single_task = True
    # batch statistics come from this process's chunk alone (the sync subclasses pool processes)
    _local_batch_stats = True

    def __init__(
        self,
        num_features: int,
        tasks: Sequence[str],
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        share_stats: bool = False,
        spatial_dims: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(tasks)
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if spatial_dims not in (None, 1, 2, 3):
            raise ValueError(f"spatial_dims must be None, 1, 2 or 3, got {spatial_dims}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.share_stats = share_stats
        self.spatial_dims = spatial_dims
        factory = {"device": device, "dtype": dtype}
        rows = 1 if share_stats else self.num_tasks
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(rows, num_features, **factory))
            self.register_buffer("running_var", torch.ones(rows, num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.zeros(rows, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    # -- the per-task affine part, defined by subclasses ------------------------------------
    def scale(self) -> torch.Tensor | None:
        """Per-task multiplicative parameter ``[T, C]`` applied after normalization."""
        raise NotImplementedError

    def shift(self) -> torch.Tensor | None:
        """Per-task additive parameter ``[T, C]``, or None."""
        raise NotImplementedError

    # -- statistics ----------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def _check_input_dim(self, x: torch.Tensor) -> None:
        allowed = _BN_DIMS[self.spatial_dims] if self.spatial_dims else (2, 3, 4, 5)
        if x.dim() not in allowed:
            raise ValueError(
                f"{type(self).__name__} expected a {' or '.join(f'{d}D' for d in allowed)} input, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expected {self.num_features} channels in dim 1, "
                f"got input of shape {tuple(x.shape)}"
            )

    frozen_stats = False
    """Always normalize with the running statistics, never update them (converted
    ``FrozenBatchNorm2d``: detection backbones freeze statistics; the per-task affine still trains)."""

    def _uses_batch_stats(self) -> bool:
        if self.frozen_stats:
            return False
        return self.training or not self.track_running_stats

    def _stat_rows(self, route: int) -> slice:
        """The rows of the running buffers that the pass(es) of ``route`` read and update."""
        if self.share_stats:
            return slice(0, 1)
        return slice(None) if route == BATCHED else slice(route, route + 1)

    def _batch_moments(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Biased variance, mean ``[K, C]`` of each chunk and the count behind each entry."""
        var, mean = _stats.chunk_moments(xs)
        return var, mean, xs.shape[1] * xs.shape[3]

    def _update(self, route: int, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        rows = self._stat_rows(route)
        _stats.update_running(
            self.running_mean[rows],
            self.running_var[rows],
            self.num_batches_tracked[rows],
            mean,
            var,
            count,
            self.momentum,
        )

    def _moments(self, xs: torch.Tensor, route: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Variance and mean ``[K, C]`` to normalize with; updates running statistics in training."""
        k = xs.shape[0]
        if self._uses_batch_stats():
            var, mean, count = self._batch_moments(xs)
            if self.training and self.track_running_stats:
                self._update(route, mean.detach(), var.detach(), count)
            return var, mean
        rows = self._stat_rows(route)
        return (
            self.running_var[rows].expand(k, -1),
            self.running_mean[rows].expand(k, -1),
        )

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.spatial_dims is None and not torch.compiler.is_compiling():
            # a converted SyncBatchNorm takes any input rank; extract needs the one it saw
            self.seen_spatial_dims = x.dim() - 2
        if self._compile_friendly():
            return self._forward_compiled(x)
        route = self._require_route()
        if self.batch_dim != 0 and route == BATCHED:
            raise ValueError(
                f"{type(self).__name__} normalizes over dim 0 (N of [N, C, ...]) but the batched pass "
                f"stacks tasks along dim {self.batch_dim}; use mode='sequential'"
            )
        if route != BATCHED and self._native_single_task:
            return self._forward_native(x, route)
        return self._forward_chunks(x, route)

    # -- torch.compile ---------------------------------------------------------------------------
    def _compile_friendly(self) -> bool:
        """Under ``torch.compile`` TSBN/TSσBN read the task as data (``task_id``), so one graph serves
        every task. ``momentum=None`` (a cumulative average needs the pass count as a Python
        number), DW-BN, AdaIN-BN and the sync layers take the eager path: one graph per task."""
        return (
            torch.compiler.is_compiling() and self._native_single_task and self.momentum is not None
        )

    def _forward_compiled(self, x: torch.Tensor) -> torch.Tensor:
        if not self.routed:
            self._require_route()  # raises the usual error
        scale, shift = self.scale(), self.shift()
        batch_stats = self._uses_batch_stats()
        update = self.training and self.track_running_stats and not self.frozen_stats
        momentum = self.momentum if batch_stats else 0.0
        if not self.batched:
            task = self.task_id.view(1).clone()
            row = torch.zeros_like(task) if self.share_stats else task
            w = None if scale is None else scale.index_select(0, task)[0]
            b = None if shift is None else shift.index_select(0, task)[0]
            if self.running_mean is None:
                return F.batch_norm(x, None, None, w, b, True, momentum, self.eps)
            rm = self.running_mean.index_select(0, row)[0]  # copies, updated by F.batch_norm
            rv = self.running_var.index_select(0, row)[0]
            y = F.batch_norm(x, rm, rv, w, b, batch_stats, momentum, self.eps)
            if update:
                with torch.no_grad():
                    self.running_mean.index_copy_(0, row, rm[None])
                    self.running_var.index_copy_(0, row, rv[None])
                    self.num_batches_tracked.index_add_(0, row, torch.ones_like(row))
            return y
        # batched: the T chunks in task order, each with its task's row, as T passes would run
        self._check_chunk_size(x, self.num_tasks)
        _stats.check_chunks(x, self.num_tasks, self.num_features)
        chunks = x.chunk(self.num_tasks, dim=0)
        if self.running_mean is None:
            running = [(None, None)] * self.num_tasks
        elif self.share_stats:
            shared = (self.running_mean[0].clone(), self.running_var[0].clone())
            running = [shared] * self.num_tasks  # updated in place, chunk after chunk
        else:
            running = [
                (self.running_mean[t].clone(), self.running_var[t].clone()) for t in range(self.num_tasks)
            ]
        outs = [
            F.batch_norm(
                c, rm, rv,
                None if scale is None else scale[t],
                None if shift is None else shift[t],
                batch_stats, momentum, self.eps,
            )
            for t, (c, (rm, rv)) in enumerate(zip(chunks, running))
        ]
        if update:
            with torch.no_grad():
                rows = running[:1] if self.share_stats else running
                self.running_mean.copy_(torch.stack([rm for rm, _ in rows]))
                self.running_var.copy_(torch.stack([rv for _, rv in rows]))
                self.num_batches_tracked.add_(1 if not self.share_stats else self.num_tasks)
        return torch.cat(outs)

    def _params_for(self, route: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        scale, shift = self.scale(), self.shift()
        if route != BATCHED:
            scale = None if scale is None else scale[route : route + 1]
            shift = None if shift is None else shift[route : route + 1]
        return scale, shift

    def _check_chunk_size(self, x: torch.Tensor, chunks: int) -> None:
        """PyTorch's own check (``F.batch_norm``): batch statistics need more than one value per
        channel. The batched kernels are called directly, so the check is repeated here per task
        chunk; without it a chunk of one sample writes NaN into the running variance."""
        if not (self.training and self._uses_batch_stats() and self._local_batch_stats):
            return
        values = (x.shape[0] // chunks) * x[0, 0].numel()
        if values <= 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got input size "
                f"{[x.shape[0] // chunks, *x.shape[1:]]} per task ({type(self).__name__}, batched "
                f"pass of {chunks} tasks); use a per-task batch of at least 2"
            )

    def _forward_chunks(self, x: torch.Tensor, route: int) -> torch.Tensor:
        self._check_chunk_size(x, self.num_tasks if route == BATCHED else 1)
        if route == BATCHED and self._native_single_task:
            return self._forward_native_chunks(x)
        return self._forward_reduced(x, route)

    @_stats.full_precision
    def _forward_reduced(self, x: torch.Tensor, route: int) -> torch.Tensor:
        """The path of the sync and adaptive subclasses: statistics over ``[K, B, C, L]`` in one
        reduction, in float32 for half inputs (:func:`_stats.full_precision`)."""
        chunks = self.num_tasks if route == BATCHED else 1
        xs = _stats.chunk_view(x, chunks, self.num_features)
        weight, bias = self._params_for(route)
        var, mean = self._moments(xs, route)
        scale, shift = _stats.normalizing_affine(mean, var, self.eps, weight, bias)
        return _stats.affine_apply(xs, scale, shift).view(x.shape)

    def _forward_native_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """A batched pass as T native batch-norm kernels on the T contiguous chunks of ``x``.

        Each chunk runs exactly the kernel of its task's sequential pass (``F.batch_norm``), so
        outputs, gradients and running-statistic updates (task order, ``momentum=None``,
        ``share_stats``) are those of T sequential passes by construction, in one autograd node
        (:func:`_stats.native_chunks_batch_norm`). Measured faster than one reduction over
        ``[T, B, C, L]`` with a closed-form backward, which needs several more passes over the
        activations than the native kernels (``benchmarks/bench_norm.py``, docs/benchmarks.md).
        """
        _stats.check_chunks(x, self.num_tasks, self.num_features)
        batch_stats = self._uses_batch_stats()
        rows = [0 if self.share_stats else task for task in range(self.num_tasks)]
        momenta = [self._count_pass(row) for row in rows]  # in task order, as T passes would
        running = [
            (None, None) if self.running_mean is None else (self.running_mean[r], self.running_var[r])
            for r in rows
        ]
        return _stats.native_chunks_batch_norm(
            x, self.scale(), self.shift(), running, momenta, batch_stats, self.eps
        )

    def _count_pass(self, row: int) -> float:
        """Count one training pass on buffer row ``row``; returns the momentum ``F.batch_norm`` needs.

        As in ``nn.BatchNorm``, ``momentum=None`` means a cumulative average: factor 1/n.
        """
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and not self.frozen_stats:
            self.num_batches_tracked[row].add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked[row])
        return momentum

    def _forward_native(self, x: torch.Tensor, task: int) -> torch.Tensor:
        row = 0 if self.share_stats else task
        momentum = self._count_pass(row)
        scale, shift = self.scale(), self.shift()
        return F.batch_norm(
            x,
            None if self.running_mean is None else self.running_mean[row],
            None if self.running_var is None else self.running_var[row],
            None if scale is None else scale[task],
            None if shift is None else shift[task],
            self._uses_batch_stats(),
            momentum,
            self.eps,
        )

    # -- standard-layer export -----------------------------------------------------------------
    def _standard_bn(self, task: int) -> nn.modules.batchnorm._BatchNorm:
        dims = self.spatial_dims or getattr(self, "seen_spatial_dims", None)
        if dims is None:
            raise ValueError(
                f"{type(self).__name__} was converted from a SyncBatchNorm, which takes 2-5D inputs, and "
                "has not seen one yet, so the BatchNorm1d/2d/3d class to extract is unknown; run one "
                "forward pass first (or convert with spatial_dims)"
            )
        cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        ref = self.scale() if self.scale() is not None else self.running_mean
        bn = cls(
            self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=True,
            track_running_stats=self.track_running_stats,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            scale, shift = self.scale(), self.shift()
            bn.weight.copy_(scale[task] if scale is not None else 1.0)
            bn.bias.copy_(shift[task] if shift is not None else 0.0)
            if self.track_running_stats:
                row = 0 if self.share_stats else task
                bn.running_mean.copy_(self.running_mean[row])
                bn.running_var.copy_(self.running_var[row])
                bn.num_batches_tracked.copy_(self.num_batches_tracked[row])
        return bn

    def to_standard(self, task: str) -> nn.Module:
        return self._standard_bn(self.task_index(task))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, tasks={list(self.tasks)}, eps={self.eps}, "
            f"momentum={self.momentum}, track_running_stats={self.track_running_stats}, "
            f"share_stats={self.share_stats}"
        )


class TaskBatchNorm(_TaskBatchNormBase):
    r"""TSBN: batch normalization with per-task statistics and per-task affine parameters.

    .. math:: \mathrm{TSBN}(x; \gamma_t, \beta_t) = \gamma_t \hat x_t + \beta_t,\quad
              \hat x_t = (x - \mu_{B,t}) / \sqrt{\sigma_{B,t}^2 + \epsilon}

    (paper Eq. 1 with every quantity indexed by the task). Parameters ``weight``/``bias`` are
    ``[T, C]`` (ones / zeros, like ``nn.BatchNorm``); ``affine=False`` drops them.
    """

    def __init__(
        self,
        num_features: int,
        tasks: Sequence[str],
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        share_stats: bool = False,
        spatial_dims: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, tasks, eps, momentum, track_running_stats, share_stats, spatial_dims,
            device, dtype,
        )
        self.affine = affine
        if affine:
            shape = (self.num_tasks, num_features)
            self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def scale(self) -> torch.Tensor | None:
        return self.weight

    def shift(self) -> torch.Tensor | None:
        return self.bias

    def importance(self) -> torch.Tensor:
        if self.weight is None:
            raise ValueError("a TaskBatchNorm with affine=False has no importance")
        return self.weight.detach().abs()


class TaskSigmoidBatchNorm(_TaskBatchNormBase):
    r"""TSσBN: task-specific batch normalization with a sigmoid gate (paper Eq. 3).

    .. math:: \mathrm{TS\sigma BN}(x; \gamma_t) = \sigma(\gamma_t)\,\hat x_t,\quad
              \hat x_t = (x - \mu_{B,t}) / \sqrt{\sigma_{B,t}^2 + \epsilon}

    ``gamma`` is ``[T, C]`` and starts at 0 (gate 0.5), as the paper does from scratch; the gate
    ``sigmoid(gamma)`` is the task-filter importance of §5. Following σBN there is no shift;
    ``shift=True`` adds a per-task ``beta`` (zeros). Train ``gamma`` with a larger learning rate
    (``mtnorm.param_groups``, α = 100 in the paper).
    """

    def __init__(
        self,
        num_features: int,
        tasks: Sequence[str],
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        shift: bool = False,
        track_running_stats: bool = True,
        share_stats: bool = False,
        spatial_dims: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, tasks, eps, momentum, track_running_stats, share_stats, spatial_dims,
            device, dtype,
        )
        shape = (self.num_tasks, num_features)
        self.gamma = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        if shift:
            self.beta = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("beta", None)

    def scale(self) -> torch.Tensor:
        return torch.sigmoid(self.gamma)

    def shift(self) -> torch.Tensor | None:
        return self.beta

    def importance(self) -> torch.Tensor:
        return torch.sigmoid(self.gamma.detach())
