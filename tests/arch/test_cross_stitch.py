"""The property grid of the soft-sharing and branching architectures (cross_stitch, mtan, ltb), and
the properties of Cross-Stitch alone.

Each property is a function ``assert_<property>(arch, backbone)``; pytest runs it for every
architecture on the toy MLP, LeNet and SegNet (an encoder-decoder with a carry). The files
``test_mtan.py`` and ``test_ltb.py`` hold the properties of one architecture each and reuse the
builders below.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtnorm
from mtnorm.arch.cross_stitch import CrossStitch, build_cross_stitch, stitch_init
from mtnorm.arch.ltb import LearningToBranch
from mtnorm.arch.mtan import MTAN
from mtnorm.arch.stages import stages_of
from mtnorm.models import DenseHead, LeNetEncoder, PooledHead, SegNet, ToyEncoder, build_method
from mtnorm.norm import TaskSigmoidBatchNorm
from mtnorm.norm.routing import has_task_norms

ARCHS = ("cross_stitch", "mtan", "ltb")
TASKS = ("a", "b")
BATCH = 4

# name: (backbone factory, heads factory, input shape)
BACKBONES = {
    "toy": (lambda norm: ToyEncoder(8, 8, norm), lambda: {t: nn.Linear(8, 3) for t in TASKS}, (8,)),
    "lenet": (
        lambda norm: LeNetEncoder(1, 2, 8, 36, norm),
        lambda: {t: nn.Linear(8, 4) for t in TASKS},
        (1, 36, 36),
    ),
    "segnet": (
        lambda norm: SegNet(1, 4, 2, norm),
        lambda: {"a": DenseHead(4, 2), "b": PooledHead(4)},
        (1, 16, 16),
    ),
}
GRID = [(a, b) for a in ARCHS for b in BACKBONES]


pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(backbone: str, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    shape = BACKBONES[backbone][2]
    return torch.rand(BATCH, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def build(
    arch: str, backbone: str, seed: int = 0, dtype: torch.dtype = torch.float64, **options
) -> nn.Module:
    make, heads, _ = BACKBONES[backbone]
    torch.manual_seed(seed)
    x = inputs(backbone, dtype=torch.float32)
    return build_method(arch, make, TASKS, heads(), example_input=x[:2], **options).to(dtype)


def targets(out: dict[str, torch.Tensor], seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {t: torch.randn(o.shape, generator=gen, dtype=o.dtype) for t, o in out.items()}


def loss_of(model: nn.Module, x: torch.Tensor, y: dict[str, torch.Tensor], seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)  # LTB samples its tree in training: the same sample for every call
    out = mtnorm.forward_tasks(model, x)
    return sum(F.mse_loss(out[t], y[t]) for t in TASKS)


def task_specific(arch: str, model: nn.Module) -> set[int]:
    """The documented task-specific parameters: heads, and MTAN's attention branches."""
    params = list(model.heads.parameters())
    if arch == "mtan":
        params += list(model.attention.parameters())
    return {id(p) for p in params}


# ---------------------------------------------------------------- properties
def assert_output_shapes(arch: str, backbone: str) -> None:
    model = build(arch, backbone)
    x = inputs(backbone)
    out = model(x)
    assert isinstance(out, mtnorm.PerTask) and list(out) == list(TASKS)
    expected = {
        "toy": {"a": (BATCH, 3), "b": (BATCH, 3)},
        "lenet": {"a": (BATCH, 4), "b": (BATCH, 4)},
        "segnet": {"a": (BATCH, 2, 16, 16), "b": (BATCH,)},
    }[backbone]
    assert {t: tuple(o.shape) for t, o in out.items()} == expected
    assert set(mtnorm.forward_tasks(model, x)) == set(TASKS)


def assert_training_lowers_the_loss(arch: str, backbone: str) -> None:
    model = build(arch, backbone).train()
    x = inputs(backbone)
    y = targets(model(x))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = loss_of(model, x, y).item()
    for _ in range(5):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    after = loss_of(model, x, y).item()
    assert after < before, (before, after)


