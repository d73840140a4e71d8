"""MTAN's own properties (the shared grid is in test_cross_stitch.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_cross_stitch import BACKBONES, TASKS, build, inputs
from torch import nn

import mtnorm
from mtnorm.arch.mtan import MTAN, AttentionStage, attention_branch
from mtnorm.models import PooledHead, build_method
from mtnorm.models.resnet import ResNet50

pytestmark = pytest.mark.usefixtures("one_thread")


def open_masks(model: MTAN) -> None:
    """Every mask's last BatchNorm outputs 50: sigmoid(50) == 1.0 in float64, so â^k = p^k."""
    with torch.no_grad():
        for t in TASKS:
            for stage in model.attention[t]:
                bn = stage.g[-2]
                bn.weight.zero_()
                bn.bias.fill_(50.0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_open_masks_are_hard_parameter_sharing(backbone):
    """a = 1 everywhere: task t's output is head_t(backbone(x)), the HPS network."""
    model = build("mtan", backbone).eval()
    open_masks(model)
    x = inputs(backbone)
    out = model(x)
    z = model.backbone(x)
    for t in TASKS:
        torch.testing.assert_close(out[t], model.heads.heads[t](z), rtol=1e-12, atol=1e-12)


def test_masks_are_soft_and_multiply_the_shared_features():
    model = build("mtan", "segnet").eval()
    x = inputs("segnet")
    seen = []
    stage = model.attention["a"][1]
    stage.g.register_forward_hook(lambda m, i, o: seen.append(o))
    model(x)
    (mask,) = seen
    assert mask.shape == (4, 4, 8, 8) and bool(((mask > 0) & (mask < 1)).all())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_use_task_runs_only_that_tasks_branch(backbone):
    model = build("mtan", backbone).eval()
    calls = {t: 0 for t in TASKS}
    for t in TASKS:
        for stage in model.attention[t]:
            stage.register_forward_hook(lambda m, i, o, t=t: calls.__setitem__(t, calls[t] + 1))
    with mtnorm.use_task(model, "b"):
        model(inputs(backbone))
    assert calls == {"a": 0, "b": len(model.attention["b"])}


def test_a_tasks_loss_reaches_only_its_own_branch():
    model = build("mtan", "lenet").train()
    out = model(inputs("lenet"))
    F.cross_entropy(out["a"], torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None for p in model.attention["a"].parameters())
    assert all(p.grad is None for p in model.attention["b"].parameters())
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_attention_is_task_specific_and_the_backbone_shared():
    model = build("mtan", "segnet")
    specific = {id(p) for p in mtnorm.task_parameters(model)}
    assert all(id(p) in specific for p in model.attention.parameters())
    shared = {id(p) for p in mtnorm.shared_parameters(model)}
    assert shared == {id(p) for p in model.backbone.parameters()}


def test_resampling_follows_the_stage_sizes():
    """SegNet goes down then up: the encoder's f pools (adaptive max), the decoder's interpolates;
    LeNet's map -> vector step flattens."""
    seg = build("mtan", "segnet").attention["a"]  # stages 16, 8, 4, 8, 16
    assert seg[0].f is None
    assert [s.grow for s in seg[1:]] == [False, False, True, True]
    assert [s.size for s in seg] == [(16, 16), (8, 8), (4, 4), (8, 8), (16, 16)]
    lenet = build("mtan", "lenet").attention["a"]  # [4, 16, 16], [4, 6, 6], [8], [8] (width 2)
    assert isinstance(lenet[2].f[0], nn.Flatten) and lenet[2].f[1].in_features == 4 * 6 * 6
    assert isinstance(lenet[3].f[0], nn.Linear) and lenet[3].f[0].in_features == 8


def test_combine_resizes_to_the_next_stage():
    down = AttentionStage((2, 6, 4, 4), (2, 3, 8, 8)).eval()
    up = AttentionStage((2, 6, 8, 8), (2, 3, 4, 4)).eval()
    assert down.combine(torch.rand(2, 3, 8, 8)).shape == (2, 6, 4, 4)
    assert up.combine(torch.rand(2, 3, 4, 4)).shape == (2, 6, 8, 8)
    assert up(torch.rand(2, 6, 8, 8), torch.rand(2, 3, 4, 4)).shape == (2, 6, 8, 8)


def test_reduction_narrows_the_attention_modules():
    full = build("mtan", "segnet")
    narrow = build("mtan", "segnet", reduction=2)
    count = mtnorm.models.count_parameters
    assert count(narrow.attention) < count(full.attention)
    assert narrow.attention["a"][2].f[0].out_channels == 4  # stage 2 has 8 channels
    assert narrow(inputs("segnet"))["a"].shape == (4, 2, 16, 16)
    with pytest.raises(ValueError, match="reduction must be a positive integer"):
        build("mtan", "toy", reduction=0)


def test_stage_shapes_it_cannot_attend_to_are_refused():
    with pytest.raises(ValueError, match="cannot resample a vector stage"):
        attention_branch([(2, 8), (2, 4, 3, 3)])
    with pytest.raises(ValueError, match=r"stage 0 outputs \(2, 4, 9\)"):
        attention_branch([(2, 4, 9)])


def test_resnet50_stages():
    """ResNet-50 (one block per layer; reduction 4 as LibMTL's ResNet MTAN): five attended stages,
    the stride-2 layer pooled."""
    torch.manual_seed(0)
    heads = {t: PooledHead(2048) for t in TASKS}
    model = build_method(
        "mtan", lambda norm: ResNet50(3, norm, blocks=(1, 1, 1, 1)), TASKS, heads,
        example_input=torch.rand(2, 3, 16, 16), reduction=4,
    ).eval()
    assert [s.size for s in model.attention["a"]] == [(4, 4), (4, 4), (2, 2), (2, 2), (2, 2)]
    with torch.no_grad():
        out = mtnorm.forward_tasks(model, torch.rand(2, 3, 16, 16))
    assert {t: o.shape for t, o in out.items()} == {t: (2,) for t in TASKS}
