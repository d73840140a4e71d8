"""Parameter partitions and the paper's discriminative learning rates."""

from __future__ import annotations

import pytest
import torch
from norm_models import Block, ConvNet
from torch import nn

import mtnorm
from mtnorm import TaskHeads

TASKS = ("a", "b")


def _model() -> nn.Module:
    heads = TaskHeads({"a": nn.Linear(5, 2), "b": nn.Linear(5, 1)})
    return nn.Sequential(ConvNet(), heads)


def test_shared_and_task_parameters_partition_the_model() -> None:
    model = mtnorm.convert(_model(), TASKS, norm="sigma")
    shared = {id(p) for p in mtnorm.shared_parameters(model)}
    specific = {id(p) for p in mtnorm.task_parameters(model)}
    assert shared.isdisjoint(specific)
    assert shared | specific == {id(p) for p in model.parameters()}
    norm = model[0].features[1]
    assert id(norm.gamma) in specific and id(model[0].features[0].weight) in shared
    assert id(model[1].heads["a"].weight) in specific


def test_param_groups_give_norms_the_paper_multipliers_and_no_decay() -> None:
    body = nn.Sequential(ConvNet(), nn.Unflatten(1, (1, 5)), Block(5, 1))
    model = mtnorm.convert(body, TASKS, norm="sigma")
    groups = {g["name"]: g for g in mtnorm.param_groups(model, lr=1e-3, weight_decay=0.01)}
    assert set(groups) == {"norm", "layernorm", "rest"}
    assert groups["norm"]["lr"] == pytest.approx(0.1) and groups["norm"]["weight_decay"] == 0
    assert groups["layernorm"]["lr"] == pytest.approx(0.01)
    assert groups["rest"]["lr"] == pytest.approx(1e-3) and groups["rest"]["weight_decay"] == 0.01
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
    gammas = {id(m.gamma) for m in model.modules() if isinstance(m, mtnorm.TaskSigmoidBatchNorm)}
    assert gammas <= {id(p) for p in groups["norm"]["params"]}
    torch.optim.Adam(list(groups.values()))  # torch accepts the groups as they are


def test_plain_norms_frozen_params_and_bad_lr() -> None:
    model = ConvNet()
    model.fc.requires_grad_(False)
    groups = {g["name"]: g for g in mtnorm.param_groups(model, lr=0.1)}
    assert set(groups) == {"other_norm", "rest"}
    assert all(p.requires_grad for g in groups.values() for p in g["params"])
    with pytest.raises(ValueError, match="lr must be positive"):
        mtnorm.param_groups(model, lr=0)
