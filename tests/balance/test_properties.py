"""One set of property assertions, applied to every method that claims the property.

Each property is a function ``assert_<property>(name, grads, losses)``; the lists below say which
methods claim it, and pytest runs every pair on matrices of full rank, of rank T - 1 and with a
duplicated row.
"""

from __future__ import annotations

import pytest
import torch
from balance_helpers import losses as make_losses
from balance_helpers import make, matrix

from mtnorm import balance

KINDS = ("full", "deficient", "duplicated")

# Where a property is only defined on some matrices, the pairs are left out of the grid (not
# skipped): IMTL-G's solution is unique only for linearly independent gradients, and when a
# positive combination of the gradients vanishes (rank deficient) Nash-MTL's and FairGrad's
# K a = a^(-1/alpha) has no solution, so no direction improves every task.
UNDEFINED = {("imtl_g", "deficient"), ("imtl_g", "duplicated"), ("nash_mtl", "deficient"),
             ("fairgrad", "deficient")}


def grid(names: list[str]) -> list[tuple[str, str]]:
    return [(n, k) for n in names for k in KINDS if (n, k) not in UNDEFINED]

PERMUTATION_INVARIANT = [
    "ew", "uw", "dwa", "gls", "imtl_l", "log", "famo", "db_mtl", "mgda", "cagrad",
    "nash_mtl", "aligned_mtl", "gradnorm", "upgrad", "fairgrad",
]  # fmt: skip
NON_CONFLICTING = ["mgda", "upgrad", "nash_mtl", "fairgrad"]
LINEAR_UNDER_SCALING = [
    "ew", "uw", "dwa", "rlw", "gls", "imtl_l", "log", "famo", "db_mtl", "mgda", "pcgrad",
    "gradvac", "cagrad", "imtl_g", "aligned_mtl", "gradnorm", "upgrad",
]  # fmt: skip
SCALE_INVARIANT = ["nash_mtl"]
LOSS_SCALE_INVARIANT = ["db_mtl", "log"]  # multiply l_t and g_t by c: same direction


def close(actual: torch.Tensor, expected: torch.Tensor, scale: float, rtol: float = 1e-6) -> None:
    """Equal up to ``rtol`` relative to ``scale`` (the size of the gradients: ``d`` may be ~0)."""
    atol = rtol * max(scale, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def assert_permutation_invariant(name: str, g: torch.Tensor, l: torch.Tensor) -> None:
    perm = torch.tensor([2, 0, 1])
    close(make(name).aggregate(g[perm], l[perm]), make(name).aggregate(g, l), float(g.norm()), 1e-5)


def assert_non_conflicting(name: str, g: torch.Tensor, l: torch.Tensor) -> None:
    d = make(name).aggregate(g, l)
    assert (g @ d >= -1e-8 * g.norm() ** 2).all(), g @ d


def assert_linear_under_scaling(name: str, g: torch.Tensor, l: torch.Tensor) -> None:
    for c in (0.01, 3.0):
        close(make(name).aggregate(c * g, l), c * make(name).aggregate(g, l), c * float(g.norm()), 1e-5)


def assert_scale_invariant(name: str, g: torch.Tensor, l: torch.Tensor) -> None:
    close(make(name).aggregate(7.0 * g, l), make(name).aggregate(g, l), float(g.norm()))


def assert_loss_scale_invariant(name: str, g: torch.Tensor, l: torch.Tensor) -> None:
    c = torch.tensor([1.0, 50.0, 1.0], dtype=g.dtype)
    expected = make(name).aggregate(g, l)
    close(make(name).aggregate(c[:, None] * g, c * l), expected, float(expected.norm()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
def test_permutation_invariant(name: str, kind: str) -> None:
    assert_permutation_invariant(name, matrix(kind), make_losses())


@pytest.mark.parametrize("kind", ("full",))
def test_imtl_g_permutation_invariant(kind: str) -> None:
    # IMTL-G's solution is unique only when the gradients are linearly independent.
    assert_permutation_invariant("imtl_g", matrix(kind), make_losses())


@pytest.mark.parametrize("name, kind", grid(NON_CONFLICTING))
def test_non_conflicting(name: str, kind: str) -> None:
    for seed in range(5):
        assert_non_conflicting(name, matrix(kind, seed=seed), make_losses(seed=seed))


@pytest.mark.parametrize("name, kind", grid(LINEAR_UNDER_SCALING))
def test_linear_under_scaling(name: str, kind: str) -> None:
    assert_linear_under_scaling(name, matrix(kind), make_losses())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SCALE_INVARIANT)
def test_scale_invariant(name: str, kind: str) -> None:
    assert_scale_invariant(name, matrix(kind), make_losses())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", LOSS_SCALE_INVARIANT)
def test_loss_scale_invariant(name: str, kind: str) -> None:
    assert_loss_scale_invariant(name, matrix(kind), make_losses())


@pytest.mark.parametrize("name", balance.available())
@pytest.mark.parametrize("kind", ("zero_row", "all_zero"))
def test_zero_gradients_never_nan(name: str, kind: str) -> None:
    g = matrix("full")
    g[1] = 0
    if kind == "all_zero":
        g.zero_()
    b = make(name)
    for _ in range(3):
        d = b.aggregate(g, make_losses())
        assert torch.isfinite(d).all(), d
    if kind == "all_zero":
        assert d.abs().max() == 0


@pytest.mark.parametrize("name", balance.available())
def test_every_method_preserves_dtype_and_shape(name: str) -> None:
    g = matrix("full").float()
    d = make(name).aggregate(g, make_losses().float())
    assert d.shape == (g.shape[1],) and d.dtype == torch.float32


@pytest.mark.parametrize("name", balance.available())
def test_one_task(name: str) -> None:
    g = matrix("full", t=1)
    d = make(name, tasks=("a",)).aggregate(g, make_losses(t=1))
    # With one task every method moves along that task's gradient (a positive multiple).
    assert torch.nn.functional.cosine_similarity(d, g[0], dim=0) > 1 - 1e-9
