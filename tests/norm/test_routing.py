"""Task routing: use_task, forward_tasks in every mode, TaskHeads, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from norm_models import MODELS, atol, make
from torch import nn

import mtnorm
from mtnorm import PerTask, TaskHeads

TASKS = ("seg", "depth", "normal")


def _weighted_sum(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    # different weights per task, so a gradient routed to the wrong task would show
    return sum((i + 1) * (out.sin() * out).mean() for i, out in enumerate(outputs.values()))


def _compare_modes(model: nn.Module, x: torch.Tensor, mode: str, tol: float, train: bool) -> None:
    ref = copy.deepcopy(model).train(train)
    other = copy.deepcopy(model).train(train)
    outs_ref = {}
    for t in TASKS:
        with mtnorm.use_task(ref, t):
            outs_ref[t] = ref(x)
    outs = mtnorm.forward_tasks(other, x, mode=mode)
    assert list(outs) == list(TASKS)
    for t in TASKS:
        torch.testing.assert_close(outs[t], outs_ref[t], atol=tol, rtol=0)
    _weighted_sum(outs_ref).backward()
    _weighted_sum(outs).backward()
    # Gradients of float32 parameters sum many terms in another order than the native kernel does;
    # on these nets native float32 itself is 2e-5 away from float64 for a bias that feeds a batch
    # norm (its gradient is a near-cancellation), so float32 gradients are held to 5e-5.
    grad_tol = tol if tol < 1e-6 else 5e-5
    for (name, p_ref), p in zip(ref.named_parameters(), other.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=grad_tol, rtol=1e-4, msg=name)
    for (name, b_ref), b in zip(ref.named_buffers(), other.buffers()):
        torch.testing.assert_close(b, b_ref, atol=tol, rtol=0, msg=name)


# DW-BN's batched training pass mixes every task's *batch* statistics by design, so it is compared in
# eval mode here and checked against its own formula in test_dw_batched_training_mixes_...
NORM_AND_MODE = [
    (n, t) for n in ("bn", "sigma", "adain", "dw") for t in (True, False) if (n, t) != ("dw", True)
]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(
    "norm, train", NORM_AND_MODE, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in NORM_AND_MODE]
)
@pytest.mark.parametrize("mode", ["batched", "auto"])
def test_every_mode_equals_sequential_use_task_passes(name, norm, mode, train, dtype) -> None:
    model, x = make(name, dtype)
    model = mtnorm.convert(model, TASKS, norm=norm, shift=True if norm == "sigma" else None)
    with torch.no_grad():  # tasks must differ, or routing mistakes would cancel out
        for p in mtnorm.task_parameters(model):
            p.add_(torch.randn_like(p) * 0.3)
    _compare_modes(model, x, mode, atol(dtype), train)


def test_dw_batched_training_mixes_batch_statistics_of_all_tasks() -> None:
    layer = mtnorm.DynamicWeightedBatchNorm(2, TASKS, self_weight=0.6).double()
    x = torch.randn(12, 2, dtype=torch.double)
    with mtnorm.batched_tasks(layer):
        y = layer(x)
    chunks = x.view(3, 4, 2)
    mean, var = chunks.mean(1), chunks.var(1, unbiased=False)
    mix = layer.mixing()
    expected = (chunks - (mix @ mean)[:, None]) / torch.sqrt((mix @ var)[:, None] + layer.eps)
    torch.testing.assert_close(y, expected.reshape(12, 2))


def test_shared_statistics_batched_equals_sequential() -> None:
    model, x = make("conv")
    model = mtnorm.convert(model, TASKS, norm="sigma", share_stats=True, shift=True)
    _compare_modes(model, x, "batched", 1e-10, True)


class TupleDictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        return h, {"twice": 2 * h, "sum": h.sum(1)}


def test_batched_outputs_that_are_tuples_and_dicts_are_split_per_task() -> None:
    torch.manual_seed(0)
    model = mtnorm.convert(TupleDictNet().double(), TASKS, norm="bn")
    with torch.no_grad():
        model.body[1].weight.copy_(torch.randn(3, 6))
    x = torch.randn(5, 4, dtype=torch.double)
    seq = mtnorm.forward_tasks(copy.deepcopy(model), x, mode="sequential")
    bat = mtnorm.forward_tasks(model, x, mode="batched")
    for t in TASKS:
        assert isinstance(bat[t], tuple) and set(bat[t][1]) == {"twice", "sum"}
        torch.testing.assert_close(bat[t][0], seq[t][0])
        torch.testing.assert_close(bat[t][1]["sum"], seq[t][1]["sum"])


def _head_model(convert: bool) -> nn.Module:
    torch.manual_seed(0)
    heads = TaskHeads({"seg": nn.Linear(6, 3), "depth": nn.Linear(6, 1), "normal": nn.Linear(6, 2)})
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), heads).double()
    return mtnorm.convert(model, TASKS, norm="sigma") if convert else model


def test_heads_with_different_shapes_come_back_per_task_in_every_mode() -> None:
    model = _head_model(convert=True)
    x = torch.randn(5, 4, dtype=torch.double)
    seq = mtnorm.forward_tasks(copy.deepcopy(model), x, mode="sequential")
    bat = mtnorm.forward_tasks(model, x, mode="batched")
    assert [seq[t].shape[1] for t in TASKS] == [3, 1, 2]
    for t in TASKS:
        torch.testing.assert_close(bat[t], seq[t])
    with mtnorm.use_task(model, "depth"):
        out = model(x)
    assert isinstance(out, PerTask) and list(out) == ["depth"]


def test_hard_sharing_model_runs_once_and_returns_every_head() -> None:
    model = _head_model(convert=False)
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    outs = mtnorm.forward_tasks(model, torch.randn(5, 4, dtype=torch.double))
    assert list(outs) == list(TASKS) and len(calls) == 1
    assert mtnorm.tasks_of(model) == TASKS


def test_use_task_restores_the_previous_route_and_nests() -> None:
    model = _head_model(convert=True)
    layer = model[1]
    assert layer.route is None
    with mtnorm.use_task(model, "depth"):
        assert layer.route == 1
        with mtnorm.use_task(model, "normal"):
            assert layer.route == 2
        assert layer.route == 1
    assert layer.route is None
    with pytest.raises(ZeroDivisionError), mtnorm.use_task(model, "seg"):
        raise ZeroDivisionError
    assert layer.route is None


def test_routing_errors_are_clear() -> None:
    model = _head_model(convert=True)
    x = torch.randn(5, 4, dtype=torch.double)
    with pytest.raises(RuntimeError, match="no task chosen.*use_task"):
        model(x)
    with (
        pytest.raises(KeyError, match=r"unknown task 'sky'.*\['seg', 'depth', 'normal'\]"),
        mtnorm.use_task(model, "sky"),
    ):
        pass
    with pytest.raises(KeyError, match="unknown tasks"):
        mtnorm.forward_tasks(model, x, tasks=["sky"])
    with pytest.raises(ValueError, match="unknown mode"):
        mtnorm.forward_tasks(model, x, mode="parallel")
    with pytest.raises(ValueError, match="no task-specific modules"):
        mtnorm.tasks_of(nn.Linear(2, 2))


def test_forward_tasks_on_a_subset_runs_only_those_tasks() -> None:
    model = _head_model(convert=True)
    outs = mtnorm.forward_tasks(model, torch.randn(5, 4, dtype=torch.double), tasks=["normal"])
    assert list(outs) == ["normal"]


def test_two_models_route_independently() -> None:
    a, b = _head_model(convert=True), _head_model(convert=True)
    with mtnorm.use_task(a, "seg"):
        assert b[1].route is None


@pytest.mark.parametrize(
    "t, batch, expected", [(3, 32, "sequential"), (40, 8, "batched"), (2, 8, "sequential")]
)
def test_auto_rule_on_cpu(t, batch, expected) -> None:
    tasks = [f"t{i}" for i in range(t)]
    model = mtnorm.convert(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), tasks)
    assert mtnorm.choose_mode(model, torch.zeros(batch, 3), t) == expected