def assert_every_parameter_learns(arch: str, backbone: str) -> None:
    """In training every parameter gets a non-zero gradient (LTB in training: every node and logit,
    since every parent enters the Gumbel-softmax mix; in eval see test_ltb)."""
    model = build(arch, backbone).train()
    x = inputs(backbone)
    loss_of(model, x, targets(model(x))).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert silent == []


def assert_state_dict_round_trip(arch: str, backbone: str) -> None:
    model = build(arch, backbone).train()
    x = inputs(backbone)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_of(model, x, targets(model(x))).backward()
    opt.step()  # away from the initialization (LTB: logits no longer tied)
    fresh = build(arch, backbone, seed=7)
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    a, b = model(x), fresh(x)
    assert all(torch.equal(a[t], b[t]) for t in TASKS)


def assert_a_deep_copy_runs_its_own_parameters(arch: str, backbone: str) -> None:
    """Stages are rebuilt from the model's own modules every forward: a copy (EMA, best model) does
    not read the original's parameters."""
    model = build(arch, backbone).eval()
    x = inputs(backbone)
    before = model(x)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    changed, after = twin(x), model(x)
    assert all(torch.equal(before[t], after[t]) for t in TASKS)
    assert all(not torch.equal(before[t], changed[t]) for t in TASKS)


def assert_use_task_matches_the_joint_pass(arch: str, backbone: str) -> None:
    model = build(arch, backbone).eval()
    x = inputs(backbone)
    joint = model(x)
    for t in TASKS:
        with mtnorm.use_task(model, t):
            alone = model(x)
        assert list(alone) == [t]
        torch.testing.assert_close(alone[t], joint[t], rtol=1e-12, atol=1e-12)


def assert_sigma_conversion_trains(arch: str, backbone: str) -> None:
    model = build(arch, backbone, norm="sigma").train()
    assert any(isinstance(m, TaskSigmoidBatchNorm) for m in model.modules())
    assert has_task_norms(model)
    x = inputs(backbone)
    out = mtnorm.forward_tasks(model, x)
    assert set(out) == set(TASKS)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = loss_of(model, x, targets(out))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    gates = [m.gamma for m in model.modules() if isinstance(m, TaskSigmoidBatchNorm)]
    assert all(g.grad is not None and torch.any(g.grad != 0) for g in gates)
    with torch.no_grad():  # each task's pass has its own gates: task passes differ once they do
        model.eval()
        for g in gates:
            g[1].add_(1.0)
        after = mtnorm.forward_tasks(model, x)
        for t in TASKS:
            with mtnorm.use_task(model, t):
                torch.testing.assert_close(model(x)[t], after[t])


def assert_parameters_partition_as_documented(arch: str, backbone: str) -> None:
    for norm in (None, "sigma"):
        model = build(arch, backbone, norm=norm)
        specific = {id(p) for p in mtnorm.task_parameters(model)}
        shared = {id(p) for p in mtnorm.shared_parameters(model)}
        norms = {
            id(p) for m in model.modules() if isinstance(m, TaskSigmoidBatchNorm) for p in m.parameters()
        }
        assert specific == task_specific(arch, model) | norms
        assert shared == {id(p) for p in model.parameters()} - specific
        assert shared and not shared & specific


PROPERTIES = {
    "output_shapes": assert_output_shapes,
    "training_lowers_the_loss": assert_training_lowers_the_loss,
    "every_parameter_learns": assert_every_parameter_learns,
    "state_dict_round_trip": assert_state_dict_round_trip,
    "a_deep_copy_runs_its_own_parameters": assert_a_deep_copy_runs_its_own_parameters,
    "use_task_matches_the_joint_pass": assert_use_task_matches_the_joint_pass,
    "sigma_conversion_trains": assert_sigma_conversion_trains,
    "parameters_partition_as_documented": assert_parameters_partition_as_documented,
}


@pytest.mark.parametrize("prop", PROPERTIES)
@pytest.mark.parametrize("arch,backbone", GRID)
def test_architecture_property(arch: str, backbone: str, prop: str) -> None:
    PROPERTIES[prop](arch, backbone)


# ---------------------------------------------------------------- every architecture: errors, registry
def test_registered_with_a_description():
    methods = mtnorm.models.available_methods()
    assert {"cross_stitch", "mtan", "ltb"} <= set(methods)
    assert "Misra" in methods["cross_stitch"] and "Liu" in methods["mtan"] and "Guo" in methods["ltb"]


