"""Task relations from the task-filter importance matrix (paper §5.2).

``S[s, t] = cos(I_s, I_t)``, the cosine similarity of two tasks' importance vectors over all
filters: 1 for identical filter usage, 0 for disjoint (orthogonal) usage; gates are non-negative,
so ``S`` lies in [0, 1]. Hierarchical clustering on the distance ``1 - S`` gives the task
hierarchy; over several trained runs, the mean pairwise Spearman rank correlation of the
similarity matrices (their upper triangles) measures how stable the relations are (the paper
reports 0.8 over 7 CelebA runs).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch


def task_similarity(importances: torch.Tensor) -> torch.Tensor:
    """``[T, T]`` cosine similarity of the rows of ``I`` (``[T, F]``), float64.

    Defined for degenerate rows: a zero row has similarity 0 to every other task and 1 to itself.
    """
    if importances.dim() != 2:
        raise ValueError(f"importances must be a [T, F] matrix, got shape {tuple(importances.shape)}")
    imp = importances.detach().double()
    norms = imp.norm(dim=1)
    unit = imp / norms.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    sim = (unit @ unit.T).clamp(-1.0, 1.0)
    sim[norms == 0] = 0.0
    sim[:, norms == 0] = 0.0
    sim.fill_diagonal_(1.0)
    return sim


def linkage(similarity: torch.Tensor, method: str = "average") -> np.ndarray:
    """SciPy's linkage matrix of the tasks on the distance ``1 - S`` (for a dendrogram)."""
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    dist = (1.0 - similarity.detach().double()).clamp_min(0.0).numpy()
    np.fill_diagonal(dist, 0.0)
    dist = (dist + dist.T) / 2
    if dist.shape[0] < 2:
        return np.zeros((0, 4))
    return scipy_linkage(squareform(dist, checks=False), method=method)


def clusters(similarity: torch.Tensor, k: int, method: str = "average") -> list[int]:
    """A cluster label per task, cutting the hierarchy into ``k`` clusters."""
    from scipy.cluster.hierarchy import fcluster

    t = similarity.shape[0]
    if t < 2 or k >= t:
        return list(range(t))
    return [int(c) - 1 for c in fcluster(linkage(similarity, method), k, criterion="maxclust")]


def _upper(matrix: torch.Tensor) -> np.ndarray:
    t = matrix.shape[0]
    rows, cols = np.triu_indices(t, k=1)
    return matrix.detach().double().numpy()[rows, cols]


def relation_stability(similarities: Sequence[torch.Tensor]) -> float:
    """Mean pairwise Spearman rank correlation of the similarity matrices of several runs.

    Compares the upper triangles (the task pairs). A pair of runs whose pair similarities are all
    equal has no ranking: it counts as 1 if both are constant, else 0 (never NaN).
    """
    from scipy.stats import spearmanr

    if len(similarities) < 2:
        raise ValueError("relation_stability needs the similarity matrices of at least 2 runs")
    if similarities[0].shape[0] < 3:
        raise ValueError("relation_stability needs at least 3 tasks: with 2 there is one pair, no ranking")
    values = []
    for a, b in itertools.combinations(similarities, 2):
        x, y = _upper(a), _upper(b)
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            values.append(1.0 if np.ptp(x) == np.ptp(y) == 0 else 0.0)
            continue
        values.append(float(spearmanr(x, y).statistic))
    return float(np.mean(values))


def cooccurrence(similarities: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """``[T, T]``: the fraction of runs in which tasks s and t fall into the same of ``k`` clusters."""
    t = similarities[0].shape[0]
    out = torch.zeros(t, t, dtype=torch.float64)
    for sim in similarities:
        labels = torch.tensor(clusters(sim, k))
        out += (labels[:, None] == labels[None, :]).double()
    return out / len(similarities)
