"""The adaptive task normalizations of the AdaBN paper (adaptive-batchnorm-mtl.txt §3).

* :class:`DynamicWeightedBatchNorm` (DW-BN): each task normalizes with a learned softmax mixture
  of all tasks' statistics.
* :class:`AdaINBatchNorm` (AdaIN-BN): a learned per-task, per-channel gate mixes instance-normalized
  and task-batch-normalized activations before the task's affine.

Both keep per-task running statistics and per-task ``weight``/``bias`` like TSBN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mtnorm.norm import _stats
from mtnorm.norm.batchnorm import TaskBatchNorm
from mtnorm.norm.routing import BATCHED


class DynamicWeightedBatchNorm(TaskBatchNorm):
    r"""DW-BN: task t normalizes with a learned mixture of every task's statistics.

    .. math:: w_{t\cdot} = \mathrm{softmax}(\lambda_{t\cdot}),\quad
              \tilde\mu_t = \sum_s w_{ts}\,\mu_s,\quad \tilde\sigma^2_t = \sum_s w_{ts}\,\sigma^2_s,
              \quad y = \gamma_t (x - \tilde\mu_t)/\sqrt{\tilde\sigma^2_t + \epsilon} + \beta_t

    The statistics mixed are the *batch* statistics of every task in a batched training pass (all
    tasks present), and otherwise the running statistics, except that a lone task pass in training
    uses its own batch statistics in its own slot. ``mix_logits`` ``[T, T]`` starts with
    ``self_weight`` on the diagonal of the softmax (the rest spread evenly), so each task begins
    close to TSBN. Running statistics are tracked per task, unmixed.
    """

    def __init__(
        self,
        num_features: int,
        tasks: Sequence[str],
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        self_weight: float = 0.9,
        spatial_dims: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, tasks, eps, momentum, affine, True, False, spatial_dims, device, dtype
        )
        t = self.num_tasks
        logits = torch.zeros(t, t, device=device, dtype=dtype)
        if t > 1:
            if not 0.0 < self_weight < 1.0:
                raise ValueError(f"self_weight must lie in (0, 1), got {self_weight}")
            logits.fill_diagonal_(math.log(self_weight * (t - 1) / (1.0 - self_weight)))
        self.mix_logits = nn.Parameter(logits)
        self._native_single_task = False

    def mixing(self) -> torch.Tensor:
        """The mixing matrix ``[T, T]``; row t holds the weights task t gives each task's statistics."""
        return torch.softmax(self.mix_logits, dim=1)

    def _moments(self, xs: torch.Tensor, route: int) -> tuple[torch.Tensor, torch.Tensor]:
        mix = self.mixing()
        if route != BATCHED:
            mix = mix[route : route + 1]
        if not self.training:
            return mix @ self.running_var, mix @ self.running_mean
        var, mean, count = self._batch_moments(xs)
        self._update(route, mean.detach(), var.detach(), count)
        if route == BATCHED:
            return mix @ var, mix @ mean
        # a lone task: its own batch statistics in its slot, the others' running statistics
        own = torch.zeros(self.num_tasks, 1, dtype=mean.dtype, device=mean.device)
        own[route] = 1.0
        all_var = torch.addcmul(self.running_var * (1 - own), own, var)
        all_mean = torch.addcmul(self.running_mean * (1 - own), own, mean)
        return mix @ all_var, mix @ all_mean

    def to_standard(self, task: str) -> nn.Module:
        """An eval-mode ``nn.BatchNorm`` whose running statistics are the task's mixture."""
        t = self.task_index(task)
        bn = self._standard_bn(t)
        with torch.no_grad():
            w = self.mixing()[t]
            bn.running_mean.copy_(w @ self.running_mean)
            bn.running_var.copy_(w @ self.running_var)
        return bn

    def extra_repr(self) -> str:
        return f"{self.num_features}, tasks={list(self.tasks)}, eps={self.eps}"


class AdaINBatchNorm(TaskBatchNorm):
    r"""AdaIN-BN: a per-task, per-channel gate between instance and task-batch normalization.

    .. math:: \rho_t = \sigma(r_t),\quad
              y = \gamma_t\big(\rho_t\,\mathrm{IN}(x) + (1-\rho_t)\,\hat x_t\big) + \beta_t

    where :math:`\hat x_t` is x normalized with task t's batch (or running) statistics and
    :math:`\mathrm{IN}(x)` normalizes each sample and channel over its spatial positions. For
    inputs ``[N, C]`` without spatial positions the instance branch normalizes each sample across
    its channels instead. ``gate_logit`` ``[T, C]`` starts at ``logit(in_weight)`` (default 0.1),
    so a converted network begins close to TSBN.
    """

    def __init__(
        self,
        num_features: int,
        tasks: Sequence[str],
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        in_weight: float = 0.1,
        spatial_dims: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, tasks, eps, momentum, affine, True, False, spatial_dims, device, dtype
        )
        if not 0.0 < in_weight < 1.0:
            raise ValueError(f"in_weight must lie in (0, 1), got {in_weight}")
        init = math.log(in_weight / (1.0 - in_weight))
        self.gate_logit = nn.Parameter(
            torch.full((self.num_tasks, num_features), init, device=device, dtype=dtype)
        )
        self._native_single_task = False

    @_stats.full_precision
    def _forward_chunks(self, x: torch.Tensor, route: int) -> torch.Tensor:
        chunks = self.num_tasks if route == BATCHED else 1
        xs = _stats.chunk_view(x, chunks, self.num_features)  # [K, B, C, L]
        var, mean = self._moments(xs, route)  # task statistics [K, C]
        weight, bias = self._params_for(route)
        gate = torch.sigmoid(self.gate_logit)
        if route != BATCHED:
            gate = gate[route : route + 1]
        if xs.shape[3] > 1:
            in_var, in_mean = torch.var_mean(xs, dim=3, keepdim=True, correction=0)
        else:
            in_var, in_mean = torch.var_mean(xs, dim=2, keepdim=True, correction=0)
        in_rstd = torch.rsqrt(in_var + self.eps)  # [K, B, C or 1, 1]
        bn_rstd = torch.rsqrt(var + self.eps)  # [K, C]
        g = gate[:, None, :, None]
        gamma = 1.0 if weight is None else weight[:, None, :, None]
        # y = x * a + b with a, b per (chunk, sample, channel): one pass over x after the statistics
        a = gamma * (g * in_rstd + (1 - g) * bn_rstd[:, None, :, None])
        b = -gamma * (g * in_rstd * in_mean + (1 - g) * (bn_rstd * mean)[:, None, :, None])
        if bias is not None:
            b = b + bias[:, None, :, None]
        return torch.addcmul(b, xs, a).view(x.shape)

    def importance(self) -> torch.Tensor:
        return self.weight.detach().abs()

    def to_standard(self, task: str) -> nn.Module:
        raise NotImplementedError(
            "AdaIN-BN mixes in instance normalization, which no standard BatchNorm computes; "
            "deploy the converted model with `mtnorm.use_task` instead"
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, tasks={list(self.tasks)}, eps={self.eps}"
