"""The capacity split of paper §5.1 (Eq. 4-5)."""

from __future__ import annotations

import math

import pytest
import torch

import mtnorm
from mtnorm.analysis.capacity import capacity_split, importance_vectors
from mtnorm.models import ToyEncoder, build_method, linear_heads


def test_two_tasks_split_by_the_cosine():
    imp = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    out = capacity_split(imp, ["a", "b"])
    # cos(a, b) = 1/2: the shared part is half of C_t, the independent part sqrt(3)/2 of it
    assert out["a"]["total"] == pytest.approx(0.5)
    assert out["a"]["shared"] == pytest.approx(0.25)
    assert out["a"]["independent"] == pytest.approx(0.5 * math.sqrt(3) / 2)


def test_pythagoras_holds_and_identical_tasks_share_everything():
    torch.manual_seed(0)
    imp = torch.rand(4, 50)
    for c in capacity_split(imp).values():
        assert c["shared"] ** 2 + c["independent"] ** 2 == pytest.approx(c["total"] ** 2)
    same = capacity_split(torch.ones(2, 5) * 0.3)
    assert same["0"]["independent"] == pytest.approx(0.0, abs=1e-9)
    assert same["0"]["shared"] == pytest.approx(0.3)


def test_orthogonal_tasks_are_fully_independent_and_one_task_has_no_shared_part():
    out = capacity_split(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert out["0"]["shared"] == pytest.approx(0.0) and out["0"]["independent"] == pytest.approx(0.5)
    assert capacity_split(torch.tensor([[0.2, 0.4]]))["0"]["shared"] == 0.0


def test_importance_vectors_of_a_tssbn_model():
    model = build_method("tssbn", lambda n: ToyEncoder(8, 16, n), ["a", "b"], linear_heads(["a", "b"], 16, 3))
    imp = importance_vectors(model)
    assert imp.shape == (2, 32)
    assert torch.allclose(imp, torch.full_like(imp, 0.5))  # fresh gates sit at sigmoid(0)
    assert mtnorm.tasks_of(model) == ("a", "b")


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match=r"\[T, F\] matrix"):
        capacity_split(torch.ones(3))
