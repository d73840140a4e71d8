"""API misuse of the balancers (issue 9, item 6-7): clear errors instead of silent ascent or no-ops."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mtnorm
from mtnorm import balance


def _model_and_losses(offset: float = 0.0):
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    x = torch.randn(8, 4)
    z = shared(x)
    losses = {t: heads[t](z).pow(2).mean() + offset for t in ("a", "b")}
    return shared, heads, losses


@pytest.mark.parametrize("name", ["db_mtl", "log", "famo"])
def test_log_based_methods_refuse_non_positive_losses(name):
    shared, _, losses = _model_and_losses(offset=-100.0)
    b = balance.get(name, tasks=["a", "b"])
    with pytest.raises(ValueError, match=r"needs positive losses.*'a' = .*add an offset"):
        b.backward(losses, list(shared.parameters()))
    assert all(p.grad is None for p in shared.parameters())


@pytest.mark.parametrize("name", ["pcgrad", "ew"])
def test_log_losses_wrapper_refuses_non_positive_losses(name):
    b = balance.get(name, log_losses=True, tasks=["a", "b"])
    with pytest.raises(ValueError, match="needs positive losses"):
        b.aggregate(torch.randn(2, 5), torch.tensor([0.5, -0.1]))


def test_methods_without_logs_accept_negative_losses():
    d = balance.get("pcgrad").aggregate(torch.eye(2, 5, dtype=torch.float64), torch.tensor([-1.0, -2.0]))
    assert torch.isfinite(d).all()


def test_a_loss_without_graph_is_refused():
    shared, _, losses = _model_and_losses()
    losses["b"] = losses["b"].detach()
    with pytest.raises(ValueError, match="task 'b' has no autograd graph"):
        balance.get("ew").backward(losses, list(shared.parameters()))


def test_task_specific_parameters_in_shared_warn():
    backbone = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    heads = mtnorm.TaskHeads({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
    model = mtnorm.convert(nn.Sequential(backbone, heads), ["a", "b"], norm="bn")
    out = mtnorm.forward_tasks(model, torch.randn(8, 4), mode="sequential")
    losses = {t: o.pow(2).mean() for t, o in out.items()}
    with pytest.warns(UserWarning, match="task-specific parameter"):
        balance.get("ew").backward(losses, list(model.parameters()))
    out = mtnorm.forward_tasks(model, torch.randn(8, 4), mode="sequential")
    losses = {t: o.pow(2).mean() for t, o in out.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balance.get("ew").backward(losses, mtnorm.shared_parameters(model))


@pytest.mark.parametrize("tasks", [{"a", "b"}, frozenset({"a", "b"})])
def test_a_set_of_tasks_is_refused(tasks):
    with pytest.raises(TypeError, match="ordered sequence"):
        balance.get("uw", tasks=tasks)
    with pytest.raises(TypeError, match="ordered sequence"):
        mtnorm.convert(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), tasks)


def test_db_mtl_reports_weight_zero_for_a_task_with_zero_gradient():
    g = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    b = balance.get("db_mtl")
    d = b.aggregate(g, torch.tensor([1.0, 1.0], dtype=torch.float64))
    out = b.combine(g, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert out.weights[1] == 0 and out.weights[0] == pytest.approx(1.0, rel=1e-6)
    assert torch.isfinite(d).all()
