"""Filter specialization (paper §5.3, Fig. 4 left).

With ``I[t, i]`` the importance task t gives filter i, the normalized importance is
``N[t, i] = I[t, i] / Σ_s I[s, i]``; filter i is *specialized* for task t when ``N[t, i] > τ``
(τ = 0.5 in the paper: the filter serves one task more than all others together). A filter no task
uses (a zero column) has ``N = 1/T`` for every task: shared, not specialized.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def normalized_importance(importances: torch.Tensor) -> torch.Tensor:
    """``N = I / Σ_t I`` column-wise, ``[T, F]``, float64; zero columns give ``1/T``."""
    imp = importances.detach().double().clamp_min(0.0)
    total = imp.sum(dim=0, keepdim=True)
    t = imp.shape[0]
    return torch.where(total > 0, imp / total.clamp_min(torch.finfo(torch.float64).tiny), 1.0 / t)


def specialized(importances: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Boolean ``[T, F]``: filter i is specialized for task t (``N[t, i] > τ``)."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    return normalized_importance(importances) > tau


def specialization_per_layer(
    layers: Mapping[str, torch.Tensor], tasks: Sequence[str] | None = None, tau: float = 0.5
) -> dict[str, dict[str, float]]:
    """Per layer: the fraction of its filters specialized for any task (``"any"``) and for each."""
    out: dict[str, dict[str, float]] = {}
    for name, imp in layers.items():
        mask = specialized(imp, tau)
        names = list(tasks) if tasks is not None else [str(t) for t in range(mask.shape[0])]
        out[name] = {"any": float(mask.any(dim=0).double().mean())}
        out[name].update({task: float(mask[t].double().mean()) for t, task in enumerate(names)})
    return out
