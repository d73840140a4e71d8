"""Small optimization problems on the ``T x T`` Gram matrix ``K = G G^T``, in float64.

Every gradient method below only needs inner products between task gradients, so its solver
sees ``K`` and never the ``P``-dimensional gradients. Problems are solved on ``K`` divided by its
mean diagonal (so the scale of the gradients does not matter to the tolerances) and the solution
is mapped back. Only numpy and scipy are used.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, nnls

_TINY = 1e-300


def normalized(gram: np.ndarray) -> tuple[np.ndarray, float]:
    """``(K / s, s)`` with ``s`` the mean diagonal; ``s = 0`` when every gradient is zero."""
    scale = float(np.trace(gram)) / len(gram)
    if not scale > _TINY:
        return np.zeros_like(gram), 0.0
    return gram / scale, scale


def factor(gram: np.ndarray) -> np.ndarray:
    """A square ``A`` with ``A^T A = K`` (``K`` may be singular), from the eigendecomposition."""
    eigvals, eigvecs = np.linalg.eigh((gram + gram.T) / 2)
    return np.sqrt(np.clip(eigvals, 0.0, None))[:, None] * eigvecs.T


def min_norm_simplex(gram: np.ndarray) -> np.ndarray:
    """``argmin_{a in simplex} a^T K a``: the min-norm point of the convex hull of the gradients.

    Exact, by Lawson and Hanson's reduction of least-distance programming to non-negative least
    squares: with ``A^T A = K``, the NNLS solution ``u`` of ``[A; 1^T] u ~ [0; 1]`` is proportional
    to the optimal ``a`` (also when the hull contains the origin, where the residual vanishes).
    """
    k, scale = normalized(gram)
    t = len(gram)
    if scale == 0.0:
        return np.full(t, 1.0 / t)
    system = np.vstack([factor(k), np.ones((1, t))])
    target = np.zeros(t + 1)
    target[-1] = 1.0
    u, _ = nnls(system, target, maxiter=50 * t)
    return u / u.sum()


def dual_cone_weights(gram: np.ndarray) -> np.ndarray:
    """Row ``i``: ``w_i = argmin_{v >= e_i} v^T K v``, so ``G^T w_i`` is the projection of ``g_i``
    onto the dual cone ``{x : G x >= 0}`` (UPGrad). With ``v = e_i + u`` it is the NNLS problem
    ``min_{u >= 0} ||A u + A e_i||`` with ``A^T A = K``."""
    k, scale = normalized(gram)
    t = len(gram)
    eye = np.eye(t)
    if scale == 0.0:
        return eye
    a = factor(k)
    return np.stack([nnls(a, -a[:, i], maxiter=50 * t)[0] for i in range(t)]) + eye


def power_balance(gram: np.ndarray, alpha: float = 1.0, ridge: float = 1e-10) -> np.ndarray:
    """The ``a > 0`` with ``K a = a^(-1/alpha)`` elementwise (Nash-MTL for ``alpha = 1``, FairGrad).

    With ``p = 1 / alpha``, norms ``n_t`` and ``a = b / n``, the system becomes
    ``C b = r * b^(-p)`` on the cosine matrix ``C`` with ``r_t = n_t^(p - 1)``, whose solution is
    the minimizer of the strictly convex ``f(b) = b^T C b / 2 + sum_t r_t psi(b_t)``,
    ``psi'(b) = -b^(-p)``: damped Newton steps that stay inside ``b > 0`` find it. Working on
    cosines makes the tolerances independent of how different the gradient norms are. A task with
    a zero gradient gets weight 0 (no weight can balance it, and it adds nothing to ``d``).
    """
    t = len(gram)
    p = 1.0 / alpha
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    live = norms > 1e-12 * max(norms.max(), _TINY)
    out = np.zeros(t)
    if not live.any():
        return out
    n = norms[live]
    cos = gram[np.ix_(live, live)] / np.outer(n, n) + ridge * np.eye(int(live.sum()))
    r = n ** (p - 1.0)
    # Solve for r / rho (rho its geometric mean), then b scales by rho^(1 / (1 + p)).
    rho = float(np.exp(np.log(r).mean()))
    b = _newton_power(cos, r / rho, p) * rho ** (1.0 / (1.0 + p))
    out[live] = b / n
    return out


def _newton_power(c: np.ndarray, r: np.ndarray, p: float) -> np.ndarray:
    def objective(b: np.ndarray) -> float:
        barrier = -np.log(b) if p == 1.0 else -(b ** (1.0 - p)) / (1.0 - p)
        return 0.5 * b @ c @ b + r @ barrier

    b = np.ones(len(c))
    for _ in range(200):
        grad = c @ b - r * b**-p
        if np.max(np.abs(grad) * b) < 1e-14 * max(1.0, float(np.max(r * b ** (1 - p)))):
            break
        step = np.linalg.solve(c + np.diag(r * p * b ** (-p - 1.0)), grad)
        size = 1.0
        # Fraction to the boundary, then backtracking (Armijo) on f.
        while np.any(b - size * step <= 0):
            size *= 0.5
        f0 = objective(b)
        while objective(b - size * step) > f0 - 1e-4 * size * (grad @ step) and size > 1e-12:
            size *= 0.5
        b = b - size * step
    return b


def cagrad_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """``argmin_{w in simplex} g_w^T g_0 + sqrt(phi) ||g_w||`` with ``g_0`` the mean gradient and
    ``phi = c^2 ||g_0||^2`` (CAGrad's dual problem), by SLSQP from the uniform point."""
    k, scale = normalized(gram)
    t = len(gram)
    uniform = np.full(t, 1.0 / t)
    if scale == 0.0:
        return uniform
    kb = k @ uniform
    root_phi = c * np.sqrt(max(uniform @ kb, 0.0))

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        norm = np.sqrt(max(w @ k @ w, 1e-20))
        return w @ kb + root_phi * norm, kb + root_phi * (k @ w) / norm

    res = minimize(
        objective,
        uniform,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * t,
        constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(t)},),
        options={"ftol": 1e-15, "maxiter": 500},
    )
    w = np.clip(res.x, 0.0, None)
    return w / w.sum()
