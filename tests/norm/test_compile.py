"""torch.compile (issue 8, item 4): one compiled graph serves every task, and a batched training
step compiles with inductor and matches eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtnorm

TASKS = ("a", "b", "c")


def net(norm: str = "sigma") -> nn.Module:
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8),
        mtnorm.TaskHeads({t: nn.Linear(8, 2) for t in TASKS}),
    )
    return mtnorm.convert(body, TASKS, norm=norm)


class CountingBackend:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("norm", ["bn", "sigma"])
def test_one_graph_serves_every_task(norm):
    torch._dynamo.reset()
    model, eager = net(norm), net(norm)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 3, 6, 6)
    after_first_task = None
    for _ in range(2):
        for t in TASKS:
            with mtnorm.use_task(model, t):
                y = compiled(x)[t]
            with mtnorm.use_task(eager, t):
                torch.testing.assert_close(y, eager(x)[t], atol=1e-6, rtol=1e-6)
            after_first_task = after_first_task or backend.graphs
    # the graphs of the first task (the trunk; the heads run eagerly after a graph break) serve
    # every other task: no recompile
    assert backend.graphs == after_first_task
    for (name, b), b_ref in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, b_ref, msg=name)  # running statistics updated per task
    graphs = backend.graphs
    mtnorm.forward_tasks(compiled, x, mode="batched")
    batched = backend.graphs
    assert batched - graphs <= after_first_task  # the batched pass: its own graphs, once
    mtnorm.forward_tasks(compiled, x, mode="batched")
    with mtnorm.use_task(model, "c"):
        compiled(x)
    assert backend.graphs == batched


def test_compiled_code_still_refuses_an_unrouted_call():
    torch._dynamo.reset()
    compiled = torch.compile(net(), backend=CountingBackend())
    with pytest.raises(Exception, match="no task chosen"):
        compiled(torch.randn(2, 3, 6, 6))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_a_training_step_compiles_with_inductor_and_matches_eager(mode):
    torch._dynamo.reset()
    model = net("sigma")
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)

    def step(m):
        out = mtnorm.forward_tasks(m, x, mode=mode)
        loss = sum((i + 1) * o.pow(2).mean() for i, o in enumerate(out.values()))
        loss.backward()
        return loss

    loss = step(torch.compile(model))  # inductor, the default backend
    torch.testing.assert_close(loss, step(eager))
    for (name, p), p_ref in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)
    for (name, b), b_ref in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(b, b_ref, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("norm", ["bn", "sigma"])
def test_sequential_compiled_training_step_matches_eager(norm):
    """T task passes through one compiled graph, then one backward: the route changes between the
    passes, so what backward saved must not be the route itself."""
    torch._dynamo.reset()
    model = net(norm)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3, 6, 6)
    losses = []
    for m in (compiled, eager):
        out = mtnorm.forward_tasks(m, x, mode="sequential")
        loss = sum((i + 1) * o.pow(2).mean() for i, o in enumerate(out.values()))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), p_ref in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-6, rtol=1e-5, msg=name)
