"""The pruning experiment of paper §5.3 (Fig. 4 right): close each task's most specialized filters
and measure every task's drop.

For task t, the k filters with the highest normalized importance ``N[t, i] = I[t, i] / Σ_s I[s, i]``
(over all layers) are pruned from a copy of the model — for every task, as pruning removes a filter
from the shared network — and every task is evaluated. ``D[t, s]`` is the relative drop (in %) of
task s's score when task t's filters are pruned. If importance and specialization mean what they
claim, the diagonal dominates.

``k``: the paper prunes 200 filters of a SegNet (about 2.5% of its ~8,000 normalized filters);
:func:`default_k` takes the same fraction of the model at hand, at least 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from mtnorm.analysis.specialization import normalized_importance

PRUNE_FRACTION = 0.025
"""The paper's 200 of a SegNet's ~8,000 filters."""

CLOSED_LOGIT = -1e4
"""sigmoid(-1e4) is exactly 0 in float32 and float64: a closed gate."""


def default_k(layers: Mapping[str, torch.Tensor]) -> int:
    total = sum(imp.shape[1] for imp in layers.values())
    return max(1, math.ceil(PRUNE_FRACTION * total))


def top_filters(layers: Mapping[str, torch.Tensor], task: int, k: int) -> list[tuple[str, int]]:
    """The ``k`` filters ``(layer, index)`` most specialized for ``task`` across all layers."""
    names = list(layers)
    scores = torch.cat([normalized_importance(layers[n])[task] for n in names])
    owner = [(n, i) for n in names for i in range(layers[n].shape[1])]
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return [owner[int(j)] for j in order]


def close_filters(model: nn.Module, filters: list[tuple[str, int]]) -> nn.Module:
    """A copy of ``model`` whose task norms output 0 at ``filters`` for every task."""
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    with torch.no_grad():
        for name, i in filters:
            layer = modules["" if name == "<root>" else name]
            if hasattr(layer, "gamma"):
                layer.gamma.view(layer.gamma.shape[0], -1)[:, i] = CLOSED_LOGIT
                beta = getattr(layer, "beta", None)
            else:
                layer.weight.view(layer.weight.shape[0], -1)[:, i] = 0.0
                beta = getattr(layer, "bias", None)
            if beta is not None:
                beta.view(beta.shape[0], -1)[:, i] = 0.0
    return pruned


def pruning_matrix(
    model: nn.Module,
    layers: Mapping[str, torch.Tensor],
    evaluate: Callable[[nn.Module], Mapping[str, float]],
    tasks: list[str],
    k: int | None = None,
) -> dict[str, object]:
    """``D[t][s]``: task s's relative drop (%) after pruning task t's top-k filters.

    ``evaluate(model)`` returns ``{task: score}`` with higher better. Also returns the baseline
    scores, k, and the mean of the diagonal and of the off-diagonal entries.
    """
    k = k or default_k(layers)
    base = dict(evaluate(model))
    drops = []
    for t in range(len(tasks)):
        scores = evaluate(close_filters(model, top_filters(layers, t, k)))
        drops.append([100.0 * (base[s] - scores[s]) / max(abs(base[s]), 1e-12) for s in tasks])
    d = torch.tensor(drops, dtype=torch.float64)
    off = d[~torch.eye(len(tasks), dtype=torch.bool)]
    return {
        "k": k,
        "baseline": base,
        "drop": drops,
        "diagonal_mean": float(d.diagonal().mean()),
        "off_diagonal_mean": float(off.mean()) if off.numel() else 0.0,
    }