@pytest.mark.parametrize("arch", ARCHS)
def test_an_unknown_option_names_the_valid_ones(arch):
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['tua'\].*norm=None"):
        build(arch, "toy", tua=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_unknown_norm_is_refused(arch):
    with pytest.raises(ValueError, match="unknown norm 'sgima'.*'sigma'"):
        build(arch, "toy", norm="sgima")


@pytest.mark.parametrize("arch", ARCHS)
def test_tasks_must_match_the_heads(arch):
    make, heads, _ = BACKBONES["toy"]
    x = inputs("toy", dtype=torch.float32)
    with pytest.raises(ValueError, match="no head for tasks"):
        build_method(arch, make, ("a", "b", "c"), heads(), example_input=x)
    builder = {"cross_stitch": build_cross_stitch}.get(arch)
    if builder is None:
        from mtnorm.arch.ltb import build_ltb
        from mtnorm.arch.mtan import build_mtan

        builder = {"mtan": build_mtan, "ltb": build_ltb}[arch]
    with pytest.raises(ValueError, match="heads without a task: \\['b'\\]"):
        builder(make, ("a",), heads(), example_input=x)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_backbone_without_stages_surfaces_the_stages_error(arch):
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)

    heads = {t: nn.Linear(8, 3) for t in TASKS}
    with pytest.raises(TypeError, match="cannot cut a Opaque into stages"):
        build_method(arch, lambda norm: Opaque(), TASKS, heads, example_input=torch.rand(2, 8))


@pytest.mark.parametrize("arch", ARCHS)
def test_example_input_is_required(arch):
    make, heads, _ = BACKBONES["toy"]
    with pytest.raises(ValueError, match="example_input"):
        build_method(arch, make, TASKS, heads())


@pytest.mark.parametrize("arch", ARCHS)
def test_architectures_are_never_batched(arch):
    model = build(arch, "toy", norm="bn").eval()
    assert mtnorm.choose_mode(model, inputs("toy"), 3) == "sequential"
    with pytest.raises(ValueError, match="do not run"):
        mtnorm.forward_tasks(model, inputs("toy"), mode="batched")


def test_classes_are_exported_by_their_modules():
    assert issubclass(CrossStitch, mtnorm.arch.Architecture)
    assert issubclass(MTAN, mtnorm.arch.Architecture)
    assert issubclass(LearningToBranch, mtnorm.arch.Architecture)


# ---------------------------------------------------------------- cross-stitch
def test_stitch_init_is_convex_with_a_high_self_weight():
    alpha = stitch_init(3, 5)
    assert alpha.shape == (3, 3, 5)
    assert torch.allclose(alpha.diagonal(dim1=0, dim2=1), torch.full((5, 3), 0.9))
    assert torch.allclose(alpha[0, 1], torch.full((5,), 0.05))
    assert torch.allclose(alpha.sum(1), torch.ones(3, 5))
    assert torch.equal(stitch_init(1, 4), torch.ones(1, 1, 4))
    with pytest.raises(ValueError, match="self_weight"):
        stitch_init(2, 4, 1.5)
    model = build("cross_stitch", "toy", self_weight=0.7)
    assert torch.allclose(model.stitches[0][0, 0], torch.full((8,), 0.7, dtype=torch.float64))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_identity_stitches_are_independent_columns(backbone):
    """α = I: task t's output is head_t(column_t(x)), each column with its own carry (SegNet's
    pooling indices differ per column)."""
    model = build("cross_stitch", backbone).eval()
    with torch.no_grad():
        for alpha in model.stitches:
            alpha.copy_(torch.eye(len(TASKS), dtype=alpha.dtype)[:, :, None].expand_as(alpha))
    x = inputs(backbone)
    out = model(x)
    for i, t in enumerate(TASKS):
        torch.testing.assert_close(out[t], model.heads.heads[t](model.columns[i](x)), rtol=1e-12, atol=1e-12)


