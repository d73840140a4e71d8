"""Small models with every kind of norm layer, shared by the core tests (imported as a module)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

TASKS = ("seg", "depth", "normal")


class ConvNet(nn.Module):
    """Two convs with BatchNorm2d, a pooled linear layer with BatchNorm1d."""

    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(width, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(self.features(x)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(7, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4), nn.BatchNorm1d(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """A pre-norm transformer block with two LayerNorms."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


def perturb_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial parameters and statistics, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.8 + 0.1)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model


MODELS = {
    "conv": (ConvNet, (6, 3, 8, 8)),
    "mlp": (MLP, (6, 7)),
    "block": (Block, (6, 5, 8)),
}


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


def make(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A model with perturbed norms and an input for it."""
    cls, shape = MODELS[name]
    torch.manual_seed(seed)
    model = perturb_norms(cls(), seed).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    return model, x


def atol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-10
