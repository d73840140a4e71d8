"""Lookahead task affinity (TAG): a closed form on a linear model, signs on tasks that provably help
or hurt each other, the model left untouched, a reference by deep copies on a TSσBN model; ATI and
the agreement with the gate similarity on hand-made matrices."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import mtnorm
from mtnorm.analysis import task_similarity
from mtnorm.analysis.affinity import (
    affinity_agreement,
    average_task_interference,
    lookahead_affinity,
    task_interference,
)
from mtnorm.models.methods import MultiTaskNet
from mtnorm.models.toy import ToyEncoder


def mse(out, target):
    return ((out.reshape(target.shape) - target) ** 2).mean()


def linear_model(d: int = 3) -> nn.Module:
    """A shared ``w`` (``[d] -> [1]``, no bias) and parameter-free identical heads: ``ŷ_t = X w``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 1, bias=False), mtnorm.TaskHeads({t: nn.Flatten(0) for t in "abc"}))
    return model.double()


def linear_batches(n_batches: int = 2, n: int = 16, d: int = 3):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * torch.randn(
            n, generator=gen, dtype=torch.float64
        )
        out.append((x, {"a": y, "b": y.clone(), "c": -y}))  # b = a, c = -a
    return out


def test_closed_form_on_a_linear_model_with_squared_loss():
    model, batches, lr = linear_model(), linear_batches(), 0.05
    z = lookahead_affinity(model, batches, dict.fromkeys("abc", mse), lr)
    assert z.dtype == torch.float64 and z.shape == (3, 3)
    w = model[0].weight.detach().numpy().ravel()
    expected = np.zeros((3, 3))
    for x, ys in batches:
        x = x.numpy()
        targets = [ys[t].numpy() for t in "abc"]

        def loss(v, y, x=x):
            return np.mean((x @ v - y) ** 2)

        for i, yi in enumerate(targets):
            g = 2 / len(x) * x.T @ (x @ w - yi)  # ∇_w mean((Xw − y)²)
            for j, yj in enumerate(targets):
                expected[i, j] += 1 - loss(w - lr * g, yj) / loss(w, yj)
    np.testing.assert_allclose(z.numpy(), expected / len(batches), rtol=0, atol=1e-10)


def test_signs_same_target_helps_negated_target_hurts():
    model, batches = linear_model(), linear_batches()
    z = lookahead_affinity(model, batches, dict.fromkeys("abc", mse), lr=0.05)
    a, b, c = 0, 1, 2
    assert z[a, b] > 0 and z[b, a] > 0  # same target: a step for either helps the other ...
    assert z[a, b] == pytest.approx(float(z[a, a]), abs=1e-12)  # ... exactly as much as itself
    assert z[a, c] < 0 and z[c, a] < 0  # negated target through identical heads: interference
    assert average_task_interference(z[:2, :2]) < 0 < average_task_interference(z[::2, ::2])


def tssbn_model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    tasks = ["a", "b", "c"]
    heads = mtnorm.TaskHeads({t: nn.Linear(6, 1) for t in tasks})
    net = nn.Sequential(ToyEncoder(4, 6), nn.Dropout(dropout), heads)
    model = mtnorm.convert(net, tasks, norm="sigma").double()
    with torch.no_grad():  # distinct gates per task, so the tasks' encoders differ
        for m in model.modules():
            if isinstance(getattr(m, "gamma", None), nn.Parameter):
                m.gamma.copy_(torch.randn_like(m.gamma))
    return model


def tssbn_batches(n_batches: int = 2, n: int = 12):
    gen = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n_batches):
        x = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        out.append((x, {t: torch.randn(n, generator=gen, dtype=torch.float64) for t in "abc"}))
    return out


def reference_affinity(model, batches, lr):
    """TAG by brute force: a deep copy per lookahead, stepped in place (training mode)."""
    z = torch.zeros(3, 3, dtype=torch.float64)
    for x, y in batches:
        base = copy.deepcopy(model).train()
        out = mtnorm.forward_tasks(base, x, mode="sequential")
        before = [mse(out[t], y[t]) for t in "abc"]
        shared = mtnorm.shared_parameters(base)
        for i, loss in enumerate(before):
            grads = torch.autograd.grad(loss, shared, retain_graph=True)
            stepped = copy.deepcopy(base)
            with torch.no_grad():
                for p, g in zip(mtnorm.shared_parameters(stepped), grads):
                    p -= lr * g
                after = mtnorm.forward_tasks(stepped, x, mode="sequential")
            for j, t in enumerate("abc"):
                z[i, j] += 1 - float(mse(after[t], y[t])) / float(before[j].detach())
    return z / len(batches)


def test_matches_deep_copy_reference_on_a_converted_tssbn_model():
    model, batches = tssbn_model(), tssbn_batches()
    z = lookahead_affinity(model, batches, dict.fromkeys("abc", mse), lr=0.1)
    torch.testing.assert_close(z, reference_affinity(model, batches, 0.1), rtol=0, atol=1e-10)
    sub = lookahead_affinity(model, batches, dict.fromkeys("abc", mse), lr=0.1, tasks=["c", "a"])
    torch.testing.assert_close(sub, z[[2, 0]][:, [2, 0]], rtol=0, atol=1e-12)  # a subset, its order


