"""Every execution mode right on the models people use (issue 8, item 3): batches of one,
sequence-first inputs, shared batch statistics, autocast, container types, keyword inputs, copies."""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
from torch import nn

import mtnorm
from mtnorm.norm.routing import choose_mode

TASKS = ("a", "b", "c")


def conv_net(norm: str = "bn") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(6, 4),
    )
    return mtnorm.convert(net, TASKS, norm=norm)


def test_batched_refuses_a_per_task_batch_of_one_and_keeps_stats_finite():
    model = conv_net()
    before = copy.deepcopy(model[1].running_var)
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        mtnorm.forward_tasks(model, x, mode="batched")
    assert torch.equal(model[1].running_var, before)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        mtnorm.forward_tasks(model, x, mode="sequential")  # PyTorch's own check, same message
    model.eval()
    assert torch.isfinite(mtnorm.forward_tasks(model, x, mode="batched")["a"]).all()  # eval is fine


def test_sequence_first_transformer_is_never_batched_along_the_sequence():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False: [S, N, E]
    model = mtnorm.convert(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), TASKS, norm="sigma")
    model.eval()
    x = torch.randn(5, 2, 8)  # S=5, N=2
    assert choose_mode(model, x, 3) == "sequential"
    ref = mtnorm.forward_tasks(model, x, mode="sequential")
    auto = mtnorm.forward_tasks(model, x)
    along_batch = mtnorm.forward_tasks(model, x, mode="batched", batch_dim=1)
    for t in TASKS:
        torch.testing.assert_close(auto[t], ref[t])
        torch.testing.assert_close(along_batch[t], ref[t], atol=1e-5, rtol=1e-5)


def test_shared_batch_norm_keeps_auto_sequential_and_batched_refuses_in_training():
    class MyBN(nn.BatchNorm2d):  # an unconverted subclass with its own forward stays shared
        def forward(self, x):
            return super().forward(x) * 1.0

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), MyBN(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.warns(UserWarning):
        model = mtnorm.convert(net, TASKS, norm="bn")
    x = torch.randn(2, 3, 8, 8)
    assert choose_mode(model, x, 3) == "sequential"
    with pytest.raises(ValueError, match=r"shared layer 2 \(.*MyBN\)"):
        mtnorm.forward_tasks(model, x, mode="batched")
    model.eval()  # running statistics: batched equals sequential again
    b = mtnorm.forward_tasks(model, x, mode="batched")
    s = mtnorm.forward_tasks(model, x, mode="sequential")
    for t in TASKS:
        torch.testing.assert_close(b[t], s[t])


@pytest.mark.parametrize("norm", ["bn", "sigma", "dw", "adain"])
@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_bf16_autocast_in_every_mode(norm, mode):
    model = conv_net(norm)
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mtnorm.forward_tasks(model, x, mode=mode)
    sum(o.float().pow(2).mean() for o in out.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert all(torch.isfinite(b).all() for b in model.buffers())


def test_bf16_batched_equals_bf16_sequential_for_tsbn():
    model, other = conv_net(), conv_net()
    x = torch.randn(4, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b = mtnorm.forward_tasks(model, x, mode="batched")
        s = mtnorm.forward_tasks(other, x, mode="sequential")
    for t in TASKS:
        torch.testing.assert_close(b[t], s[t])


Pair = collections.namedtuple("Pair", ["logits", "aux"])


@dataclasses.dataclass
class FakeModelOutput(collections.OrderedDict):
    """Like transformers' ModelOutput: an OrderedDict built from keyword fields."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                self[f.name] = v


class Wrap(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.body, self.kind = conv_net(), kind

    def forward(self, x, scale=None, *, bias=None):
        y = self.body(x)
        if scale is not None:
            y = y * scale
        if bias is not None:
            y = y + bias
        if self.kind == "namedtuple":
            return Pair(y, y.sum(1))
        if self.kind == "ordereddict":
            return collections.OrderedDict(logits=y, aux=y.sum(1))
        return FakeModelOutput(last_hidden_state=y, pooler_output=y.sum(1))


@pytest.mark.parametrize("kind", ["namedtuple", "ordereddict", "modeloutput"])
@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_outputs_keep_the_models_container_type(kind, mode):
    model = Wrap(kind)
    out = mtnorm.forward_tasks(model, torch.randn(4, 3, 6, 6), mode=mode)
    expected = {"namedtuple": Pair, "ordereddict": collections.OrderedDict, "modeloutput": FakeModelOutput}
    for t in TASKS:
        assert type(out[t]) is expected[kind]
    if kind == "modeloutput":
        assert out["a"].last_hidden_state.shape == (4, 4)


def test_keyword_and_positional_inputs_are_repeated_in_batched_mode():
    model = Wrap("namedtuple")
    x = torch.randn(4, 3, 6, 6)
    scale = torch.rand(4, 1)  # batch-shaped: repeated
    bias = torch.rand(1, 4)  # broadcasting: passed unchanged
    b = mtnorm.forward_tasks(model, x, scale, mode="batched", bias=bias)
    s = mtnorm.forward_tasks(model, x, scale, mode="sequential", bias=bias)
    for t in TASKS:
        torch.testing.assert_close(b[t].logits, s[t].logits, atol=1e-5, rtol=1e-5)


def test_keyword_only_inputs():
    model = conv_net()
    s = mtnorm.forward_tasks(model, input=torch.randn(4, 3, 6, 6), mode="sequential")
    assert set(s) == set(TASKS)


def test_a_copy_taken_inside_use_task_is_unrouted():
    model = conv_net()
    with mtnorm.use_task(model, "b"):
        clone = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="no task chosen"):
        clone(torch.randn(2, 3, 4, 4))
