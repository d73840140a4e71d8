"""Loss-based methods: each maps the losses of a step to task weights ``w``; ``d = sum_t w_t g_t``.

They never need per-task gradients, so :meth:`~mtnorm.balance.Balancer.backward` runs one
backward of ``sum_t w_t l_t`` (``w`` treated as constants). Methods whose weights are learned by
the trainer's optimizer (UW, IMTL-L) hold them as parameters and add the gradient of their own
objective to ``.grad`` on every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mtnorm.balance.base import LossWeighting


class EW(LossWeighting):
    """Equal weighting: ``w_t = 1``, so ``d = sum_t g_t``, the gradient of the summed loss."""

    def loss_weights(self, losses: Tensor) -> Tensor:
        return torch.ones_like(losses)


class _LearnedLogScale(LossWeighting):
    """Shared machinery of UW and IMTL-L: one learnable scalar ``s_t`` per task, initialised at 0."""

    def __init__(self, tasks: Sequence[str] | None = None) -> None:
        if tasks is None:
            raise ValueError(
                f"{type(self).__name__} learns one parameter per task; pass tasks=[...] so they "
                "exist before the optimizer is built"
            )
        super().__init__(tasks)
        self.log_scale = nn.Parameter(torch.zeros(len(self.tasks)))

    def _add_grad(self, grad: Tensor) -> None:
        grad = grad.detach().to(self.log_scale)
        if self.log_scale.grad is None:
            self.log_scale.grad = grad
        else:
            self.log_scale.grad.add_(grad)


class UW(_LearnedLogScale):
    """Uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018), homoscedastic form.

    With a learnable log-variance ``s_t`` per task (``log_scale``) the objective is
    ``sum_t exp(-s_t) l_t + s_t``, so ``w_t = exp(-s_t)`` and
    ``d(objective)/d s_t = 1 - exp(-s_t) l_t``, which every step adds to ``log_scale.grad``.
    Add ``balancer.parameters()`` to the optimizer.
    """

    positive_losses = True

    def loss_weights(self, losses: Tensor) -> Tensor:
        w = torch.exp(-self.log_scale.detach()).to(losses)
        self._add_grad(1.0 - w * losses)
        return w


class IMTLL(_LearnedLogScale):
    """IMTL-L, the loss half of IMTL (Liu et al., ICLR 2021).

    Learnable ``s_t`` (``log_scale``): the objective ``sum_t exp(s_t) l_t - s_t`` makes every scaled
    loss ``exp(s_t) l_t`` tend to 1. ``w_t = exp(s_t)``; ``d/d s_t = exp(s_t) l_t - 1`` goes to
    ``log_scale.grad``. At its optimum in ``s`` it is the log transform (DB-MTL, Proposition 3.1).
    """

    positive_losses = True

    def loss_weights(self, losses: Tensor) -> Tensor:
        w = torch.exp(self.log_scale.detach()).to(losses)
        self._add_grad(w * losses - 1.0)
        return w


class DWA(LossWeighting):
    """Dynamic weight average (Liu, Johns and Davison, MTAN, CVPR 2019).

    ``w_t(k) = T exp(r_t / tau) / sum_i exp(r_i / tau)`` with ``r_t = l_t(k-1) / l_t(k-2)``, the
    rate at which task t's loss went down; ``w = 1`` for the first two steps. The paper averages
    losses over an epoch; here ``k`` counts calls, so call :meth:`observe` once per epoch with the
    epoch's mean losses (and ``track_steps=False``) to follow the paper exactly.

    State: ``history``, the last two loss vectors (``2 x T``, oldest first).
    """

    positive_losses = True
    requires_positive_losses = True
    _state = ("history",)

    def __init__(
        self, temperature: float = 2.0, track_steps: bool = True, tasks: Sequence[str] | None = None
    ) -> None:
        super().__init__(tasks)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.track_steps = track_steps
        self.history: Tensor | None = None

    def observe(self, losses: Tensor) -> None:
        """Record a loss vector (the step's losses, or an epoch's mean losses)."""
        losses = torch.as_tensor(losses).detach().clone()
        prev = self.history if self.history is not None else losses[None]
        self.history = torch.cat([prev[-1:], losses[None]])

    def loss_weights(self, losses: Tensor) -> Tensor:
        if self.history is None or len(self.history) < 2:
            w = torch.ones_like(losses)
        else:
            ratio = self.history[1] / self.history[0].clamp_min(1e-12)
            w = len(losses) * torch.softmax(ratio / self.temperature, dim=0).to(losses)
        if self.track_steps:
            self.observe(losses)
        return w


class RLW(LossWeighting):
    """Random loss weighting (Lin et al., "Reasonable effectiveness of random weighting", TMLR 2022).

    ``w = softmax(z)`` with ``z ~ N(0, I)`` drawn afresh every step. State: the random generator
    (seed it with ``seed``).
    """

    _state = ("rng",)

    def __init__(self, seed: int | None = None, tasks: Sequence[str] | None = None) -> None:
        super().__init__(tasks)
        self.rng = np.random.default_rng(seed)

    def loss_weights(self, losses: Tensor) -> Tensor:
        z = torch.as_tensor(self.rng.standard_normal(len(losses)))
        return torch.softmax(z, dim=0).to(losses)


class GLS(LossWeighting):
    """Geometric loss strategy (Chennupati et al., CVPR Workshops 2019).

    The objective is the geometric mean ``L = (prod_t l_t)^(1/T)``; its gradient is
    ``sum_t L / (T l_t) g_t``, so ``w_t = L / (T (l_t + eps))``.
    """

    positive_losses = True
    requires_positive_losses = True

    def __init__(self, eps: float = 1e-8, tasks: Sequence[str] | None = None) -> None:
        super().__init__(tasks)
        self.eps = eps

    def loss_weights(self, losses: Tensor) -> Tensor:
        shifted = losses + self.eps
        return torch.exp(torch.log(shifted).mean()) / (len(losses) * shifted)


class LogTransform(LossWeighting):
    """Loss-scale balancing, the loss half of DB-MTL (Lin et al., arXiv 2308.12029, Sec. 3.1).

    Train on ``log(l_t + eps)``: its gradient is ``g_t / (l_t + eps)``, so ``w_t = 1 / (l_t + eps)``
    and multiplying one loss by a constant leaves the update unchanged.
    """

    positive_losses = True
    requires_positive_losses = True

    def __init__(self, eps: float = 1e-8, tasks: Sequence[str] | None = None) -> None:
        super().__init__(tasks)
        self.eps = eps

    def loss_weights(self, losses: Tensor) -> Tensor:
        return 1.0 / (losses + self.eps)


class FAMO(LossWeighting):
    """Fast adaptive multitask optimization (Liu et al., NeurIPS 2023, Alg. 1).

    Task logits ``xi`` (``T``), ``z = softmax(xi)``; the update is the gradient of
    ``sum_t z_t log(l_t) / c`` with ``c = sum_t z_t / l_t``, i.e. ``w_t = z_t / (c (l_t + eps))``.
    After a step the logits move so that the task whose log-loss fell least gets more weight: with
    ``delta_t = log l_t(k-1) - log l_t(k)``, ``xi <- xi - lr * Adam(J_softmax^T delta + wd * xi)``
    (the L2 ``weight_decay`` of the paper's code). Here the step's losses
    are those of the next batch (one forward per step), the usual cheap variant.

    State: ``logits``, their Adam moments ``adam_m``/``adam_v``, and ``prev_losses``.
    """

    positive_losses = True
    requires_positive_losses = True
    _state = ("logits", "adam_m", "adam_v", "prev_losses")

    def __init__(
        self,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        eps: float = 1e-8,
        tasks: Sequence[str] | None = None,
    ) -> None:
        super().__init__(tasks)
        self.lr, self.weight_decay, self.eps = lr, weight_decay, eps
        self.logits: Tensor | None = None
        self.adam_m: Tensor | None = None
        self.adam_v: Tensor | None = None
        self.prev_losses: Tensor | None = None
        self._adam_steps = 0

    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "adam_steps": self._adam_steps}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self._adam_steps = state["adam_steps"]

    def loss_weights(self, losses: Tensor) -> Tensor:
        log_losses = torch.log(losses.double() + self.eps)
        if self.logits is None:
            self.logits = torch.zeros_like(log_losses)
            self.adam_m = torch.zeros_like(log_losses)
            self.adam_v = torch.zeros_like(log_losses)
        if self.prev_losses is not None:
            self._update_logits(self.prev_losses - log_losses)
        self.prev_losses = log_losses
        z = torch.softmax(self.logits, dim=0)
        w = z / (losses.double() + self.eps)
        return (w / w.sum()).to(losses)

    def _update_logits(self, delta: Tensor) -> None:
        z = torch.softmax(self.logits, dim=0)
        grad = z * (delta - z @ delta) + self.weight_decay * self.logits
        beta1, beta2 = 0.9, 0.999
        self._adam_steps += 1
        self.adam_m = beta1 * self.adam_m + (1 - beta1) * grad
        self.adam_v = beta2 * self.adam_v + (1 - beta2) * grad**2
        m_hat = self.adam_m / (1 - beta1**self._adam_steps)
        v_hat = self.adam_v / (1 - beta2**self._adam_steps)
        self.logits = self.logits - self.lr * m_hat / (v_hat.sqrt() + 1e-8)
