"""Task-specific layer normalization for transformer blocks: task LN and σLN.

LayerNorm has no batch statistics, so only the affine part is per task. A batched pass runs the
plain normalization once on the whole ``[T*B, ...]`` batch and applies every task's affine to its
chunk in one fused multiply-add.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtnorm.norm.batchnorm import TaskNorm
from mtnorm.norm.routing import BATCHED


def _batched_affine(
    y: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    tasks: int,
    batch_dim: int,
    normalized_dims: int,
) -> torch.Tensor:
    """``y * scale[t] + shift[t]`` on task chunk t of ``y`` (chunks along ``batch_dim``), in one
    fused multiply-add; parameters are ``[T, *normalized_shape]``."""
    if scale is None and shift is None:
        return y
    d = batch_dim % y.dim()
    if y.shape[d] % tasks:
        raise ValueError(
            f"a batched multi-task pass needs a batch divisible by the {tasks} tasks along dim {d}, "
            f"got shape {tuple(y.shape)}"
        )
    ys = y.unflatten(d, (tasks, -1))  # [..., T, B, ..., *normalized_shape]
    between = ys.dim() - d - 1 - normalized_dims
    if between < 1:
        raise ValueError(f"the batch dim {batch_dim} falls inside the normalized dims of {tuple(y.shape)}")

    def view(p: torch.Tensor) -> torch.Tensor:
        return p.reshape(*([1] * d), tasks, *([1] * between), *p.shape[1:])

    if scale is None:
        out = ys + view(shift)
    elif shift is None:
        out = ys * view(scale)
    else:
        out = torch.addcmul(view(shift), ys, view(scale))
    return out.flatten(d, d + 1)


class _TaskLayerNormBase(TaskNorm):
    family = "layer"

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        tasks: Sequence[str],
        eps: float = 1e-5,
    ) -> None:
        super().__init__(tasks)
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps

    def scale(self) -> torch.Tensor | None:
        raise NotImplementedError

    def shift(self) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(
                f"{type(self).__name__} normalizes trailing shape {list(self.normalized_shape)}, "
                f"got input of shape {tuple(x.shape)}"
            )
        scale, shift = self.scale(), self.shift()
        if torch.compiler.is_compiling():
            # the task as data: one compiled graph serves every task (see TaskRouted)
            if not self.routed:
                self._require_route()
            if not self.batched:
                task = self.task_id.view(1).clone()
                return F.layer_norm(
                    x,
                    self.normalized_shape,
                    None if scale is None else scale.index_select(0, task)[0],
                    None if shift is None else shift.index_select(0, task)[0],
                    self.eps,
                )
        else:
            route = self._require_route()
            if route != BATCHED:
                return F.layer_norm(
                    x,
                    self.normalized_shape,
                    None if scale is None else scale[route],
                    None if shift is None else shift[route],
                    self.eps,
                )
        return _batched_affine(
            F.layer_norm(x, self.normalized_shape, None, None, self.eps),
            scale, shift, self.num_tasks, self.batch_dim, len(self.normalized_shape),
        )

    def to_standard(self, task: str) -> nn.Module:
        t = self.task_index(task)
        scale, shift = self.scale(), self.shift()
        ref = scale if scale is not None else shift
        ln = nn.LayerNorm(
            self.normalized_shape,
            eps=self.eps,
            elementwise_affine=scale is not None or shift is not None,
            bias=shift is not None,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        with torch.no_grad():
            if ln.weight is not None:
                ln.weight.copy_(scale[t] if scale is not None else 1.0)
            if ln.bias is not None:
                ln.bias.copy_(shift[t])
        return ln

    def extra_repr(self) -> str:
        return f"{list(self.normalized_shape)}, tasks={list(self.tasks)}, eps={self.eps}"


class TaskLayerNorm(_TaskLayerNormBase):
    r"""Layer normalization with per-task affine parameters.

    .. math:: y = \gamma_t \odot (x - \mu(x)) / \sqrt{\sigma^2(x) + \epsilon} + \beta_t

    ``weight``/``bias`` have shape ``[T, *normalized_shape]``.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        tasks: Sequence[str],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, tasks, eps)
        shape = (self.num_tasks, *self.normalized_shape)
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shape, **factory))
            self.bias = nn.Parameter(torch.zeros(shape, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def scale(self) -> torch.Tensor | None:
        return self.weight

    def shift(self) -> torch.Tensor | None:
        return self.bias

    def importance(self) -> torch.Tensor:
        if self.weight is None:
            raise ValueError("a TaskLayerNorm without elementwise_affine has no importance")
        return self.weight.detach().abs().reshape(self.num_tasks, -1)


class TaskSigmoidLayerNorm(_TaskLayerNormBase):
    r"""σLN: layer normalization with a per-task sigmoid gate (the transformer form of TSσBN).

    .. math:: y = \sigma(\gamma_t) \odot \mathrm{LN}(x) + \beta_t

    ``gamma`` starts at 0 (gate 0.5); ``shift=True`` (the default here, as transformer blocks rely
    on the LayerNorm bias) adds a per-task ``beta``.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        tasks: Sequence[str],
        eps: float = 1e-5,
        shift: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(normalized_shape, tasks, eps)
        shape = (self.num_tasks, *self.normalized_shape)
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
        return torch.sigmoid(self.gamma.detach()).reshape(self.num_tasks, -1)