def test_stitch_mixes_channel_by_channel():
    model = build("cross_stitch", "toy").eval()
    x = inputs("toy")
    stages = [stages_of(c) for c in model.columns]
    outs = [s[0](x, {}) for s in stages]
    mixed = model.stitch(0, outs)
    alpha = model.stitches[0]
    torch.testing.assert_close(mixed[1], alpha[1, 0] * outs[0] + alpha[1, 1] * outs[1])
    torch.testing.assert_close(model.stitch(0, outs, rows=[1])[0], mixed[1])


def test_columns_and_stitches_are_shared_and_count_t_backbones():
    model = build("cross_stitch", "lenet")
    shared = {id(p) for p in mtnorm.shared_parameters(model)}
    assert all(id(p) in shared for p in model.columns.parameters())
    assert all(id(p) in shared for p in model.stitches)
    backbone = sum(p.numel() for p in LeNetEncoder(1, 2, 8, 36).parameters())
    stitches = sum(p.numel() for p in model.stitches)
    heads = sum(p.numel() for p in model.heads.parameters())
    assert stitches == len(TASKS) ** 2 * (2 + 4 + 8 + 8)  # T x T per channel of every stage
    assert mtnorm.models.count_parameters(model) == len(TASKS) * backbone + stitches + heads


def test_stitch_lr_mult_puts_the_units_in_their_own_learning_rate_group():
    plain = mtnorm.param_groups(build("cross_stitch", "lenet"), lr=0.01, weight_decay=1e-4)
    assert [g["name"] for g in plain] == ["other_norm", "rest"]
    model = build("cross_stitch", "lenet", stitch_lr_mult=1000)
    groups = {g["name"]: g for g in mtnorm.param_groups(model, lr=0.01, weight_decay=1e-4)}
    assert set(groups) == {"other_norm", "rest", "lr_x1000"}
    units = groups["lr_x1000"]
    assert {id(p) for p in units["params"]} == {id(p) for p in model.stitches}
    assert units["lr"] == pytest.approx(10.0) and units["weight_decay"] == 0.0
    assert all(id(p) not in {id(q) for q in model.stitches} for p in groups["rest"]["params"])
    # the state dict is the default model's: checkpoints of either load into the other
    assert list(model.state_dict()) == list(build("cross_stitch", "lenet").state_dict())
    with pytest.raises(ValueError, match="stitch_lr_mult must be a positive number, got 0"):
        build("cross_stitch", "lenet", stitch_lr_mult=0)


def test_sigma_conversion_routes_every_column():
    model = build("cross_stitch", "segnet", norm="sigma")
    for column in model.columns:
        norms = [m for m in column.modules() if isinstance(m, (nn.BatchNorm2d, TaskSigmoidBatchNorm))]
        assert norms and all(isinstance(m, TaskSigmoidBatchNorm) for m in norms)


# ---------------------------------------------------------------- the trainer
def _toy_config(out, method: str, **extra):
    from mtnorm.train import config_from_dict

    values = {
        "method": method,
        "epochs": 2,
        "out": str(out),
        "log_every": 1,
        "data": {"name": "toy", "n_train": 64, "n_test": 32, "batch_size": 16},
        "model": {"hidden": 8},
        "optim": {"lr": 0.01},
        **extra,
    }
    return config_from_dict(values)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_with_pcgrad_resumes_exactly(tmp_path, arch):
    from mtnorm.train import Trainer

    def stop_at_step_3(trainer):
        if trainer.global_step == 3:
            raise KeyboardInterrupt

    extra = {"balancer": "pcgrad", "method_kwargs": {"norm": "sigma"} if arch == "mtan" else {}}
    cut = Trainer(_toy_config(tmp_path / "cut", arch, **extra), callbacks=[stop_at_step_3], log=None)
    assert cut.fit().status == "interrupted"
    resumed = Trainer(_toy_config(tmp_path / "cut", arch, **extra), log=None)
    result = resumed.fit(resume=True)
    full = Trainer(_toy_config(tmp_path / "full", arch, **extra), log=None)
    expected = full.fit()
    assert result.status == expected.status == "finished"
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if arch == "mtan":
        lr = {g["name"]: g["lr"] for g in full.optimizer.param_groups}
        assert lr["norm"] == pytest.approx(100 * lr["rest"])  # TSσBN gates at α = 100
