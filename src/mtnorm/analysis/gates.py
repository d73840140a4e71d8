"""Gate distributions and the failure signatures of a trained TSσBN model (paper §7.1, Fig. 5).

Gates start at σ(0) = 0.5. With too low a learning-rate multiplier α they barely move (tasks do not
differentiate); with too high an α they collapse to {0, 1} (a hard partition); and when one task's
capacity dwarfs the others', its loss or gradient scale usually dominates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

NEAR_HALF = 0.05
"""Gates within 0.5 ± NEAR_HALF count as unmoved."""

POLAR = 0.02
"""Gates below POLAR or above 1 - POLAR count as collapsed to a binary mask."""


def gate_histogram(gates: torch.Tensor, bins: int = 20) -> dict[str, list[float]]:
    """Counts of gate values in ``bins`` equal bins over [0, 1] (the data of Fig. 5)."""
    counts, edges = np.histogram(gates.detach().double().flatten().numpy(), bins=bins, range=(0.0, 1.0))
    return {"counts": counts.tolist(), "edges": edges.tolist()}


def diagnose(
    gates: torch.Tensor,
    capacities: Mapping[str, float] | None = None,
    unmoved: float = 0.9,
    collapsed: float = 0.9,
    dominance: float = 3.0,
) -> list[str]:
    """Warnings (plain sentences) for the failure signatures; empty when none applies.

    ``gates``: every gate of the model (any shape, values in [0, 1]). ``capacities``: the total
    capacity C_t per task. Thresholds: more than ``unmoved`` of the gates within 0.5 ± 0.05;
    more than ``collapsed`` below 0.02 or above 0.98; a task's capacity over ``dominance`` times
    the smallest.
    """
    g = gates.detach().double().flatten()
    out = []
    if g.numel():
        near = float(((g - 0.5).abs() <= NEAR_HALF).double().mean())
        polar = float(((g < POLAR) | (g > 1 - POLAR)).double().mean())
        if near > unmoved:
            out.append(
                f"{near:.0%} of the gates stayed within 0.5 ± {NEAR_HALF}: the tasks barely "
                "differentiated; raise the gates' learning-rate multiplier (optim.norm_lr_mult, α)"
            )
        if polar > collapsed:
            out.append(
                f"{polar:.0%} of the gates collapsed to 0 or 1 (a hard partition): α is likely too "
                "high; lower optim.norm_lr_mult"
            )
    if capacities:
        values = {t: c for t, c in capacities.items()}
        low = min(values.values())
        high_task = max(values, key=values.get)
        if low > 0 and values[high_task] > dominance * low or low == 0 < values[high_task]:
            out.append(
                f"task {high_task!r} uses {values[high_task]:.3f} of the capacity against {low:.3f} for "
                "the least: check the loss scales (loss_weights, or a balancer such as db_mtl)"
            )
    return out


def all_gates(layers: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every gate of the layers, flattened."""
    return torch.cat([g.detach().double().flatten() for g in layers.values()])


def per_task_totals(importances: torch.Tensor, tasks: Sequence[str]) -> dict[str, float]:
    return {t: float(importances[i].double().mean()) for i, t in enumerate(tasks)}
