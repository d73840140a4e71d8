"""Each method against a reference computed independently here (closed forms, optimality
conditions, autograd of the method's objective, hand-rolled state updates)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from balance_helpers import losses as make_losses
from balance_helpers import make, matrix
from scipy.optimize import minimize_scalar

from mtnorm import balance


def assert_close(actual, expected, atol=1e-9, rtol=1e-7):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def two_tasks(conflict: bool, seed: int = 0) -> torch.Tensor:
    g = matrix("full", t=2, p=6, seed=seed)
    if (g[0] @ g[1] < 0) != conflict:
        g[1] = -g[1]
    return g


# ---------------------------------------------------------------- loss-based
def test_ew_is_the_sum():
    g = matrix("full")
    assert_close(balance.get("ew").aggregate(g, make_losses()), g.sum(0))


def test_log_and_gls_are_gradients_of_their_objectives():
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    scales = torch.tensor([1.0, 30.0, 0.2], dtype=torch.float64)
    raw = scales * torch.stack([(theta**2).sum(), (theta - 1).pow(2).sum(), theta.exp().sum()])
    g = torch.stack([torch.autograd.grad(r, theta, retain_graph=True)[0] for r in raw])
    l = raw.detach()
    for name, objective in [
        ("log", torch.log(raw + 1e-8).sum()),
        ("gls", raw.prod() ** (1 / 3)),
    ]:
        (expected,) = torch.autograd.grad(objective, theta, retain_graph=True)
        assert_close(balance.get(name).aggregate(g, l), expected)


@pytest.mark.parametrize(
    ("name", "objective"),
    [
        ("uw", lambda s, l: (torch.exp(-s) * l + s).sum()),
        ("imtl_l", lambda s, l: (torch.exp(s) * l - s).sum()),
    ],
)
def test_learned_scales_get_the_gradient_of_their_objective(name, objective):
    b = make(name)
    with torch.no_grad():
        b.log_scale.copy_(torch.tensor([0.3, -0.2, 1.0]))
    g, l = matrix("full"), make_losses()
    s = b.log_scale.detach().double().requires_grad_()
    d = b.aggregate(g, l)
    (expected_s,) = torch.autograd.grad(objective(s, l), s)
    assert_close(b.log_scale.grad.double(), expected_s, atol=1e-6, rtol=1e-6)
    w = torch.exp(-s) if name == "uw" else torch.exp(s)
    assert_close(d, w.detach() @ g, atol=1e-6, rtol=1e-6)
    assert [p for p in b.parameters()] == [b.log_scale]


def test_dwa_over_three_steps():
    b = balance.get("dwa", temperature=2.0)
    g = matrix("full")
    steps = [make_losses(seed=s) for s in range(3)]
    assert_close(b.aggregate(g, steps[0]), g.sum(0))
    assert_close(b.aggregate(g, steps[1]), g.sum(0))
    r = steps[1] / steps[0]
    w = 3 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    assert_close(b.aggregate(g, steps[2]), w @ g)


def test_rlw_draws_softmax_of_normals():
    g = matrix("full")
    z = np.random.default_rng(7).standard_normal(3)
    w = torch.softmax(torch.as_tensor(z), 0)
    assert_close(balance.get("rlw", seed=7).aggregate(g, make_losses()), w @ g)


def test_famo_weights_and_logit_update():
    b = balance.get("famo", lr=0.1)
    g = torch.eye(3, dtype=torch.float64)
    l0 = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    w0 = (1 / l0) / (1 / l0).sum()  # uniform z
    assert_close(b.aggregate(g, l0), w0, atol=1e-7, rtol=1e-7)
    # Task 0 improved most, task 2 not at all: FAMO shifts weight towards task 2.
    b.aggregate(g, torch.tensor([0.5, 1.5, 4.0], dtype=torch.float64))
    assert b.logits[2] > b.logits[1] > b.logits[0]


# ---------------------------------------------------------------- gradient-based
@pytest.mark.parametrize("conflict", [True, False])
def test_mgda_two_task_closed_form(conflict):
    for seed in range(4):
        g = two_tasks(conflict, seed)
        g1, g2 = g
        a = ((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1)
        assert_close(balance.get("mgda").aggregate(g, make_losses(2)), a * g1 + (1 - a) * g2)


def test_mgda_clipped_case():
    g = torch.tensor([[1.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    assert_close(balance.get("mgda").aggregate(g, make_losses(2)), g[0])


@pytest.mark.parametrize("conflict", [True, False])
def test_pcgrad_two_task_projection(conflict):
    g = two_tasks(conflict)
    g1, g2 = g
    dot = min(float(g1 @ g2), 0.0)  # only conflicting pairs are projected
    expected = (g1 - dot / (g2 @ g2) * g2) + (g2 - dot / (g1 @ g1) * g1)
    assert_close(make("pcgrad").aggregate(g, make_losses(2)), expected)


def test_gradvac_first_step_is_pcgrad_and_targets_move():
    g = two_tasks(conflict=True)
    b = make("gradvac", beta=0.25)
    assert_close(b.aggregate(g, make_losses(2)), make("pcgrad").aggregate(g, make_losses(2)))
    cos = float(torch.nn.functional.cosine_similarity(g[0], g[1], dim=0))
    assert b.targets[0, 1] == pytest.approx(0.25 * cos)


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_formula(c):
    g = two_tasks(conflict=True, seed=3)
    g0 = g.mean(0)
    phi = c**2 * g0 @ g0

    def dual(x):
        gw = x * g[0] + (1 - x) * g[1]
        return float(gw @ g0 + phi.sqrt() * gw.norm())

    x = minimize_scalar(dual, bounds=(0, 1), method="bounded", options={"xatol": 1e-12}).x
    gw = x * g[0] + (1 - x) * g[1]
    expected = (g0 + phi.sqrt() / gw.norm() * gw) / (1 + c**2)
    assert_close(balance.get("cagrad", c=c).aggregate(g, make_losses(2)), expected, atol=1e-6)


def test_imtl_g_equal_projections():
    for t in (2, 3, 5):
        g = matrix("full", t=t, p=20, seed=t) * torch.linspace(0.1, 10, t, dtype=torch.float64)[:, None]
        b = balance.get("imtl_g")
        out = b.combine(g, make_losses(t))
        d = b.aggregate(g, make_losses(t))
        proj = g @ d / g.norm(dim=1)
        assert_close(proj, proj.mean().expand(t))
        assert float(out.weights.sum()) == pytest.approx(1.0)
        assert_close(out.weights @ g, d)


@pytest.mark.parametrize(("name", "alpha"), [("nash_mtl", 1.0), ("fairgrad", 2.0), ("fairgrad", 0.5)])
def test_power_balance_optimality(name, alpha):
    kwargs = {"alpha": alpha} if name == "fairgrad" else {}
    for seed in range(3):
        g = matrix("full", t=4, p=10, seed=seed) * torch.tensor([0.01, 1.0, 5.0, 100.0])[:, None]
        a = balance.get(name, **kwargs).combine(g, make_losses(4)).weights
        assert (a > 0).all()
        assert_close(g @ g.T @ a, a ** (-1 / alpha), rtol=1e-6, atol=0)


def test_aligned_mtl_against_svd():
    g = matrix("full", t=3, p=8)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    expected = (s.min() * u @ vh).sum(0)  # rows of the aligned matrix, summed
    assert_close(balance.get("aligned_mtl").aggregate(g, make_losses()), expected)


def test_upgrad_without_conflict_is_the_mean_and_projects_otherwise():
    g = matrix("full").abs()  # all pairwise inner products positive
    assert_close(balance.get("upgrad").aggregate(g, make_losses()), g.mean(0))
    g = two_tasks(conflict=True)
    g1, g2 = g
    # Two tasks: the projection of g1 onto the dual cone removes its conflict with g2.
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g1 @ g2) / (g1 @ g1) * g1
    assert_close(balance.get("upgrad").aggregate(g, make_losses(2)), (p1 + p2) / 2)


def test_gradnorm_logit_gradient_matches_autograd():
    b = make("gradnorm", alpha=1.5)
    g = matrix("full")
    l0, l1 = make_losses(seed=0), make_losses(seed=1)
    b.aggregate(g, l0)
    b.logits.grad = None
    with torch.no_grad():
        b.logits.copy_(torch.tensor([0.2, -0.1, 0.4]))
    d = b.aggregate(g, l1)

    xi = b.logits.detach().double().requires_grad_()
    w = 3 * torch.softmax(xi, 0)
    norms = g.norm(dim=1)
    r = (l1 / l0) / (l1 / l0).mean()
    target = ((w * norms).mean() * r**1.5).detach()
    (expected,) = torch.autograd.grad((w * norms - target).abs().sum(), xi)
    assert_close(b.logits.grad.double(), expected, atol=1e-6, rtol=1e-5)
    assert_close(d, w.detach() @ g, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- DB-MTL
@pytest.mark.parametrize(("beta", "sigma"), [(0.9, 0.0), (0.5, 0.5)])
def test_db_mtl_three_steps_by_hand(beta, sigma):
    b = balance.get("db_mtl", beta=beta, sigma=sigma)
    eps = 1e-8
    h = torch.zeros(3, 12, dtype=torch.float64)
    for k in (1, 2, 3):
        g, l = matrix("full", seed=k), make_losses(seed=k)
        beta_k = beta / k**sigma
        h = beta_k * h + (1 - beta_k) * g / (l[:, None] + eps)
        norms = [float(h[t].norm()) for t in range(3)]
        a = max(norms)
        expected = sum(a / (norms[t] + eps) * h[t] for t in range(3))
        assert_close(b.aggregate(g, l), expected)


def test_db_mtl_identical_gradients_give_t_times_the_ema():
    g = matrix("full", t=1).expand(3, -1)
    b = balance.get("db_mtl")
    l = torch.ones(3, dtype=torch.float64)
    d = b.aggregate(g, l)
    assert_close(d, 3 * 0.1 * g[0] / (1 + 1e-8))


def test_db_mtl_is_the_composition_of_its_halves():
    a, b = balance.get("db_mtl"), balance.get("ew", log_losses=True, max_norm=True)
    for seed in range(3):
        g, l = matrix("full", seed=seed), make_losses(seed=seed)
        assert_close(a.aggregate(g, l), b.aggregate(g, l))


def test_log_losses_wraps_a_gradient_method():
    g, l = matrix("full"), make_losses()
    scaled = g / (l[:, None] + 1e-8)
    expected = balance.get("mgda").aggregate(scaled, torch.log(l + 1e-8))
    assert_close(balance.get("mgda", log_losses=True).aggregate(g, l), expected)


def test_max_norm_after_a_loss_weighting():
    g, l = matrix("full"), make_losses()
    w = 1 / (l + 1e-8)
    h = 0.1 * w[:, None] * g  # first EMA step from zero, beta = 0.9
    n = h.norm(dim=1)
    expected = (n.max() / (n + 1e-8)) @ h
    assert_close(balance.get("log", max_norm=True).aggregate(g, l), expected)


@pytest.mark.parametrize("seed", range(4))
def test_mgda_min_norm_optimality(seed):
    # The min-norm point d of the convex hull satisfies g_t . d >= ||d||^2 for every t, with
    # equality on the tasks it uses; any other hull point is at least as long.
    torch.manual_seed(seed)
    g = matrix("full", t=5, p=4, seed=seed)  # T > P: the hull may contain the origin
    b = balance.get("mgda")
    a = b.combine(g, make_losses(5)).weights
    d = a @ g
    assert (g @ d >= d @ d - 1e-9).all()
    torch.testing.assert_close((g @ d)[a > 1e-9], (d @ d).expand(int((a > 1e-9).sum())))
    for other in torch.distributions.Dirichlet(torch.ones(5, dtype=torch.float64)).sample((50,)):
        assert (other @ g).norm() >= d.norm() - 1e-9
