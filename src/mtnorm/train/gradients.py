"""Gradient transforms applied as each gradient is produced: loss-scale removal and averaging.

Balancers compute per-task gradients inside ``Balancer.backward`` (several ``autograd.grad``
calls), so transforms that must act on *every per-task gradient before aggregation* cannot run
after backward. They run as parameter hooks instead, which PyTorch calls for ``.backward()`` and
``torch.autograd.grad`` alike, on each parameter's gradient as soon as it is computed:

* fp16 loss scaling: losses pass through :func:`scale_grad` (identity forward, gradient times S
  backward) so the half-precision backward does not underflow, and the hook divides by S, so the
  balancer sees unscaled per-task gradients and the true loss values;
* data parallelism, only with ``MTNORM_GRAD_SYNC=hooks`` (the first path, kept for comparison):
  the hook all-reduces (averages) the gradient over processes, so every process hands the
  balancer the per-task gradients of the global batch, at one collective per parameter and task
  pass. The default averages with DistributedDataParallel's buckets (equal and loss weighting) or
  one flat collective per step (gradient balancers, ``Balancer.backward(reduce=...)``; see
  :mod:`mtnorm.train.distributed`), and the hooks then only unscale: a tensor hook runs before
  the gradient is accumulated into ``.grad``, so DDP's reducer, which fires after, copies the
  unscaled gradient into its bucket.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, but the gradient flowing back through it is multiplied by ``scale``."""
    return _ScaleGrad.apply(x, scale)


class GradientTransform:
    """Hooks on parameters dividing their gradients by the loss scale and averaging over processes.

    ``scale`` is read at hook time, so the trainer updates it between steps; ``reduce`` is a
    callable (e.g. an all-reduce mean) or ``None``. :meth:`remove` detaches the hooks.
    """

    def __init__(self, params: Iterable[nn.Parameter], reduce=None) -> None:  # noqa: ANN001
        self.scale = 1.0
        self.reduce = reduce
        self._handles = [p.register_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            grad = self.reduce(grad)
        if self.scale != 1.0:
            grad = grad / self.scale
        return grad

    @property
    def active(self) -> bool:
        return self.reduce is not None or self.scale != 1.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
