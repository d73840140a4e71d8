"""DB-MTL and its two halves as wrappers that compose with other methods.

Dual-balancing (Lin et al., arXiv 2308.12029) is two independent steps, and the paper's Figure 1
puts each in front of or behind other methods:

* :class:`LogLosses` (loss-scale balancing) trains any method on ``log(l_t + eps)``: the method
  sees gradients ``g_t / (l_t + eps)`` and losses ``log(l_t + eps)``, and every task-specific
  parameter gets the gradient of ``log(l_t + eps)``;
* :class:`MaxNorm` (gradient-magnitude balancing) takes the weighted gradients ``w_t g_t`` of a
  loss-weighting method, keeps their EMA, and rescales every task to the largest EMA norm.

``DBMTL()`` is ``LogLosses(MaxNorm(EW()))``, written out in its own class for the docstring. The
registry offers the compositions as keyword arguments: ``get("pcgrad", log_losses=True)``,
``get("uw", max_norm=True)``, ``get("ew", log_losses=True, max_norm=True)`` (= DB-MTL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mtnorm.balance.base import Balancer, Combination, LossWeighting
from mtnorm.balance.loss_weighting import EW


class LogLosses(Balancer):
    """Loss-scale balancing in front of ``inner`` (DB-MTL, Sec. 3.1).

    ``inner`` runs on the transformed task ``log(l_t + eps)``, whose gradient is
    ``g_t / (l_t + eps)``: ``d = inner(G / (l + eps), log(l + eps))``. Multiplying a loss by a
    constant shifts its log by a constant and changes nothing. The loss scale of task-specific
    parameters is ``inner``'s times ``1 / (l_t + eps)``. Methods that need positive losses
    (ratios, logarithms or products of them) cannot run on log-losses and are refused.
    """

    def __init__(self, inner: Balancer, eps: float = 1e-8) -> None:
        if inner.positive_losses:
            raise ValueError(
                f"{type(inner).__name__} needs positive losses and cannot run on log-losses"
            )
        super().__init__(inner.tasks)
        self.inner = inner
        self.eps = eps
        self.requires_grads = inner.requires_grads
        self.gradient_state = inner.gradient_state
        self.requires_positive_losses = True  # log(l) of a loss <= 0 turns descent into ascent

    def combine(self, grads: Tensor, losses: Tensor) -> Combination:
        scale = 1.0 / (losses + self.eps)
        out = self.inner.combine(grads * scale[:, None], torch.log(losses + self.eps))
        return Combination(out.direction, out.weights, out.loss_scale * scale)

    def loss_weights(self, losses: Tensor) -> Tensor:
        return self.inner.loss_weights(torch.log(losses + self.eps)) / (losses + self.eps)


class MaxNorm(Balancer):
    """Gradient-magnitude balancing behind a loss weighting (DB-MTL, Sec. 3.2).

    With ``w`` the weights of ``inner`` at step ``k = 1, 2, ...`` and ``g_t`` the raw gradients:

    * ``beta_k = beta / k^sigma``;  ``h_t <- beta_k h_t + (1 - beta_k) w_t g_t`` (``h_t = 0`` at first);
    * ``a = max_t ||h_t||``;  ``d = sum_t a / (||h_t|| + eps) h_t``.

    Every task then contributes a vector of the same norm ``a``. Reported weights are the factors
    ``a / (||h_t|| + eps)``; task-specific parameters keep ``inner``'s loss scale ``w_t``.
    State: ``ema`` (``T x P``) and the step count ``k``. The EMA lives in parameter space, so
    ``rep`` gradients (per sample of one batch) are refused, as in LibMTL.
    """

    gradient_state = True
    _state = ("ema", "k")

    def __init__(
        self, inner: LossWeighting, beta: float = 0.9, sigma: float = 0.0, eps: float = 1e-8
    ) -> None:
        if not isinstance(inner, LossWeighting) and not (
            isinstance(inner, LogLosses) and isinstance(inner.inner, LossWeighting)
        ):
            raise TypeError(
                f"max_norm follows a loss weighting; {type(inner).__name__} is a gradient method"
            )
        if not 0 <= beta < 1 or sigma < 0:
            raise ValueError(f"need 0 <= beta < 1 and sigma >= 0, got beta={beta}, sigma={sigma}")
        super().__init__(inner.tasks)
        self.inner = inner
        self.requires_positive_losses = inner.requires_positive_losses
        self.beta, self.sigma, self.eps = beta, sigma, eps
        self.ema: Tensor | None = None
        self.k = 0

    def combine(self, grads: Tensor, losses: Tensor) -> Combination:
        w = self.inner.loss_weights(losses).to(grads.dtype)
        if self.ema is None:
            self.ema = torch.zeros_like(grads)
        elif self.ema.shape != grads.shape:
            raise ValueError(
                f"the gradient shape changed from {tuple(self.ema.shape)} to {tuple(grads.shape)} "
                "but the EMA needs a fixed one (the same shared parameters at every step)"
            )
        self.k += 1
        beta_k = self.beta / self.k**self.sigma
        # In place: the EMA is as large as G, one pass over it instead of three temporaries.
        self.ema.mul_(beta_k).addcmul_(grads, ((1.0 - beta_k) * w)[:, None])
        norms = self.ema.norm(dim=1)
        # a task with no gradient (yet) contributes nothing: its factor is 0, not max / eps
        factors = torch.where(norms > 0, norms.max() / (norms + self.eps), torch.zeros_like(norms))
        return Combination(factors @ self.ema, factors, w)


class DBMTL(LogLosses):
    """Dual-balancing multi-task learning (Lin et al., arXiv 2308.12029, Alg. 1).

    1. Loss-scale balancing: ``g_t = grad log(l_t + eps) = grad l_t / (l_t + eps)``; task-specific
       parameters are updated with the gradient of ``log(l_t + eps)``.
    2. Gradient-magnitude balancing on the shared parameters, at step ``k = 1, 2, ...``:
       ``beta_k = beta / k^sigma``, ``h_t <- beta_k h_t + (1 - beta_k) g_t`` (``h_t = 0`` at first),
       ``a = max_t ||h_t||``, ``d = sum_t a / (||h_t|| + eps) h_t``.

    Defaults follow the paper: ``beta = 0.9``, ``sigma = 0``, ``eps = 1e-8``. The direction is
    unchanged when any one loss is multiplied by a constant. State: the EMA ``h`` (``T x P``).
    """

    def __init__(
        self,
        beta: float = 0.9,
        sigma: float = 0.0,
        eps: float = 1e-8,
        tasks: Sequence[str] | None = None,
    ) -> None:
        super().__init__(MaxNorm(EW(tasks), beta=beta, sigma=sigma, eps=eps), eps=eps)
