"""A tiny MLP backbone and synthetic classification tasks, for tests and examples."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtnorm.models.factory import norm_layer


class ToyEncoder(nn.Sequential):
    """Linear, norm, ReLU, twice: the smallest backbone with BatchNorm1d layers to convert."""

    def __init__(self, in_features: int = 8, hidden: int = 16, norm: str = "bn") -> None:
        bias = norm == "none"  # a bias before a re-centring norm has a zero gradient
        super().__init__(
            nn.Linear(in_features, hidden, bias=bias),
            norm_layer(norm, hidden, dims=1),
            nn.ReLU(),
            nn.Linear(hidden, hidden, bias=bias),
            norm_layer(norm, hidden, dims=1),
            nn.ReLU(),
        )
        self.out_features = hidden


def make_toy(
    n: int, tasks: Sequence[str], seed: int = 0, split: int = 0, features: int = 8, classes: int = 3
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` Gaussian inputs; task t's label is the argmax of a fixed random linear map of them.

    The maps depend only on ``seed`` (train and test share them); the inputs on ``(seed, split)``.
    """
    maps = torch.Generator().manual_seed(seed)
    weights = torch.randn(len(tasks), features, classes, generator=maps)
    gen = torch.Generator().manual_seed(seed * 1000 + split + 1)
    x = torch.randn(n, features, generator=gen)
    labels = torch.einsum("nf,tfc->tnc", x, weights).argmax(-1)
    return x, dict(zip(tasks, labels))
