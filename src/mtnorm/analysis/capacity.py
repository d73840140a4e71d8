"""Capacity allocation from a TSσBN model's gates (paper §5.1, Eq. 4-5).

Each task t has an importance vector I_t (its gates over all F filters). Its total capacity is the
mean gate, C_t = (1/F) Σ_i I_t,i. Projecting I_t onto the span of the other tasks' vectors,
Î_t = P_A I_t with P_A = A (AᵀA)⁻¹ Aᵀ, splits it into a shared part Î_t and an independent part
I_t⊥ = I_t − Î_t, and the capacities scale accordingly:

    C_t^shared = ‖Î_t‖ / ‖I_t‖ · C_t,   C_t^indep = ‖I_t⊥‖ / ‖I_t‖ · C_t,

so that (C_t^shared)² + (C_t^indep)² = C_t².
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def importance_vectors(model: nn.Module) -> torch.Tensor:
    """All task-specific norm layers' importances side by side: ``[T, F_total]``."""
    from mtnorm.norm import importance

    return torch.cat([m.float() for m in importance(model).values()], dim=1)


def capacity_split(
    importances: torch.Tensor, tasks: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """``{task: {"total", "shared", "independent"}}`` from an importance matrix ``[T, F]``.

    The projection uses a least-squares solve (a pseudo-inverse), so linearly dependent other-task
    vectors are fine. With one task there is nothing to share: all capacity is independent.
    """
    if importances.dim() != 2:
        raise ValueError(f"importances must be a [T, F] matrix, got shape {tuple(importances.shape)}")
    imp = importances.detach().double()
    t_count = imp.shape[0]
    names = list(tasks) if tasks is not None else [str(t) for t in range(t_count)]
    if len(names) != t_count:
        raise ValueError(f"{len(names)} task names for {t_count} importance rows")
    out: dict[str, dict[str, float]] = {}
    for t, name in enumerate(names):
        vec = imp[t]
        total = float(vec.mean())
        norm = float(vec.norm())
        others = torch.cat([imp[:t], imp[t + 1 :]]).T  # A: [F, T-1]
        if others.shape[1] == 0 or norm == 0.0:
            shared_norm = 0.0
        else:
            coef = torch.linalg.lstsq(others, vec.unsqueeze(1)).solution
            shared_norm = float((others @ coef).norm())
        shared_norm = min(shared_norm, norm)  # guard tiny round-off above ‖I_t‖
        indep_norm = max(norm**2 - shared_norm**2, 0.0) ** 0.5
        scale = total / norm if norm else 0.0
        out[name] = {"total": total, "shared": shared_norm * scale, "independent": indep_norm * scale}
    return out


def capacity_table(split: Mapping[str, Mapping[str, float]]) -> list[list[str]]:
    """Rows ``[task, total, shared, independent, independent/total]`` for a Markdown table."""
    rows = []
    for task, c in split.items():
        share = c["independent"] / c["total"] if c["total"] else 0.0
        values = [f"{c[k]:.3f}" for k in ("total", "shared", "independent")]
        rows.append([task, *values, f"{share:.1%}"])
    return rows


def capacity_per_layer(
    layers: Mapping[str, torch.Tensor], tasks: Sequence[str] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`capacity_split` of every layer's own importance matrix: where each task's capacity
    sits and how much of it is shared, layer by layer."""
    return {name: capacity_split(imp, tasks) for name, imp in layers.items()}
