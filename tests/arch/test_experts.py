"""One grid of properties over the mixture-of-experts architectures (MMoE, CGC, PLE, DSelect-k) on
the LeNet, SegNet and toy MLP backbones: shapes, learning, gradients, gates, state, routing,
conversion to task norms, the shared / task-specific partition, and a trainer run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtnorm
from mtnorm.arch.base import TaskModules
from mtnorm.arch.dselect_k import DSelectKGate, fold_codes, smooth_step
from mtnorm.arch.experts import SoftmaxGate, level_bounds
from mtnorm.models import DenseHead, LeNetEncoder, SegNet, ToyEncoder, build_method, count_parameters
from mtnorm.norm import TaskHeads, TaskNorm, TaskSigmoidBatchNorm

TASKS = ("a", "b")

ARCHS = {
    "mmoe": {"experts": 2},
    "dselect_k": {"experts": 3, "k": 2},  # 3 experts: not a power of 2, one code folded
    "cgc": {},
    "ple": {},  # 2 levels
}

BACKBONES = {
    "lenet": (lambda norm: LeNetEncoder(1, 2, 8, 36, norm), (4, 1, 36, 36), lambda: nn.Linear(8, 3)),
    "segnet": (lambda norm: SegNet(1, 4, 2, norm), (4, 1, 16, 16), lambda: DenseHead(4, 2)),
    "toy": (lambda norm: ToyEncoder(8, 8, norm), (4, 8), lambda: nn.Linear(8, 3)),
}

GRID = [(a, b) for a in ARCHS for b in BACKBONES]


pytestmark = pytest.mark.usefixtures("one_thread")


def build(arch: str, backbone: str, tasks=TASKS, seed: int = 0, **options) -> tuple[nn.Module, torch.Tensor]:
    factory, shape, head = BACKBONES[backbone]
    torch.manual_seed(seed)
    x = torch.rand(shape)
    options = {**ARCHS[arch], **options}
    model = build_method(arch, factory, tasks, {t: head() for t in tasks}, example_input=x[:2], **options)
    return model, x


def targets(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {t: torch.randn(o.shape, generator=gen) for t, o in out.items()}


def losses(model: nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = mtnorm.forward_tasks(model, x)
    return {t: F.mse_loss(out[t], y[t]) for t in out}


def sgd_lowers_the_loss(model: nn.Module, x: torch.Tensor, steps: int = 5, lr: float = 0.05) -> None:
    with torch.no_grad():
        y = targets(mtnorm.forward_tasks(model, x))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss = sum(losses(model, x, y).values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(sum(losses(model, x, y).values())) < first


# ------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("arch, backbone", GRID)
def test_output_shapes_are_the_heads_on_the_backbone(arch, backbone):
    model, x = build(arch, backbone)
    factory, _, head = BACKBONES[backbone]
    expected = head()(factory("bn")(x)).shape
    out = mtnorm.forward_tasks(model, x)
    assert set(out) == set(TASKS)
    assert all(o.shape == expected for o in out.values())


@pytest.mark.parametrize("arch, backbone", GRID)
def test_sgd_steps_lower_the_loss(arch, backbone):
    sgd_lowers_the_loss(*build(arch, backbone))


@pytest.mark.parametrize("arch, backbone", GRID)
def test_every_parameter_gets_a_gradient(arch, backbone):
    model, x = build(arch, backbone)
    y = targets(mtnorm.forward_tasks(model, x))
    sum(losses(model, x, y).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("arch, backbone", GRID)
def test_gate_weights_are_distributions(arch, backbone):
    model, x = build(arch, backbone)
    seen = []

    def check(module, args, out):
        seen.append(type(module).__name__)
        assert out.shape[0] == x.shape[0]
        assert (out >= 0).all()
        torch.testing.assert_close(out.sum(dim=1), torch.ones(x.shape[0]))

    gates = [m for m in model.modules() if isinstance(m, (SoftmaxGate, DSelectKGate))]
    hooks = [g.register_forward_hook(check) for g in gates]
    mtnorm.forward_tasks(model, x)
    for h in hooks:
        h.remove()
    assert len(seen) == len(gates) > 0  # every gate ran (in the all-task pass)


@pytest.mark.parametrize("arch, backbone", GRID)
def test_state_dict_round_trip_gives_identical_outputs(arch, backbone):
    model, x = build(arch, backbone, seed=0)
    sgd_lowers_the_loss(model, x, steps=1)  # move the weights and running statistics off their init
    fresh, _ = build(arch, backbone, seed=1)
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    a, b = mtnorm.forward_tasks(model, x), mtnorm.forward_tasks(fresh, x)
    assert all(torch.equal(a[t], b[t]) for t in TASKS)


@pytest.mark.parametrize("arch, backbone", GRID)
def test_one_task_pass_equals_the_all_task_pass(arch, backbone):
    model, x = build(arch, backbone)
    model.eval()
    with torch.no_grad():
        joint = model(x)
        assert isinstance(joint, mtnorm.PerTask) and set(joint) == set(TASKS)
        for t in TASKS:
            with mtnorm.use_task(model, t):
                alone = model(x)
            assert set(alone) == {t}  # only the chosen task is computed
            torch.testing.assert_close(alone[t], joint[t], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch, backbone", GRID)
def test_sigma_conversion_routes_and_trains(arch, backbone):
    model, x = build(arch, backbone, norm="sigma")
    norms = [m for m in model.modules() if isinstance(m, TaskNorm)]
    assert norms and all(isinstance(m, TaskSigmoidBatchNorm) for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in _shared_modules(model))
    # experts that serve one task keep plain norms: their other tasks' parameters would never learn
    for routed in model.modules():
        if isinstance(routed, TaskModules):
            assert not any(isinstance(m, TaskNorm) for m in routed.modules())
    assert mtnorm.choose_mode(model, x, len(TASKS)) == "sequential"
    out = mtnorm.forward_tasks(model, x)
    assert set(out) == set(TASKS)
    sgd_lowers_the_loss(model, x)


def _shared_modules(model: nn.Module) -> list[nn.Module]:
    inside = {id(m) for r in model.modules() if isinstance(r, (TaskModules, TaskHeads)) for m in r.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def _owners(model: nn.Module) -> dict[int, str]:
    """Which task each task-specific parameter belongs to (its TaskModules / TaskHeads entry)."""
    owner = {}
    for m in model.modules():
        entries = m.per_task if isinstance(m, TaskModules) else m.heads if isinstance(m, TaskHeads) else {}
        for task, sub in entries.items():
            owner.update({id(p): task for p in sub.parameters()})
    return owner


PARTITION = GRID + [("ple", "lenet", 3), ("ple", "segnet", 3), ("ple", "segnet", 5)]


@pytest.mark.parametrize("case", PARTITION, ids=lambda c: "-".join(map(str, c)))
def test_task_parameters_are_reached_by_their_task_only_and_shared_by_every_task(case):
    arch, backbone, *levels = case
    tasks = ("a", "b", "c")
    model, x = build(arch, backbone, tasks, **({"levels": levels[0]} if levels else {}))
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    reached = {}
    for t in tasks:
        grads = torch.autograd.grad(out[t].square().mean(), params, retain_graph=True, allow_unused=True)
        reached[t] = {id(p) for p, g in zip(params, grads) if g is not None}
    owner = _owners(model)
    specific = {id(p) for p in mtnorm.task_parameters(model)}
    assert specific == set(owner)
    for p in params:
        by = {t for t in tasks if id(p) in reached[t]}
        if id(p) in specific:
            assert by == {owner[id(p)]}
        else:
            assert by == set(tasks)  # shared means every task's loss reaches it
    if arch == "ple":  # the task experts below the last level are shared, the last level's are not
        first, final = model.levels[0], model.levels[-1]
        assert not isinstance(first.task_experts, TaskModules) and isinstance(final.task_experts, TaskModules)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_ple_experts_hold_exactly_one_backbone_per_expert_slot(backbone):
    model, _ = build("ple", backbone, shared_experts=2, task_experts=1)
    factory = BACKBONES[backbone][0]
    heads = count_parameters(model.heads)
    gates = sum(count_parameters(m) for m in model.modules() if isinstance(m, SoftmaxGate))
    slots = 2 + len(TASKS) * 1
    assert count_parameters(model) - heads - gates == slots * count_parameters(factory("bn"))


def test_ple_levels_split_the_stages_into_consecutive_groups():
    assert level_bounds(5, 2) == [0, 3, 5]
    assert level_bounds(7, 3) == [0, 3, 5, 7]
    assert level_bounds(2, 2) == [0, 1, 2]


# ------------------------------------------------------------------------- DSelect-k's gate


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_smooth_step_closed_form(gamma):
    z = torch.linspace(-gamma, gamma, 401, dtype=torch.float64, requires_grad=True)
    s = smooth_step(z, gamma)
    inside = z.abs() < gamma / 2
    cubic = -2 / gamma**3 * z**3 + 3 / (2 * gamma) * z + 0.5
    assert torch.equal(s[z <= -gamma / 2], torch.zeros_like(s[z <= -gamma / 2]))
    assert torch.equal(s[z >= gamma / 2], torch.ones_like(s[z >= gamma / 2]))
    torch.testing.assert_close(s[inside], cubic[inside])
    (grad,) = torch.autograd.grad(s.sum(), z)
    assert (grad[~inside] == 0).all()
    # continuous derivative: S' -> 0 at the ends from inside, 3 / (2 gamma) at 0
    ends = torch.tensor([-gamma / 2 + 1e-6, gamma / 2 - 1e-6], dtype=torch.float64, requires_grad=True)
    (end_grad,) = torch.autograd.grad(smooth_step(ends, gamma).sum(), ends)
    assert end_grad.abs().max() < 1e-4
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (mid,) = torch.autograd.grad(smooth_step(zero, gamma).sum(), zero)
    torch.testing.assert_close(mid, torch.tensor([1.5 / gamma], dtype=torch.float64))


def test_codes_beyond_the_experts_fold_onto_existing_ones():
    fold = fold_codes(5)  # 3 bits, codes 5, 6, 7 -> experts 1, 2, 3
    assert fold.shape == (8, 5) and torch.equal(fold.sum(dim=1), torch.ones(8))
    assert [int(r.argmax()) for r in fold] == [0, 1, 2, 3, 4, 1, 2, 3]
    assert torch.equal(fold_codes(4), torch.eye(4))


@pytest.mark.parametrize("experts, k", [(4, 2), (3, 1), (5, 2), (8, 3)])
def test_binary_selectors_pick_at_most_k_experts(experts, k):
    torch.manual_seed(0)
    gate = DSelectKGate(6, experts, k, gamma=1.0)
    with torch.no_grad():
        gate.z.weight.zero_()
        gate.z.bias.copy_(torch.randn(gate.z.bias.shape).sign())  # every bit saturated at 0 or 1
    with torch.no_grad():
        weights = gate(torch.randn(10, 6))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(10))
    assert ((weights > 0).sum(dim=1) <= k).all()
    assert float(gate.entropy(torch.randn(10, 6)).detach()) == 0.0


def test_entropy_regularization_converges_the_selectors_to_k_experts():
    torch.manual_seed(0)
    gate = DSelectKGate(6, 6, k=2, gamma=1.0)
    phi = torch.randn(32, 6)
    assert ((gate(phi) > 0).sum(dim=1) == 6).all()  # dense at initialization
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        gate.entropy(phi).backward()
        opt.step()
    assert float(gate.entropy(phi).detach()) < 1e-6
    assert ((gate(phi) > 1e-6).sum(dim=1) <= 2).all()


def test_dselect_k_regularization_reaches_only_the_gates():
    model, x = build("dselect_k", "toy", entropy_reg=0.1)
    reg = model.regularization(x)
    assert reg.dim() == 0 and float(reg.detach()) > 0
    reg.backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"gates"}
    unregularized, _ = build("dselect_k", "toy")
    assert float(unregularized.regularization(x).detach()) == 0.0


# ------------------------------------------------------------------------- errors


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['expert'\].*experts=3"):
        build("mmoe", "toy", expert=2)


@pytest.mark.parametrize(
    "arch, option", [("mmoe", "experts"), ("dselect_k", "experts"), ("cgc", "shared_experts"),
                     ("ple", "task_experts")],
)  # fmt: skip
def test_fewer_than_one_expert_is_refused(arch, option):
    with pytest.raises(ValueError, match=f"{option} must be an integer >= 1, got 0"):
        build(arch, "toy", **{option: 0})


def test_more_levels_than_stages_names_the_stage_count():
    with pytest.raises(ValueError, match="levels=3 is more than the 2 stages of the ToyEncoder"):
        build("ple", "toy", levels=3)


def test_bad_norm_and_k_are_refused():
    with pytest.raises(ValueError, match="norm must be one of"):
        build("cgc", "toy", norm="sigmoid")
    with pytest.raises(ValueError, match="k=4 selectors for 3 experts"):
        build("dselect_k", "toy", k=4)


# ------------------------------------------------------------------------- the trainer


def test_trainer_with_a_gradient_balancer_resumes_exactly(tmp_path):
    from mtnorm.train import Trainer, config_from_dict

    def config(out):
        return config_from_dict({
            "method": "ple", "method_kwargs": {"norm": "sigma"}, "balancer": "db_mtl", "epochs": 2,
            "out": str(out), "data": {"name": "toy", "n_train": 64, "n_test": 32, "batch_size": 16},
            "model": {"hidden": 8}, "optim": {"lr": 0.01},
        })  # fmt: skip

    full = Trainer(config(tmp_path / "full"), log=None)
    done = full.fit()
    assert done.status == "finished"

    def stop_at_5(trainer):
        if trainer.global_step == 5:
            raise KeyboardInterrupt

    cut = config(tmp_path / "cut")
    assert Trainer(cut, callbacks=[stop_at_5], log=None).fit().status == "interrupted"
    resumed = Trainer(cut, log=None)
    result = resumed.fit(resume=True)
    assert result.status == "finished" and result.step == done.step
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.metrics == done.metrics


def test_a_deep_copy_runs_its_own_stage_slices():
    model, x = build("ple", "segnet")
    model.eval()
    twin = copy.deepcopy(model)
    before = mtnorm.forward_tasks(twin, x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    after = mtnorm.forward_tasks(twin, x)
    assert all(torch.equal(before[t], after[t]) for t in TASKS)
    assert not torch.equal(mtnorm.forward_tasks(model, x)["a"], after["a"])
