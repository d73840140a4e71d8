"""Gradient conflict between tasks on the shared convolutions (paper Fig. 2 left).

For every shared convolution weight ``W`` (``[O, ...]``) and every pair of tasks (s, t), the
cosine similarity of the two tasks' gradients *per output filter*: ``cos(∂l_s/∂W_o, ∂l_t/∂W_o)``
for each filter o. The distribution of these cosines over filters is what the paper plots: near
uniform on [-1, 1] for hard sharing (half the updates conflict), concentrated near 0 (orthogonal)
for TSσBN. A filter that one task's gradient does not reach gives cosine 0 (defined, never NaN).
The trainer collects them every ``conflict_every`` steps into ``conflict.jsonl``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn


def conv_weights(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """The shared convolution weights (3-D to 5-D); for a backbone without convolutions, its
    linear weights (2-D, one row per output unit), so MLP backbones are measured too."""
    convs = [p for p in params if p.dim() >= 3 and p.requires_grad]
    return convs or [p for p in params if p.dim() == 2 and p.requires_grad]


def filter_cosines(grads: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, list[float]]:
    """``{"s|t": cosines}``: per output filter of every weight, the cosine of tasks s and t."""
    tasks = list(grads)
    out = {}
    for s, t in itertools.combinations(tasks, 2):
        parts = []
        for ga, gb in zip(grads[s], grads[t]):  # weight by weight: fan-ins differ
            a, b = ga.detach().double().flatten(1), gb.detach().double().flatten(1)
            denom = a.norm(dim=1) * b.norm(dim=1)
            cos = (a * b).sum(1) / denom.clamp_min(1e-300)
            parts.append(torch.where(denom > 0, cos, torch.zeros_like(denom)))
        out[f"{s}|{t}"] = torch.cat(parts).clamp(-1, 1).tolist() if parts else []
    return out


def task_gradients(
    losses: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]
) -> dict[str, list[torch.Tensor]]:
    """Each task's gradient of ``params`` (``retain_graph`` so the training backward still runs)."""
    out = {}
    for task, loss in losses.items():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        out[task] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return out


def conflict_summary(cosines: Sequence[float], bins: int = 20) -> dict[str, object]:
    """Mean, standard deviation, fraction of conflicting (negative) cosines, and a histogram."""
    values = np.asarray(cosines, dtype=np.float64)
    if values.size == 0:
        return {"count": 0, "mean": 0.0, "std": 0.0, "negative": 0.0, "counts": [0] * bins}
    counts, edges = np.histogram(values, bins=bins, range=(-1.0, 1.0))
    return {
        "count": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "negative": float((values < 0).mean()),
        "counts": counts.tolist(),
        "edges": edges.tolist(),
    }