@pytest.mark.parametrize("train", [True, False])
def test_model_is_left_unchanged(train):
    model, batches = tssbn_model(dropout=0.3), tssbn_batches()
    model.train()
    model[0][1].eval()  # a mixed training flag must come back as it was
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    running = model[0][1].running_mean.clone()
    x = batches[0][0]
    with torch.no_grad():
        expected = mtnorm.forward_tasks(copy.deepcopy(model).eval(), x, mode="sequential")
    rng = torch.get_rng_state()
    fns = dict.fromkeys("abc", mse)
    z = lookahead_affinity(model, batches, fns, lr=0.1, train=train)
    assert torch.isfinite(z).all()
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)
    assert torch.equal(model[0][1].running_mean, running)
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is restored
    model.eval()
    with torch.no_grad():  # routing still works and gives what it gave before
        again = mtnorm.forward_tasks(model, x, mode="sequential")
    assert all(torch.equal(expected[t], again[t]) for t in "abc")
    model.train(flags[0])
    # dropout masks are the same in every pass of a batch, so the result is reproducible
    assert torch.equal(z, lookahead_affinity(model, batches, fns, lr=0.1, train=train))


def test_dropout_masks_are_shared_by_the_passes_of_a_batch():
    # a vanishing step changes no loss, so Z ≈ 0 only if before and after saw the same masks
    model, batches = tssbn_model(dropout=0.5), tssbn_batches()
    z = lookahead_affinity(model.train(), batches, dict.fromkeys("abc", mse), lr=1e-9)
    assert z.abs().max() < 1e-6


def test_hard_sharing_model_with_task_heads():
    torch.manual_seed(0)
    model = MultiTaskNet(ToyEncoder(4, 6), {t: nn.Linear(6, 1) for t in "abc"}).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    z = lookahead_affinity(model, tssbn_batches(), dict.fromkeys("abc", mse), lr=0.1)
    assert z.shape == (3, 3) and torch.isfinite(z).all() and (z.diagonal() > 0).all()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_degenerate_losses_and_errors():
    model, batches = linear_model(), linear_batches(1)

    def zero(out, target):
        return (out * 0).sum()

    fns = {"a": mse, "b": zero, "c": mse}
    z = lookahead_affinity(model, batches, fns, lr=0.05)
    assert torch.isfinite(z).all()
    assert z[:, 1].tolist() == [0.0] * 3  # L_b = 0 on every batch: nothing to lower, 0
    assert z[1].tolist() == [0.0] * 3  # b's gradient is 0: its step changes nothing
    with pytest.raises(ValueError, match="non-negative"):
        lookahead_affinity(model, batches, {**fns, "b": lambda o, t: -mse(o, t)}, lr=0.05)
    with pytest.raises(KeyError, match="no loss function"):
        lookahead_affinity(model, batches, {"a": mse}, lr=0.05)
    with pytest.raises(ValueError, match="lr must be positive"):
        lookahead_affinity(model, batches, fns, lr=0.0)
    with pytest.raises(ValueError, match="batches is empty"):
        lookahead_affinity(model, [], fns, lr=0.05)
    with pytest.raises(ValueError, match="not parameters of the model"):
        lookahead_affinity(model, batches, fns, lr=0.05, params=[nn.Parameter(torch.zeros(1))])


def test_average_task_interference_on_a_hand_made_matrix():
    z = torch.tensor([[1.0, -0.2, -0.4], [0.1, 1.0, 0.3], [-0.6, 0.0, 1.0]])
    # ordered pairs i≠j: −(−0.2 − 0.4 + 0.1 + 0.3 − 0.6 + 0) / 6
    assert average_task_interference(z) == pytest.approx(0.8 / 6)
    assert average_task_interference(z, harm_only=True) == pytest.approx(1.2 / 6)
    z2 = z.clone()
    z2.fill_diagonal_(-5.0)
    assert average_task_interference(z2) == pytest.approx(0.8 / 6)  # the diagonal does not count
    assert average_task_interference(-z) == pytest.approx(-0.8 / 6)  # helping tasks: negative
    assert average_task_interference(torch.ones(1, 1)) == 0.0
    per = task_interference(z, ["a", "b", "c"])
    assert per["a"] == pytest.approx({"caused": 0.3, "suffered": 0.25})
    assert per["c"] == pytest.approx({"caused": 0.3, "suffered": 0.05})
    assert np.mean([v["caused"] for v in per.values()]) == pytest.approx(average_task_interference(z))
    assert np.mean([v["suffered"] for v in per.values()]) == pytest.approx(average_task_interference(z))
    assert task_interference(z, harm_only=True)["1"] == pytest.approx({"caused": 0.0, "suffered": 0.1})
    with pytest.raises(ValueError, match="square"):
        average_task_interference(torch.zeros(2, 3))


def test_affinity_agreement_ranks_pairs():
    torch.manual_seed(0)
    sim = task_similarity(torch.rand(5, 20))
    assert affinity_agreement(3 * torch.exp(sim) - 1, sim) == pytest.approx(1.0)  # monotone
    assert affinity_agreement(-sim, sim) == pytest.approx(-1.0)  # reversed
    anti = torch.randn(5, 5)
    assert affinity_agreement(sim + anti - anti.T, sim) == pytest.approx(1.0)  # (Z + Zᵀ)/2 is compared
    const = torch.full((4, 4), 0.3)
    assert affinity_agreement(const, const) == 1.0  # no ranking on either side: defined, not NaN
    assert affinity_agreement(const, sim[:4, :4]) == 0.0
    with pytest.raises(ValueError, match="at least 3 tasks"):
        affinity_agreement(torch.eye(2), torch.eye(2))
    with pytest.raises(ValueError, match="differ in shape"):
        affinity_agreement(torch.eye(3), torch.eye(4))
