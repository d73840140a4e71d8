"""``backward`` on real models agrees with ``aggregate`` on independently computed gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from balance_helpers import TASKS3, HardSharing, conv_tsbn, make, task_losses

import mtnorm
from mtnorm import balance

GRADIENT_METHODS = {
    "mgda", "pcgrad", "gradvac", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad", "fairgrad",
}  # fmt: skip


def per_task(losses: dict, params: list) -> tuple[torch.Tensor, list[list]]:
    """Reference per-task gradients: plain autograd, one task and one parameter list at a time."""
    rows, each = [], []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        each.append(grads)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows), each


def expected_loss_scale(name: str, diag: balance.Diagnostics, l: torch.Tensor) -> torch.Tensor:
    if name in GRADIENT_METHODS:
        return torch.ones_like(l)
    if name == "db_mtl":
        return 1 / (l + 1e-8)
    return diag.weights.to(l)  # loss weighting and GradNorm scale each loss by its weight


def flat_grad(params: list) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def data(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    return x, torch.randn(n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("name", balance.available())
def test_backward_agrees_with_aggregate(name: str) -> None:
    torch.manual_seed(0)
    model = HardSharing().double()
    shared = list(model.encoder.parameters())
    heads = {t: list(model.heads.heads[t].parameters()) for t in TASKS3}
    b = make(name)
    ref = copy.deepcopy(b)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        x, y = data(step)
        losses = task_losses(model(x), y)
        g, _ = per_task(losses, shared)
        l = torch.stack(list(losses.values())).detach()
        head_grads = [per_task({t: losses[t]}, heads[t])[1][0] for t in TASKS3]
        d = ref.aggregate(g, l)

        diag = b.backward(losses, shared)
        torch.testing.assert_close(flat_grad(shared), d, rtol=1e-6, atol=1e-9)
        scale = expected_loss_scale(name, diag, l)
        torch.testing.assert_close(diag.loss_scale.to(l), scale)
        for t, task in enumerate(TASKS3):
            for p, g_ref in zip(heads[task], head_grads[t]):
                torch.testing.assert_close(p.grad, scale[t] * g_ref, rtol=1e-6, atol=1e-10)
        if name not in GRADIENT_METHODS | {"db_mtl"}:
            torch.testing.assert_close(diag.weights.to(g) @ g, d, rtol=1e-6, atol=1e-9)
    for p, q in zip(b.parameters(), ref.parameters()):  # learned weights got the same gradients
        torch.testing.assert_close(p.grad, q.grad)
    assert b.step == ref.step == 3


@pytest.mark.parametrize("name", ["db_mtl", "mgda", "uw"])
def test_grad_modes_agree(name: str) -> None:
    results = {}
    # max-norm's EMA refuses rep gradients (test_a_moving_average_of_gradients_refuses_rep_gradients)
    for mode in ("autograd", "batched") + (() if make(name).gradient_state else ("rep",)):
        torch.manual_seed(0)
        model = HardSharing().double()
        x, y = data()
        losses = task_losses(model(x), y)
        rep = model.features if mode == "rep" else None
        diag = make(name).backward(losses, list(model.encoder.parameters()), rep=rep, grad_mode=mode)
        results[mode] = [p.grad.clone() for p in model.parameters()]
        assert diag.grad_norms is not None and diag.cosines.shape == (3, 3)
    if name == "uw":
        # Loss weighting is linear, so aggregating rep gradients gives the same update.
        for a, c in zip(results["autograd"], results["rep"]):
            torch.testing.assert_close(a, c)
    for a, c in zip(results["autograd"], results["batched"]):
        torch.testing.assert_close(a, c)


def test_rep_mode_against_reference() -> None:
    torch.manual_seed(0)
    model = HardSharing().double()
    x, y = data()
    losses = task_losses(model(x), y)
    shared = list(model.encoder.parameters())
    rep = model.features
    g = torch.stack([torch.autograd.grad(v, rep, retain_graph=True)[0].reshape(-1) for v in losses.values()])
    l = torch.stack(list(losses.values())).detach()
    d = balance.get("imtl_g", log_losses=True).aggregate(g, l)
    expected = torch.autograd.grad(rep, shared, d.view_as(rep), retain_graph=True)
    balance.get("imtl_g", log_losses=True).backward(losses, shared, rep=rep)
    for p, e in zip(shared, expected):
        torch.testing.assert_close(p.grad, e)


def test_loss_weighting_cheap_path_and_forced_diagnostics() -> None:
    torch.manual_seed(0)
    model = HardSharing().double()
    x, y = data()
    shared = list(model.encoder.parameters())
    diag = balance.get("ew").backward(task_losses(model(x), y), shared)
    assert diag.grad_norms is None and diag.cosines is None
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    diag = balance.get("ew").backward(task_losses(model(x), y), shared, diagnostics=True)
    assert diag.grad_norms.shape == (3,)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    assert set(diag.as_dict()) >= {"weight/a", "grad_norm/c", "cos/a/b"}


def test_backward_accumulates_like_tensor_backward() -> None:
    torch.manual_seed(0)
    model = HardSharing().double()
    x, y = data()
    shared = list(model.encoder.parameters())
    balance.get("mgda").backward(task_losses(model(x), y), shared)
    once = [p.grad.clone() for p in model.parameters()]
    balance.get("mgda").backward(task_losses(model(x), y), shared)
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g)


@pytest.mark.parametrize("forward_mode", ["sequential", "batched"])
@pytest.mark.parametrize("name", ["db_mtl", "ew", "pcgrad"])
def test_task_specific_norm_model(name: str, forward_mode: str) -> None:
    torch.manual_seed(0)
    model = conv_tsbn().double()
    shared, specific = mtnorm.shared_parameters(model), mtnorm.task_parameters(model)
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)
    b = make(name)
    ref = copy.deepcopy(b)

    outputs = mtnorm.forward_tasks(model, x, mode=forward_mode)
    losses = task_losses(outputs, y)
    g, _ = per_task(losses, shared)
    _, spec = per_task(losses, specific)
    l = torch.stack(list(losses.values())).detach()
    d = ref.aggregate(g, l)
    diag = b.backward(losses, shared)

    torch.testing.assert_close(flat_grad(shared), d)
    scale = expected_loss_scale(name, diag, l)
    for i, p in enumerate(specific):
        expected = sum(scale[t] * spec[t][i] for t in range(3))
        torch.testing.assert_close(p.grad, expected)


@pytest.mark.parametrize("name", ["ew", "db_mtl", "upgrad"])
def test_sequential_task_passes_backpropagate_each_layer_once_per_task(name: str) -> None:
    # The free per-task gradients: every method runs each conv's backward exactly T times on
    # T disjoint task graphs, as one ordinary backward of the summed loss does.
    model = conv_tsbn().double()
    conv = model[0][0]
    calls = []
    conv.register_full_backward_hook(lambda *args: calls.append(1))
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    losses = task_losses(mtnorm.forward_tasks(model, x, mode="sequential"), torch.zeros(6))
    make(name).backward(losses, mtnorm.shared_parameters(model))
    assert len(calls) == 3


def test_rep_mode_frees_each_head_graph_and_backpropagates_the_encoder_once() -> None:
    torch.manual_seed(0)
    model = HardSharing().double()
    calls = []

    def count_backwards(module, inputs, out) -> None:
        out.register_hook(calls.append)

    model.encoder[0].register_forward_hook(count_backwards)
    x, y = data()
    losses = task_losses(model(x), y)
    balance.get("imtl_g").backward(losses, list(model.encoder.parameters()), rep=model.features)
    assert len(calls) == 1


@pytest.mark.parametrize("name, kwargs", [("db_mtl", {}), ("uw", {"max_norm": True, "tasks": list(TASKS3)})])
def test_a_moving_average_of_gradients_refuses_rep_gradients(name, kwargs) -> None:
    """Rows of rep gradients are one batch's samples: averaging them over steps mixes images, so
    max-norm (DB-MTL) needs parameter gradients, as LibMTL requires (rep_grad=False)."""
    torch.manual_seed(0)
    model = HardSharing().double()
    x, y = data()
    losses = task_losses(model(x), y)
    balancer = balance.get(name, **kwargs)
    with pytest.raises(ValueError, match="moving average of the task gradients.*without rep"):
        balancer.backward(losses, list(model.encoder.parameters()), rep=model.features)
    assert all(p.grad is None for p in model.parameters())
    balancer.backward(losses, list(model.encoder.parameters()))  # parameter gradients: fine


@pytest.mark.parametrize(
    ("kwargs", "scale"),
    [
        ({"name": "pcgrad", "log_losses": True}, lambda l: 1 / (l + 1e-8)),
        ({"name": "ew", "max_norm": True}, torch.ones_like),
        ({"name": "log", "max_norm": {"beta": 0.5}}, lambda l: 1 / (l + 1e-8)),
    ],
)
def test_compositions_through_backward(kwargs, scale) -> None:
    torch.manual_seed(0)
    model = HardSharing().double()
    shared = list(model.encoder.parameters())
    b = make(**kwargs)
    ref = copy.deepcopy(b)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        x, y = data(step)
        losses = task_losses(model(x), y)
        g, _ = per_task(losses, shared)
        l = torch.stack(list(losses.values())).detach()
        head = [per_task({t: losses[t]}, list(model.heads.heads[t].parameters()))[1][0] for t in TASKS3]
        d = ref.aggregate(g, l)
        b.backward(losses, shared)
        torch.testing.assert_close(flat_grad(shared), d)
        for t, task in enumerate(TASKS3):
            for p, g_ref in zip(model.heads.heads[task].parameters(), head[t]):
                torch.testing.assert_close(p.grad, scale(l)[t] * g_ref)


def assert_same_state(a, b) -> None:
    """Two ``state_dict`` values equal exactly: tensors elementwise, containers recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), (a, b)
        for u, v in zip(a, b):
            assert_same_state(u, v)
    else:
        assert a == b, (a, b)


