"""The norm-converter registry (issue 8, items 1-2): resolution, new RMS layers, the report, the
nothing-converted error, tied aliases, extract back to the model's own classes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import mtnorm
from mtnorm.norm.registry import batch_norm_converter, layer_norm_converter, resolve

TASKS = ("a", "b", "c")


def quiet_convert(model, norm="bn", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mtnorm.convert(model, TASKS, norm=norm, **kw)


class TrivialBN(nn.BatchNorm2d):
    """A subclass that changes nothing: converted as its base."""


class ScaledBN(nn.BatchNorm2d):
    """A subclass with its own forward: never converted as its base."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_resolution_exact_then_bases_without_own_forward():
    assert resolve(nn.BatchNorm2d(3))[0] is not None
    assert resolve(TrivialBN(3))[0] is not None
    converter, reason = resolve(ScaledBN(3))
    assert converter is None and "with its own forward" in reason
    assert resolve(nn.GroupNorm(1, 3)) == (None, "not registered")
    assert resolve(nn.Conv2d(1, 1, 1)) == (None, "")


def test_nothing_converted_is_an_error_naming_what_was_seen():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), ScaledBN(4))
    with pytest.raises(ValueError, match="found no normalization layer") as caught:
        mtnorm.convert(model, TASKS)
    for text in ("GroupNorm", "ScaledBN", "with its own forward", "mtnorm.register_norm"):
        assert text in str(caught.value)


def test_register_norm_makes_a_custom_class_task_specific_and_extract_rebuilds_it():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):  # the same function, written out
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
            )

    mtnorm.register_norm(MyBN, batch_norm_converter(2))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyBN(4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    converted = quiet_convert(copy.deepcopy(model))
    assert "converted 1 x " in str(converted.mtnorm_report) and "MyBN" in str(converted.mtnorm_report)
    single = mtnorm.extract(converted, "a")
    assert type(single[1]) is MyBN
    torch.testing.assert_close(single(x), model(x))


def test_an_aliased_norm_stays_one_tied_task_module():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.Linear(4, 4), bn)
    converted = quiet_convert(model)
    assert converted[1] is converted[3]
    assert sum(converted.mtnorm_report.converted.values()) == 1
    assert len(mtnorm.importance(converted)) == 1


@pytest.mark.parametrize(("dims", "cls"), [(1, nn.BatchNorm1d), (3, nn.BatchNorm3d), (2, nn.BatchNorm2d)])
def test_sync_batch_norm_extracts_the_class_of_the_input_it_saw(dims, cls):
    model = nn.Sequential(nn.SyncBatchNorm(3)).eval()
    converted = quiet_convert(model)
    x = torch.randn(2, 3, *([4] * dims)) if dims > 1 else torch.randn(2, 3, 5)
    with mtnorm.use_task(converted, "a"):
        y = converted(x)
    single = mtnorm.extract(converted, "a")
    assert type(single[0]) is cls
    torch.testing.assert_close(single(x), y)


def test_sync_batch_norm_extract_before_any_input_is_a_clear_error():
    converted = quiet_convert(nn.Sequential(nn.SyncBatchNorm(3)))
    with pytest.raises(ValueError, match="has not seen one yet"):
        mtnorm.extract(converted, "a")


@pytest.mark.parametrize("norm", ["bn", "sigma"])
def test_rms_norm_converts_exactly_and_extracts(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8, eps=1e-6)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.2, 0.9)
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    model = model.double()
    converted = quiet_convert(copy.deepcopy(model), norm)
    expected = mtnorm.TaskRMSNorm if norm == "bn" else mtnorm.TaskSigmoidRMSNorm
    assert type(converted[1]) is expected
    with mtnorm.use_task(converted, "c"):
        torch.testing.assert_close(converted(x), model(x), atol=1e-10, rtol=1e-10)
    single = mtnorm.extract(converted, "c")
    assert type(single[1]) is nn.RMSNorm
    torch.testing.assert_close(single(x), model(x), atol=1e-10, rtol=1e-10)


def test_rms_layers_batched_equals_sequential_and_join_the_layernorm_group():
    torch.manual_seed(0)
    model = quiet_convert(nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8)), "sigma").double()
    with torch.no_grad():
        model[1].gamma.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    b = mtnorm.forward_tasks(model, x, mode="batched")
    s = mtnorm.forward_tasks(model, x, mode="sequential")
    for t in TASKS:
        torch.testing.assert_close(b[t], s[t], atol=1e-12, rtol=0)
    groups = {g["name"]: g for g in mtnorm.param_groups(model, lr=1.0)}
    assert groups["layernorm"]["params"] == [model[1].gamma]
    assert mtnorm.importance(model)["1"].shape == (3, 8)


class ChannelsFirstLN(nn.LayerNorm):
    """Like torchvision's / timm's LayerNorm2d: normalizes C of [N, C, H, W]."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_channels_first_layer_norm_wrapper_is_exact_and_extracts_its_class():
    mtnorm.register_norm(ChannelsFirstLN, layer_norm_converter(channels_first=True))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ChannelsFirstLN(4)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 5, 5)
    converted = quiet_convert(copy.deepcopy(model))
    assert isinstance(converted[1], mtnorm.TaskNormWrapper)
    with mtnorm.use_task(converted, "b"):
        torch.testing.assert_close(converted(x), model(x))
    converted.train()
    b = mtnorm.forward_tasks(converted, x, mode="batched")
    s = mtnorm.forward_tasks(converted, x, mode="sequential")
    torch.testing.assert_close(b["c"], s["c"])
    single = mtnorm.extract(converted.eval(), "b")
    assert type(single[1]) is ChannelsFirstLN
    torch.testing.assert_close(single(x), model(x))


def test_frozen_statistics_never_change_and_affine_trains():
    class FrozenBN(nn.Module):  # the shape of torchvision.ops.FrozenBatchNorm2d: buffers only
        def __init__(self, n):
            super().__init__()
            for name, value in (("weight", 1.5), ("bias", 0.2), ("running_mean", 0.3), ("running_var", 2.0)):
                self.register_buffer(name, torch.full((n,), value))
            self.eps = 1e-5

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale[None, :, None, None] + shift[None, :, None, None]

    mtnorm.register_norm(FrozenBN, batch_norm_converter(2, frozen=True))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBN(4))
    x = torch.randn(4, 3, 5, 5)
    converted = quiet_convert(copy.deepcopy(model)).train()
    stats = converted[1].running_mean.clone()
    out = mtnorm.forward_tasks(converted, x, mode="sequential")
    torch.testing.assert_close(out["a"], model(x), atol=1e-6, rtol=1e-6)  # even in training
    mtnorm.forward_tasks(converted, x, mode="batched")
    assert torch.equal(converted[1].running_mean, stats)
    assert converted[1].weight.requires_grad
    single = mtnorm.extract(converted.eval(), "a")
    assert type(single[1]) is FrozenBN
    torch.testing.assert_close(single(x), model(x), atol=1e-6, rtol=1e-6)


def test_layernorm_false_leaves_layer_and_rms_norms_shared():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LayerNorm(4), nn.RMSNorm(4))
    converted = quiet_convert(model, layernorm=False)
    assert type(converted[2]) is nn.LayerNorm and type(converted[3]) is nn.RMSNorm
    assert "layernorm=False" in str(converted.mtnorm_report)
