"""Gradient-based methods: each combines the per-task gradients ``G`` (``T x P``) of a step.

All of them return ``d = a^T G`` for task coefficients ``a`` that depend on ``G`` only through
the Gram matrix ``K = G G^T``; ``a`` is found on the ``T x T`` matrix in float64 and applied with
one matrix product, so no method loops over the ``P``-dimensional gradients. Task-specific
parameters get their task's gradient unscaled (GradNorm: scaled by its learned weight).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mtnorm.balance import solvers
from mtnorm.balance.base import Balancer, Combination, gram

_EPS = 1e-12


class GramMethod(Balancer):
    """A method whose coefficients ``a`` are a function of the Gram matrix (and its state)."""

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        """The task coefficients ``a`` (``T``) with ``d = a^T G``."""
        raise NotImplementedError

    def combine(self, grads: Tensor, losses: Tensor) -> Combination:
        a = torch.as_tensor(self.coefficients(gram(grads)), dtype=grads.dtype, device=grads.device)
        return Combination(a @ grads, a, torch.ones_like(losses))


class MGDA(GramMethod):
    """Multiple-gradient descent as min-norm (Sener and Koltun, NeurIPS 2018).

    ``a = argmin_{a in simplex} ||sum_t a_t g_t||^2`` and ``d = sum_t a_t g_t``: the min-norm point
    of the convex hull of the gradients, a common descent direction (``G d >= ||d||^2``). Solved
    exactly (Lawson-Hanson NNLS) rather than by Frank-Wolfe. ``normalize`` rescales the gradients
    first, as in the paper's code: ``"none"``, ``"l2"`` (unit norms), ``"loss"`` (``g_t / l_t``),
    ``"loss+"`` (``g_t / (l_t ||g_t||)``).
    """

    _NORMALIZE = ("none", "l2", "loss", "loss+")

    def __init__(self, normalize: str = "none", tasks: Sequence[str] | None = None) -> None:
        super().__init__(tasks)
        if normalize not in self._NORMALIZE:
            raise ValueError(f"normalize must be one of {list(self._NORMALIZE)}, got {normalize!r}")
        self.normalize = normalize

    def combine(self, grads: Tensor, losses: Tensor) -> Combination:
        scale = torch.ones_like(losses)
        if self.normalize in ("l2", "loss+"):
            scale = scale / grads.norm(dim=1).clamp_min(_EPS)
        if self.normalize in ("loss", "loss+"):
            scale = scale / losses.clamp_min(_EPS)
        k = gram(grads) * np.outer(scale.cpu().double(), scale.cpu().double())
        a = torch.as_tensor(solvers.min_norm_simplex(k), dtype=grads.dtype, device=grads.device)
        a = a * scale
        return Combination(a @ grads, a, torch.ones_like(losses))


class UPGrad(GramMethod):
    """Unconflicting projection of gradients (Quinton and Rey, "Jacobian descent for
    multi-objective optimization", 2024; TorchJD's UPGrad).

    Each ``g_i`` is projected onto the dual cone ``{x : G x >= 0}``: ``G^T w_i`` with
    ``w_i = argmin_{v >= e_i} v^T K v``; ``d`` is the mean of the projections, so it never conflicts
    with any task (``G d >= 0``) and equals the mean gradient when no pair conflicts.
    """

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        return solvers.dual_cone_weights(gram).mean(axis=0)


class NashMTL(GramMethod):
    """Nash-MTL (Navon et al., ICML 2022): the Nash bargaining solution.

    ``a > 0`` solves ``K a = 1 / a`` elementwise (every task's utility ``g_t^T d`` equals
    ``1 / a_t``) and ``d = sum_t a_t g_t``; it is scale invariant and non-conflicting. Solved
    exactly by Newton's method on the convex ``a^T K a / 2 - sum_t log a_t`` instead of the
    paper's sequence of convex approximations.
    """

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        return solvers.power_balance(gram, alpha=1.0)


class FairGrad(GramMethod):
    """FairGrad (Ban and Ji, ICML 2024): alpha-fair utility maximisation.

    ``a > 0`` solves ``K a = a^(-1/alpha)`` elementwise and ``d = sum_t a_t g_t``; ``alpha = 1``
    is Nash-MTL's solution, ``alpha -> infinity`` approaches max-min fairness.
    """

    def __init__(self, alpha: float = 1.0, tasks: Sequence[str] | None = None) -> None:
        super().__init__(tasks)
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = alpha

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        return solvers.power_balance(gram, alpha=self.alpha)


class CAGrad(GramMethod):
    """Conflict-averse gradient descent (Liu et al., NeurIPS 2021, Alg. 1).

    With ``g_0`` the mean gradient and ``phi = c^2 ||g_0||^2``, the dual weights
    ``w = argmin_{w in simplex} g_w^T g_0 + sqrt(phi) ||g_w||`` give
    ``d = g_0 + sqrt(phi) g_w / ||g_w||``, divided by ``1 + c^2`` when ``rescale`` (the official
    code's default). ``c`` in ``[0, 1)`` trades the average loss against the worst task.
    """

    def __init__(
        self, c: float = 0.4, rescale: bool = True, tasks: Sequence[str] | None = None
    ) -> None:
        super().__init__(tasks)
        if c < 0:
            raise ValueError(f"c must be non-negative, got {c}")
        self.c, self.rescale = c, rescale

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        t = len(gram)
        w = solvers.cagrad_weights(gram, self.c)
        mean = np.full(t, 1.0 / t)
        root_phi = self.c * np.sqrt(max(mean @ gram @ mean, 0.0))
        norm_w = np.sqrt(max(w @ gram @ w, 0.0))
        a = mean + (root_phi / norm_w * w if norm_w > _EPS else 0.0)
        return a / (1.0 + self.c**2) if self.rescale else a


class IMTLG(GramMethod):
    """IMTL-G, the gradient half of IMTL (Liu et al., ICLR 2021).

    ``d = sum_t a_t g_t`` with ``sum_t a_t = 1`` and equal projections on every unit gradient
    ``u_t = g_t / ||g_t||``: ``a_{2:T} = g_1 U^T (D U^T)^{-1}`` with rows ``D_t = g_1 - g_t``,
    ``U_t = u_1 - u_t``, ``a_1 = 1 - sum a_{2:T}``. A least-squares solve handles singular systems.
    """

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        inv = np.where(norms > _EPS * max(norms.max(), 1.0), 1.0 / np.maximum(norms, _EPS), 0.0)
        gu = gram * inv[None, :]  # gu[i, j] = g_i . u_j
        g1_u = gu[0, 0] - gu[0, 1:]  # g_1 . (u_1 - u_t)
        d_u = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]
        rest = np.linalg.lstsq(d_u.T, g1_u, rcond=None)[0]
        return np.concatenate([[1.0 - rest.sum()], rest])


class AlignedMTL(GramMethod):
    """Aligned-MTL (Senushkin et al., CVPR 2023, Alg. 1): align the principal components.

    With ``K = V diag(lambda) V^T`` over the non-zero eigenvalues, the aligned gradients
    ``G_hat = sqrt(lambda_min) V diag(lambda)^(-1/2) V^T G`` have orthogonal rows of equal norm
    (condition number 1); ``d = sum_t g_hat_t``, so ``a = B 1`` with
    ``B = sqrt(lambda_min) V diag(lambda)^(-1/2) V^T``.
    """

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        eigvals, eigvecs = np.linalg.eigh((gram + gram.T) / 2)
        t = len(gram)
        # The rank cut of the paper's code: eigenvalues within float32 noise of zero are dropped.
        keep = eigvals > max(eigvals.max(), 0.0) * t * np.finfo(np.float32).eps
        if not keep.any():
            return np.ones(t)
        lam, vecs = eigvals[keep], eigvecs[:, keep]
        b = np.sqrt(lam.min()) * (vecs / np.sqrt(lam)) @ vecs.T
        return b.sum(axis=1)


class PCGrad(GramMethod):
    """Projecting conflicting gradients (Yu et al., NeurIPS 2020, Alg. 1).

    For each task ``i``, ``g_i'`` starts at ``g_i`` and, for the other tasks ``j`` in a random
    order, loses its component along ``g_j`` when the two conflict:
    ``g_i' <- g_i' - min(0, g_i'.g_j) / ||g_j||^2 g_j``; ``d = sum_i g_i'``. Every ``g_i'`` is
    tracked as coefficients over ``G`` so the projections are ``T x T`` arithmetic.
    State: the random generator (seed it with ``seed``).
    """

    _state = ("rng",)

    def __init__(self, seed: int | None = None, tasks: Sequence[str] | None = None) -> None:
        super().__init__(tasks)
        self.rng = np.random.default_rng(seed)

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        t = len(gram)
        coef = np.eye(t)
        sq = np.maximum(np.diag(gram), _EPS * max(np.diag(gram).max(), _EPS))
        for i in range(t):
            for j in self.rng.permutation(t):
                if j == i:
                    continue
                dot = coef[i] @ gram[:, j]
                if dot < 0:
                    coef[i, j] -= dot / sq[j]
        return coef.sum(axis=0)


class GradVac(GramMethod):
    """Gradient vaccine (Wang et al., ICLR 2021, Alg. 1), on the whole shared parameter vector.

    Keeps an EMA target ``phi_hat_ij`` of the cosine between tasks ``i`` and ``j``. For each ``i``
    and each other ``j`` in random order, with ``phi = cos(g_i', g_j)``: if ``phi < phi_hat_ij``,
    ``g_i' += ||g_i'|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
    / (||g_j|| sqrt(1 - phi_hat^2)) g_j`` (raising the cosine to the target); then
    ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``. ``d = sum_i g_i'``.
    State: ``targets`` (``T x T``) and the random generator.
    """

    _state = ("targets", "rng")

    def __init__(
        self, beta: float = 0.01, seed: int | None = None, tasks: Sequence[str] | None = None
    ) -> None:
        super().__init__(tasks)
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = beta
        self.rng = np.random.default_rng(seed)
        self.targets: Tensor | None = None

    def coefficients(self, gram: np.ndarray) -> np.ndarray:
        t = len(gram)
        targets = np.zeros((t, t)) if self.targets is None else self.targets.numpy().copy()
        coef = np.eye(t)
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        for i in range(t):
            for j in self.rng.permutation(t):
                if j == i:
                    continue
                norm_i = np.sqrt(max(coef[i] @ gram @ coef[i], 0.0))
                if norm_i < _EPS or norms[j] < _EPS:
                    continue
                phi = np.clip(coef[i] @ gram[:, j] / (norm_i * norms[j]), -1.0, 1.0)
                target = targets[i, j]
                if phi < target:
                    root_t = np.sqrt(max(1.0 - target**2, _EPS))
                    coef[i, j] += (
                        norm_i * (target * np.sqrt(1.0 - phi**2) - phi * root_t) / (norms[j] * root_t)
                    )
                targets[i, j] = (1.0 - self.beta) * target + self.beta * phi
        self.targets = torch.from_numpy(targets)
        return coef.sum(axis=0)


class GradNorm(Balancer):
    """GradNorm (Chen et al., ICML 2018): learn weights that equalise training rates.

    Weights ``w = T softmax(xi)`` (``xi`` = ``logits``, learnable: add ``balancer.parameters()`` to
    the optimizer); ``d = sum_t w_t g_t``. With ``G_t = w_t ||g_t||``, its mean ``G_bar`` and the
    relative inverse training rate ``r_t = (l_t / l_t(0)) / mean_i(l_i / l_i(0))``, the weights
    descend ``L_grad = sum_t |G_t - G_bar r_t^alpha|`` (target held constant, as in the paper);
    that gradient goes to ``logits.grad``. Norms are over all shared parameters, not only the last
    shared layer. State: ``initial_losses``.
    """

    positive_losses = True
    requires_positive_losses = True
    _state = ("initial_losses",)

    def __init__(self, alpha: float = 1.5, tasks: Sequence[str] | None = None) -> None:
        if tasks is None:
            raise ValueError("GradNorm learns one weight per task; pass tasks=[...]")
        super().__init__(tasks)
        self.alpha = alpha
        self.logits = nn.Parameter(torch.zeros(len(self.tasks)))
        self.initial_losses: Tensor | None = None

    def combine(self, grads: Tensor, losses: Tensor) -> Combination:
        if self.initial_losses is None:
            self.initial_losses = losses.detach().clone()
        t = len(losses)
        s = torch.softmax(self.logits.detach().double(), dim=0)
        w = t * s
        norms = grads.norm(dim=1).double()
        weighted = w * norms
        ratio = losses.double() / self.initial_losses.double().clamp_min(_EPS)
        target = weighted.mean() * (ratio / ratio.mean().clamp_min(_EPS)) ** self.alpha
        dw = torch.sign(weighted - target) * norms
        grad = (w * (dw - s @ dw)).to(self.logits)
        self.logits.grad = grad if self.logits.grad is None else self.logits.grad + grad
        w = w.to(grads.dtype)
        return Combination(w @ grads, w, w)
