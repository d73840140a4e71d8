"""Shared builders for the balance tests: methods by name, matrices of controlled rank, tiny models."""

from __future__ import annotations

import torch
from torch import nn

import mtnorm
from mtnorm import balance

TASKS3 = ("a", "b", "c")

# Extra keyword arguments some methods need to be built (learned parameters, seeds).
NEEDS_TASKS = {"uw", "imtl_l", "gradnorm"}
SEEDED = {"rlw", "pcgrad", "gradvac"}


def make(name: str, tasks=TASKS3, **kwargs) -> balance.Balancer:
    if name in NEEDS_TASKS:
        kwargs.setdefault("tasks", tasks)
    if name in SEEDED:
        kwargs.setdefault("seed", 0)
    return balance.get(name, **kwargs)


def matrix(kind: str, t: int = 3, p: int = 12, seed: int = 0) -> torch.Tensor:
    """A ``t x p`` float64 gradient matrix: ``full`` rank, rank-``deficient`` (rank t - 1), or with
    a ``duplicated`` row."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "full":
        return torch.randn(t, p, generator=gen, dtype=torch.float64)
    if kind == "deficient":
        left = torch.randn(t, t - 1, generator=gen, dtype=torch.float64)
        return left @ torch.randn(t - 1, p, generator=gen, dtype=torch.float64)
    if kind == "duplicated":
        g = torch.randn(t, p, generator=gen, dtype=torch.float64)
        g[-1] = g[0]
        return g
    raise ValueError(kind)


def losses(t: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.rand(t, generator=gen, dtype=torch.float64) * 2 + 0.1


class HardSharing(nn.Module):
    """Encoder + TaskHeads; ``features`` is kept for rep-gradient tests."""

    def __init__(self, tasks=TASKS3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = mtnorm.TaskHeads({t: nn.Linear(6, 1) for t in tasks})

    def forward(self, x: torch.Tensor):
        self.features = self.encoder(x)
        return self.heads(self.features)


def task_losses(outputs: dict, target: torch.Tensor, scales=(1.0, 10.0, 0.1)) -> dict:
    return {t: s * ((out.squeeze(-1) - target) ** 2).mean() for (t, out), s in zip(outputs.items(), scales)}


def conv_tsbn(tasks=TASKS3) -> nn.Module:
    body = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    model = nn.Sequential(body, mtnorm.TaskHeads({t: nn.Linear(4, 1) for t in tasks}))
    return mtnorm.convert(model, tasks, norm="sigma")
