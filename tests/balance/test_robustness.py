"""Non-finite values, missing tasks, the registry's errors, and checkpoint resume."""

from __future__ import annotations

import io

import pytest
import torch
from balance_helpers import TASKS3, HardSharing, make, matrix, task_losses
from balance_helpers import losses as make_losses

from mtnorm import balance


def model_and_losses(seed: int = 0):
    torch.manual_seed(seed)
    model = HardSharing().double()
    x = torch.randn(8, 5, dtype=torch.float64)
    return model, task_losses(model(x), torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("name", ["ew", "db_mtl", "mgda"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_names_task_and_step_and_writes_nothing(name, bad):
    model, losses = model_and_losses()
    losses["b"] = losses["b"] * bad
    with pytest.raises(balance.NonFiniteError, match=r"task 'b' at step 0"):
        make(name).backward(losses, model.encoder.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["ew", "uw", "dwa", "db_mtl", "upgrad"])
def test_non_finite_gradient_with_finite_loss(name):
    model, losses = model_and_losses()
    # sqrt at 0: the loss is finite (0) but its gradient is infinite.
    losses["c"] = losses["c"] + torch.sqrt(model.encoder[0].bias.abs().sum() * 0)
    b = make(name)
    with pytest.raises(balance.NonFiniteError, match=r"task 'c' at step 0"):
        b.backward(losses, model.encoder.parameters())
    assert all(p.grad is None for p in [*model.parameters(), *b.parameters()])
    assert b.step == 0
    assert isinstance(balance.NonFiniteError("x"), (FloatingPointError, ValueError))


def test_non_finite_in_aggregate():
    g = matrix("full")
    g[2, 3] = float("nan")
    with pytest.raises(balance.NonFiniteError, match="#2"):
        balance.get("pcgrad").aggregate(g, make_losses())
    with pytest.raises(balance.NonFiniteError, match="loss"):
        balance.get("ew").aggregate(matrix("full"), torch.tensor([1.0, float("inf"), 1.0]))


def test_missing_and_unknown_tasks_list_the_expected_ones():
    model, losses = model_and_losses()
    b = balance.get("db_mtl", tasks=TASKS3)
    del losses["b"]
    with pytest.raises(KeyError, match=r"\['a', 'b', 'c'\].*missing \['b'\]"):
        b.backward(losses, model.encoder.parameters())
    _, losses = model_and_losses()
    b = balance.get("ew")
    b.backward(losses, model.encoder.parameters())  # binds the tasks
    losses = dict(losses, d=losses["a"])
    with pytest.raises(KeyError, match=r"unexpected \['d'\]"):
        b.backward(losses, model.encoder.parameters())


def test_loss_must_be_scalar_and_shapes_must_match():
    model, losses = model_and_losses()
    losses["a"] = losses["a"].expand(2)
    with pytest.raises(ValueError, match="scalar"):
        balance.get("ew").backward(losses, model.encoder.parameters())
    with pytest.raises(ValueError, match="T x P"):
        balance.get("ew").aggregate(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        balance.get("ew").aggregate(torch.zeros(3, 4), torch.zeros(2))


def test_registry_errors():
    builtin = {"ew", "uw", "dwa", "rlw", "gls", "imtl_l", "log", "famo", "db_mtl", "mgda", "pcgrad",
               "gradvac", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "gradnorm", "upgrad",
               "fairgrad"}  # fmt: skip
    assert builtin <= set(balance.available())
    with pytest.raises(KeyError, match="available: aligned_mtl, cagrad"):
        balance.get("nope")
    with pytest.raises(TypeError, match="'betta'"):
        balance.get("db_mtl", betta=0.5)
    with pytest.raises(ValueError, match="positive losses"):
        balance.get("gls", log_losses=True)
    with pytest.raises(TypeError, match="gradient method"):
        balance.get("pcgrad", max_norm=True)
    with pytest.raises(ValueError, match="tasks"):
        balance.get("uw")
    assert isinstance(balance.get("DB-MTL"), balance.DBMTL)
    assert isinstance(balance.get("pcgrad", log_losses=True), balance.LogLosses)
    assert isinstance(balance.get("uw", tasks=TASKS3, max_norm={"beta": 0.5}), balance.MaxNorm)


def test_grad_mode_errors():
    model, losses = model_and_losses()
    with pytest.raises(ValueError, match="unknown grad_mode"):
        balance.get("mgda").backward(losses, model.encoder.parameters(), grad_mode="fast")
    with pytest.raises(ValueError, match="needs rep"):
        balance.get("mgda").backward(losses, model.encoder.parameters(), grad_mode="rep")


@pytest.mark.parametrize("name", ["db_mtl", "pcgrad", "gradvac", "dwa", "famo", "rlw", "gradnorm"])
def test_state_dict_resume(name):
    a = make(name)
    for seed in range(2):
        a.aggregate(matrix("full", seed=seed), make_losses(seed=seed))
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = make(name)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    assert b.step == a.step == 2
    g, l = matrix("full", seed=5), make_losses(seed=5)
    torch.testing.assert_close(b.aggregate(g, l), a.aggregate(g, l))


def test_learned_weights_are_parameters_for_the_optimizer():
    uw = make("uw")
    model, losses = model_and_losses()
    opt = torch.optim.SGD([*model.parameters(), *uw.parameters()], lr=0.1)
    uw.backward(losses, model.encoder.parameters())
    before = uw.log_scale.detach().clone()
    opt.step()
    assert not torch.equal(before, uw.log_scale.detach())
    assert "log_scale" in uw.state_dict()


def test_register_a_custom_method():
    class Half(balance.LossWeighting):
        """w_t = 1/2."""

        def loss_weights(self, losses):
            return torch.full_like(losses, 0.5)

    balance.register("half_test", Half)
    g = matrix("full")
    torch.testing.assert_close(balance.get("half-test").aggregate(g, make_losses()), g.sum(0) / 2)
    with pytest.raises(ValueError, match="already registered"):
        balance.register("half_test", balance.EW)
    with pytest.raises(TypeError, match="not a Balancer"):
        balance.register("nope", object)