LOSS_WEIGHTINGS = [
    ("ew", {}), ("uw", {}), ("dwa", {}), ("rlw", {}), ("gls", {}), ("imtl_l", {}), ("log", {}),
    ("famo", {}), ("ew", {"log_losses": True}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs"), LOSS_WEIGHTINGS)
def test_weighted_objective_backward_writes_what_backward_writes(name, kwargs) -> None:
    """``L.backward()`` of ``weighted_objective``'s ``L = sum_t w_t l_t`` gives the gradients,
    diagnostics and method state of ``backward`` (3 steps on changing data, so that stateful
    methods use their state); ``reduce`` gets the T loss values, once."""
    torch.manual_seed(0)
    model = HardSharing().double()
    twin = copy.deepcopy(model)
    ours, theirs = make(name, **kwargs), make(name, **kwargs)
    calls = []

    def reduce(values: torch.Tensor) -> torch.Tensor:
        calls.append(values.shape)
        return values

    for step in range(3):
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        x, y = data(step)
        want = theirs.backward(task_losses(model(x), y), list(model.encoder.parameters()))
        objective, got = ours.weighted_objective(task_losses(twin(x), y), reduce=reduce)
        assert objective.dim() == 0 and objective.requires_grad
        objective.backward()
        for p, q in zip(twin.parameters(), model.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        assert got.step == want.step == step
        torch.testing.assert_close(got.weights, want.weights)
        torch.testing.assert_close(got.losses, want.losses)
    assert calls == [(3,)] * 3
    assert ours.step == theirs.step == 3
    for p, q in zip(ours.parameters(), theirs.parameters()):  # learned weights' .grad (UW, IMTL-L)
        torch.testing.assert_close(p.grad, q.grad)
    assert_same_state(ours.state_dict(), theirs.state_dict())


def test_weighted_objective_refuses_gradient_methods_and_checks_the_reduced_values() -> None:
    model = HardSharing().double()
    x, y = data()
    with pytest.raises(TypeError, match="PCGrad combines per-task gradients"):
        make("pcgrad").weighted_objective(task_losses(model(x), y))
    b = make("uw")
    before = copy.deepcopy(b.state_dict())

    def poison(values: torch.Tensor) -> torch.Tensor:  # another process's loss was NaN
        return values * torch.tensor([1.0, float("nan"), 1.0], dtype=values.dtype)

    with pytest.raises(balance.NonFiniteError, match="loss for task 'b' at step 0"):
        b.weighted_objective(task_losses(model(x), y), reduce=poison)
    assert b.step == 0 and b.log_scale.grad is None
    assert_same_state(b.state_dict(), before)


@pytest.mark.parametrize("name", ["uw", "dwa", "famo", "rlw"])
def test_snapshot_restore_undoes_a_weighted_step(name) -> None:
    """What a trainer does when fp16 overflow skips a step: the method's state, ``step`` and the
    learned weights' ``.grad`` return to the snapshot's, and the next step repeats the skipped one."""
    model = HardSharing().double()
    b = make(name)
    x, y = data()
    b.weighted_objective(task_losses(model(x), y))  # a first step, so there is state to keep
    before = copy.deepcopy(b.state_dict())
    grads = [None if p.grad is None else p.grad.clone() for p in b.parameters()]
    snapshot = b.snapshot()
    x2, y2 = data(1)
    _, skipped = b.weighted_objective(task_losses(model(x2), y2))
    b.restore(snapshot)
    assert b.step == 1
    assert_same_state(b.state_dict(), before)
    for p, g in zip(b.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
    _, again = b.weighted_objective(task_losses(model(x2), y2))
    torch.testing.assert_close(again.weights, skipped.weights)
