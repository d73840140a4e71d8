"""Task-specific RMS normalization (Llama-style transformers): task RMSNorm and σRMSNorm.

RMSNorm has no mean subtraction, no bias and no batch statistics:
``y = x / sqrt(mean(x^2) + eps) * w``, the mean over the trailing ``normalized_shape``. Only the
scale is per task. A batched pass normalizes the whole ``[T*B, ...]`` batch once and scales each
task's chunk in one multiply.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtnorm.norm.batchnorm import TaskNorm
from mtnorm.norm.layernorm import _batched_affine


class _TaskRMSNormBase(TaskNorm):
    # transformer norms share the LayerNorm learning-rate group (param_groups' layernorm_lr_mult)
    family = "layer"

    def __init__(
        self, normalized_shape: int | Sequence[int], tasks: Sequence[str], eps: float | None
    ) -> None:
        super().__init__(tasks)
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps  # None: torch.finfo(x.dtype).eps, as nn.RMSNorm

    def scale(self) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(
                f"{type(self).__name__} normalizes trailing shape {list(self.normalized_shape)}, "
                f"got input of shape {tuple(x.shape)}"
            )
        scale = self.scale()
        if torch.compiler.is_compiling():
            if not self.routed:
                self._require_route()
            if not self.batched:
                task = self.task_id.view(1).clone()  # saved for backward: a copy, not the route
                w = None if scale is None else scale.index_select(0, task)[0]
                return F.rms_norm(x, self.normalized_shape, w, self.eps)
        elif not self.batched:
            route = self._require_route()
            return F.rms_norm(x, self.normalized_shape, None if scale is None else scale[route], self.eps)
        y = F.rms_norm(x, self.normalized_shape, None, self.eps)
        return _batched_affine(y, scale, None, self.num_tasks, self.batch_dim, n)

    def to_standard(self, task: str) -> nn.Module:
        t = self.task_index(task)
        scale = self.scale()
        norm = nn.RMSNorm(
            self.normalized_shape,
            eps=self.eps,
            elementwise_affine=scale is not None,
            device=None if scale is None else scale.device,
            dtype=None if scale is None else scale.dtype,
        )
        if scale is not None:
            with torch.no_grad():
                norm.weight.copy_(scale[t])
        return norm

    def extra_repr(self) -> str:
        return f"{list(self.normalized_shape)}, tasks={list(self.tasks)}, eps={self.eps}"


class TaskRMSNorm(_TaskRMSNormBase):
    r"""RMS normalization with a per-task scale.

    .. math:: y = \gamma_t \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}

    ``weight`` has shape ``[T, *normalized_shape]``.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        tasks: Sequence[str],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, tasks, eps)
        if elementwise_affine:
            shape = (self.num_tasks, *self.normalized_shape)
            self.weight = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def scale(self) -> torch.Tensor | None:
        return self.weight

    def importance(self) -> torch.Tensor:
        if self.weight is None:
            raise ValueError("a TaskRMSNorm without elementwise_affine has no importance")
        return self.weight.detach().abs().reshape(self.num_tasks, -1)


class TaskSigmoidRMSNorm(_TaskRMSNormBase):
    r"""σRMSNorm: RMS normalization with a per-task sigmoid gate (the σLN of RMS-normed models).

    .. math:: y = \sigma(\gamma_t) \odot x / \sqrt{\mathrm{mean}(x^2) + \epsilon}

    ``gamma`` starts at 0 (gate 0.5), or at ``logit(w)`` of a pretrained scale (``convert``).
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        tasks: Sequence[str],
        eps: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, tasks, eps)
        shape = (self.num_tasks, *self.normalized_shape)
        self.gamma = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def scale(self) -> torch.Tensor:
        return torch.sigmoid(self.gamma)

    def importance(self) -> torch.Tensor:
        return torch.sigmoid(self.gamma.detach()).reshape(self.num_tasks, -1)
