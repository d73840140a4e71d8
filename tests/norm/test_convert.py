"""mtnorm.convert: every norm layer replaced, values carried over, the rest reported."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from norm_models import MODELS, ConvNet, atol, make
from torch import nn

import mtnorm
from mtnorm import (
    AdaINBatchNorm,
    DynamicWeightedBatchNorm,
    TaskBatchNorm,
    TaskLayerNorm,
    TaskSigmoidBatchNorm,
    TaskSigmoidLayerNorm,
)

TASKS = ("seg", "depth", "normal")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bn_conversion_reproduces_the_trained_model_for_every_task(name, dtype) -> None:
    """The guarantee: norm='bn' gives every task exactly the original outputs in eval mode."""
    model, x = make(name, dtype)
    model.train()
    for _ in range(2):  # real running statistics and a non-zero counter
        model(torch.randn_like(x))
    model.eval()
    expected = model(x)
    converted = mtnorm.convert(copy.deepcopy(model), TASKS, norm="bn").eval()
    for task in TASKS:
        with mtnorm.use_task(converted, task):
            torch.testing.assert_close(converted(x), expected, atol=atol(dtype), rtol=0)


def test_every_norm_kind_becomes_its_task_version() -> None:
    kinds = {
        "bn": (TaskBatchNorm, TaskLayerNorm),
        "sigma": (TaskSigmoidBatchNorm, TaskSigmoidLayerNorm),
        "dw": (DynamicWeightedBatchNorm, TaskLayerNorm),
        "adain": (AdaINBatchNorm, TaskLayerNorm),
    }
    model = nn.Sequential(ConvNet(), nn.Unflatten(1, (1, 5)), nn.LayerNorm(5))
    for norm, (bn_cls, ln_cls) in kinds.items():
        converted = mtnorm.convert(copy.deepcopy(model), TASKS, norm=norm)
        types = [type(m) for m in converted.modules()]
        assert types.count(bn_cls) == 3 and types.count(ln_cls) == 1, norm
        assert not any(t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm) for t in types)
        assert converted[0].features[1].spatial_dims == 2 and converted[0].bn.spatial_dims == 1


def test_root_norm_layer_and_batchnorm3d_and_syncbatchnorm() -> None:
    layer = mtnorm.convert(nn.BatchNorm3d(4), TASKS, norm="sigma")
    assert isinstance(layer, TaskSigmoidBatchNorm) and layer.spatial_dims == 3
    sync = mtnorm.convert(nn.Sequential(nn.SyncBatchNorm(4)), TASKS, norm="bn")
    assert isinstance(sync[0], TaskBatchNorm) and sync[0].spatial_dims is None


def test_pretrained_values_are_copied_into_every_task() -> None:
    model, _ = make("conv")
    old = model.features[1]
    for norm in ("bn", "dw", "adain"):
        new = mtnorm.convert(copy.deepcopy(model), TASKS, norm=norm).features[1]
        for t in range(3):
            torch.testing.assert_close(new.weight[t], old.weight)
            torch.testing.assert_close(new.bias[t], old.bias)
            torch.testing.assert_close(new.running_mean[t], old.running_mean)
            torch.testing.assert_close(new.running_var[t], old.running_var)
        assert new.num_batches_tracked.tolist() == [7, 7, 7]
        assert new.eps == old.eps and new.momentum == old.momentum


def test_sigma_maps_pretrained_scales_through_the_inverse_sigmoid() -> None:
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.2, 0.5, 0.9, 0.99]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    new = mtnorm.convert(bn, TASKS, norm="sigma", shift=True)
    torch.testing.assert_close(new.importance(), bn.weight.detach().expand(3, -1))
    torch.testing.assert_close(new.beta, bn.bias.detach().expand(3, -1))
    bn.eval()
    new.eval().route = 1
    x = torch.randn(3, 4, 2, 2, dtype=torch.double)
    torch.testing.assert_close(new(x), bn(x))


def test_sigma_from_scratch_starts_every_gate_at_one_half() -> None:
    new = mtnorm.convert(nn.BatchNorm2d(4), TASKS, norm="sigma")
    assert torch.all(new.gamma == 0)
    with pytest.warns(UserWarning, match="clamped"):
        forced = mtnorm.convert(nn.BatchNorm2d(4), TASKS, norm="sigma", init="pretrained")
    assert torch.all(torch.sigmoid(forced.gamma) > 0.99)  # weight 1 clamped to 1 - 1e-3


def test_scales_outside_the_gate_range_are_clamped_with_a_warning() -> None:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.7, -0.3, 0.4]))
    with pytest.warns(UserWarning, match=r"clamped.*<root> \(2/3\)"):
        new = mtnorm.convert(bn, TASKS, norm="sigma")
    gates = new.importance()[0]
    torch.testing.assert_close(gates, torch.tensor([0.999, 0.001, 0.4]), atol=1e-6, rtol=0)


def test_dropping_a_pretrained_bias_is_warned_about() -> None:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.fill_(0.5)
        bn.bias.fill_(0.5)
    with pytest.warns(UserWarning, match="drops these layers' non-zero pretrained bias"):
        mtnorm.convert(nn.Sequential(bn), TASKS, norm="sigma")


class BatchNormAct(nn.BatchNorm2d):
    """A subclass that adds behaviour (as timm's BatchNormAct2d does); convert must not touch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_unconverted_norm_types_are_listed_in_one_warning() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.InstanceNorm2d(4), BatchNormAct(4), nn.BatchNorm2d(4)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = mtnorm.convert(model, TASKS)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    for text in (
        "1 x torch.nn.modules.normalization.GroupNorm (not registered)",
        "1 x torch.nn.modules.instancenorm.InstanceNorm2d (not registered)",
        "1 x test_convert.BatchNormAct (subclass of torch.nn.modules.batchnorm.BatchNorm2d with its own "
        "forward)",
    ):
        assert text in messages[0]
    report = str(converted.mtnorm_report)
    assert "converted 1 x torch.nn.modules.batchnorm.BatchNorm2d -> TaskSigmoidBatchNorm" in report
    assert type(converted[3]) is BatchNormAct and isinstance(converted[4], TaskSigmoidBatchNorm)


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="unknown norm 'group'"):
        mtnorm.convert(ConvNet(), TASKS, norm="group")
    with pytest.raises(ValueError, match="duplicate task names"):
        mtnorm.convert(ConvNet(), ["a", "a"])
    with pytest.raises(TypeError, match="must be strings"):
        mtnorm.convert(ConvNet(), ["a", 1])
    with pytest.raises(ValueError, match="empty"):
        mtnorm.convert(ConvNet(), [])
    converted = mtnorm.convert(ConvNet(), TASKS)
    with pytest.raises(ValueError, match="already has task-specific"):
        mtnorm.convert(converted, TASKS)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        mtnorm.convert(nn.BatchNorm1d(3, track_running_stats=False), TASKS, norm="dw")


def test_frozen_norms_stay_frozen_and_dtype_is_kept() -> None:
    model = ConvNet().double()
    model.features[1].requires_grad_(False)
    converted = mtnorm.convert(model, TASKS, norm="bn")
    assert not converted.features[1].weight.requires_grad
    assert converted.features[1].weight.dtype == torch.float64
    assert converted.features[4].weight.requires_grad


def test_state_dict_round_trips_between_identically_converted_models() -> None:
    a = mtnorm.convert(ConvNet(), TASKS, norm="sigma")
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    b = mtnorm.convert(ConvNet(), TASKS, norm="sigma")
    b.load_state_dict(a.state_dict())
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert "features.1.gamma" in a.state_dict() and "features.1.num_batches_tracked" in a.state_dict()


def test_unconverted_checkpoint_loads_through_convert() -> None:
    """The documented path: load into the plain model, then convert."""
    trained, x = make("conv")
    checkpoint = trained.state_dict()
    fresh = ConvNet().double()
    fresh.load_state_dict(checkpoint)
    converted = mtnorm.convert(fresh, TASKS, norm="bn").eval()
    trained.eval()
    with mtnorm.use_task(converted, "depth"):
        torch.testing.assert_close(converted(x), trained(x))
