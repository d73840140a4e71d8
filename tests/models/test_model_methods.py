"""Every method builds on every backbone, runs through forward_tasks and takes a training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtnorm
from mtnorm.models import (
    DenseHead,
    LeNetEncoder,
    PooledHead,
    SegNet,
    ToyEncoder,
    UnknownMethodError,
    available_methods,
    build_method,
    count_parameters,
    linear_heads,
    norm_layer,
)

METHODS = ["stl", "hps", "tsbn", "tssbn", "dwbn", "adain", "ln", "gn"]
TASKS = ("left", "right")


def lenet_method(name: str) -> nn.Module:
    torch.manual_seed(0)
    heads = linear_heads(TASKS, 16, 10)
    return build_method(name, lambda norm: LeNetEncoder(1, 4, 16, 36, norm), TASKS, heads)


def test_registry_lists_the_issue_methods():
    assert set(METHODS) <= set(available_methods())


@pytest.mark.parametrize("name", METHODS)
def test_method_builds_and_takes_one_step(name):
    model = lenet_method(name)
    x = torch.rand(8, 1, 36, 36)
    y = {t: torch.randint(0, 10, (8,)) for t in TASKS}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    out = mtnorm.forward_tasks(model, x, mode="sequential")
    assert set(out) == set(TASKS) and all(o.shape == (8, 10) for o in out.values())
    sum(F.cross_entropy(out[t], y[t]) for t in TASKS).backward()
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert any(changed)


def test_parameter_counts_follow_the_sharing():
    hps = lenet_method("hps")
    stl = lenet_method("stl")
    encoder = count_parameters(LeNetEncoder(1, 4, 16, 36, "bn"))
    heads = count_parameters(nn.ModuleDict(linear_heads(TASKS, 16, 10)))
    assert count_parameters(hps) == encoder + heads
    assert count_parameters(stl) == len(TASKS) * encoder + heads
    features = sum(m.num_features for m in hps.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    for name in ("tsbn", "tssbn", "dwbn", "adain"):
        # only norm parameters become per task: at most a few per task and filter on top of HPS
        extra = count_parameters(lenet_method(name)) - count_parameters(hps)
        assert -2 * features <= extra <= 2 * len(TASKS) * features
    assert count_parameters(lenet_method("tssbn")) == count_parameters(hps)  # T gates vs (γ, β), T=2


def test_stl_shares_nothing_and_ts_shares_all_convolutions():
    assert mtnorm.shared_parameters(lenet_method("stl")) == []
    ts = lenet_method("tssbn")
    shared = {id(p) for p in mtnorm.shared_parameters(ts)}
    layers = (nn.Conv2d, nn.Linear)
    convs = [m.weight for m in ts.encoder.modules() if isinstance(m, layers)]
    assert all(id(w) in shared for w in convs)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(UnknownMethodError, match="choose one of .*hps"):
        build_method("hsp", lambda norm: ToyEncoder(norm=norm), ["a"], {"a": nn.Linear(16, 2)})


def test_missing_head_is_an_error():
    with pytest.raises(ValueError, match="no head for tasks"):
        build_method("hps", lambda norm: ToyEncoder(norm=norm), ["a", "b"], {"a": nn.Linear(16, 2)})


@pytest.mark.parametrize(
    "kind,dims,cls",
    [
        ("bn", 2, nn.BatchNorm2d),
        ("bn", 1, nn.BatchNorm1d),
        ("ln", 2, nn.GroupNorm),
        ("ln", 1, nn.LayerNorm),
        ("gn", 2, nn.GroupNorm),
        ("none", 2, nn.Identity),
    ],
)
def test_norm_layer_kinds(kind, dims, cls):
    assert isinstance(norm_layer(kind, 12, dims), cls)


def test_norm_layer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown norm kind 'bm'"):
        norm_layer("bm", 8)


def test_segnet_and_dense_heads_shapes():
    net = SegNet(1, width=4, levels=2)
    x = torch.rand(2, 1, 16, 16)
    z = net(x)
    assert z.shape == (2, 4, 16, 16)
    normal = DenseHead(4, 3, normalize=True)(z)
    assert torch.allclose(normal.norm(dim=1), torch.ones(2, 16, 16), atol=1e-5)
    assert PooledHead(4)(z).shape == (2,)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == sum(
        isinstance(m, nn.Conv2d) for m in net.modules()
    )


def test_segnet_converts_and_routes_dense_tasks():
    tasks = ("segment", "depth")
    heads = {"segment": DenseHead(4, 11), "depth": DenseHead(4, 1)}
    model = build_method("tssbn", lambda norm: SegNet(1, 4, 2, norm), tasks, heads)
    out = mtnorm.forward_tasks(model, torch.rand(2, 1, 16, 16))
    assert out["segment"].shape == (2, 11, 16, 16) and out["depth"].shape == (2, 1, 16, 16)
