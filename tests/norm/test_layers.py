"""Each task-specific norm layer keeps the contract of a PyTorch norm layer, per task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from norm_models import atol
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

TASKS = ("a", "b", "c")


def test_parameter_shapes_and_initial_values() -> None:
    bn = TaskBatchNorm(4, TASKS)
    assert bn.weight.shape == (3, 4) and torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert bn.running_mean.shape == (3, 4) and bn.num_batches_tracked.shape == (3,)
    sig = TaskSigmoidBatchNorm(4, TASKS)
    assert torch.all(sig.gamma == 0) and sig.beta is None  # gate 0.5, no shift (paper Eq. 3)
    assert torch.allclose(sig.importance(), torch.full((3, 4), 0.5))
    assert TaskSigmoidBatchNorm(4, TASKS, shift=True).beta.shape == (3, 4)
    shared = TaskBatchNorm(4, TASKS, share_stats=True)
    assert shared.running_mean.shape == (1, 4)
    ln = TaskSigmoidLayerNorm((2, 4), TASKS)
    assert ln.gamma.shape == (3, 2, 4) and ln.beta.shape == (3, 2, 4)


@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 5), (8, 4, 3, 3), (8, 4, 2, 3, 2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_single_task_equals_batchnorm_with_that_tasks_parameters(shape, momentum, dtype) -> None:
    """A task pass is nn.BatchNorm with the task's slice: outputs, grads, running stats, counters."""
    torch.manual_seed(0)
    layer = TaskBatchNorm(4, TASKS, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    ref = nn.BatchNorm1d(4, momentum=momentum, dtype=dtype)  # F.batch_norm accepts any rank
    with torch.no_grad():
        ref.weight.copy_(layer.weight[1])
        ref.bias.copy_(layer.bias[1])
    for step in range(3):
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        layer.route = 1
        y = layer(x)
        y_ref = F.batch_norm(
            x_ref, ref.running_mean, ref.running_var, ref.weight, ref.bias, True,
            momentum if momentum is not None else 1.0 / (step + 1), ref.eps,
        )
        torch.testing.assert_close(y, y_ref, atol=atol(dtype), rtol=0)
        (y * torch.arange(y.numel(), dtype=dtype).view_as(y)).sum().backward()
        (y_ref * torch.arange(y.numel(), dtype=dtype).view_as(y)).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=atol(dtype) * 10, rtol=0)
    torch.testing.assert_close(layer.running_mean[1], ref.running_mean)
    torch.testing.assert_close(layer.running_var[1], ref.running_var)
    assert layer.num_batches_tracked.tolist() == [0, 3, 0]
    # the other tasks' statistics were not touched
    assert torch.all(layer.running_mean[[0, 2]] == 0) and torch.all(layer.running_var[[0, 2]] == 1)
    torch.testing.assert_close(layer.weight.grad[1], ref.weight.grad, atol=atol(dtype) * 100, rtol=0)
    assert torch.all(layer.weight.grad[[0, 2]] == 0)


def test_eval_uses_the_tasks_running_statistics() -> None:
    layer = TaskBatchNorm(3, TASKS).double().eval()
    with torch.no_grad():
        layer.running_mean.copy_(torch.arange(9.0).view(3, 3))
        layer.running_var.fill_(4.0)
    x = torch.randn(5, 3, dtype=torch.double)
    for t in range(3):
        layer.route = t
        expected = (x - layer.running_mean[t]) / torch.sqrt(torch.tensor(4.0 + layer.eps))
        torch.testing.assert_close(layer(x), expected.double())


def test_sigmoid_batchnorm_is_gate_times_normalized_input() -> None:
    layer = TaskSigmoidBatchNorm(3, TASKS).double()
    with torch.no_grad():
        layer.gamma.copy_(torch.randn(3, 3))
    x = torch.randn(10, 3, 4, dtype=torch.double)
    layer.route = 2
    mean = x.mean(dim=(0, 2), keepdim=True)
    var = x.var(dim=(0, 2), unbiased=False, keepdim=True)
    expected = torch.sigmoid(layer.gamma[2])[None, :, None] * (x - mean) / torch.sqrt(var + layer.eps)
    torch.testing.assert_close(layer(x), expected)


def test_shared_statistics_pool_running_estimates_but_keep_task_affine() -> None:
    layer = TaskBatchNorm(2, TASKS, share_stats=True, momentum=0.5).double()
    xs = [torch.randn(6, 2, dtype=torch.double) + i for i in range(3)]
    expected = torch.zeros(2, dtype=torch.double)
    for t, x in enumerate(xs):
        layer.route = t
        layer(x)
        expected = 0.5 * expected + 0.5 * x.mean(0)
    torch.testing.assert_close(layer.running_mean[0], expected)
    assert int(layer.num_batches_tracked[0]) == 3


def test_no_running_stats_uses_batch_statistics_in_eval() -> None:
    layer = TaskBatchNorm(2, TASKS, track_running_stats=False).double().eval()
    assert layer.running_mean is None
    x = torch.randn(6, 2, dtype=torch.double)
    layer.route = 0
    torch.testing.assert_close(layer(x), F.batch_norm(x, None, None, training=True))


def test_dw_bn_mixes_statistics_with_softmax_weights() -> None:
    layer = DynamicWeightedBatchNorm(2, TASKS, self_weight=0.8).double().eval()
    mix = layer.mixing()
    torch.testing.assert_close(mix.sum(1), torch.ones(3, dtype=torch.double))
    torch.testing.assert_close(torch.diagonal(mix), torch.full((3,), 0.8, dtype=torch.double))
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]))
        layer.running_var.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    x = torch.randn(4, 2, dtype=torch.double)
    layer.route = 0
    mu = mix[0] @ layer.running_mean
    var = mix[0] @ layer.running_var
    torch.testing.assert_close(layer(x), (x - mu) / torch.sqrt(var + layer.eps))


def test_dw_bn_lone_training_pass_uses_own_batch_and_others_running_stats() -> None:
    layer = DynamicWeightedBatchNorm(2, TASKS, self_weight=0.5, momentum=0.0).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([[9.0, 9.0], [1.0, 2.0], [3.0, 4.0]]))
        layer.running_var.copy_(torch.tensor([[9.0, 9.0], [2.0, 2.0], [3.0, 3.0]]))
    x = torch.randn(16, 2, dtype=torch.double)
    layer.route = 0
    w = layer.mixing()[0]
    mean = w[0] * x.mean(0) + w[1] * layer.running_mean[1] + w[2] * layer.running_mean[2]
    var = w[0] * x.var(0, unbiased=False) + w[1] * 2.0 + w[2] * 3.0
    torch.testing.assert_close(layer(x), (x - mean) / torch.sqrt(var + layer.eps))
    y = layer(x)
    y.pow(2).sum().backward()
    assert layer.mix_logits.grad is not None and layer.mix_logits.grad[0].abs().sum() > 0


def test_adain_bn_gate_mixes_instance_and_batch_normalization() -> None:
    layer = AdaINBatchNorm(3, TASKS, in_weight=0.3).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.normal_()
    x = torch.randn(4, 3, 5, 5, dtype=torch.double)
    layer.route = 1
    rho = torch.full((3,), 0.3, dtype=torch.double)[None, :, None, None]
    in_x = F.instance_norm(x, eps=layer.eps)
    bn_x = F.batch_norm(x, None, None, training=True, eps=layer.eps)
    expected = layer.weight[1][None, :, None, None] * (rho * in_x + (1 - rho) * bn_x)
    expected = expected + layer.bias[1][None, :, None, None]
    torch.testing.assert_close(layer(x), expected)


def test_task_layernorm_matches_layer_norm_with_task_affine(dtype) -> None:
    layer = TaskLayerNorm(6, TASKS, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 5, 6, dtype=dtype)
    for t in range(3):
        layer.route = t
        expected = F.layer_norm(x, (6,), layer.weight[t], layer.bias[t])
        torch.testing.assert_close(layer(x), expected, atol=atol(dtype), rtol=0)
    sig = TaskSigmoidLayerNorm(6, TASKS, dtype=dtype)
    sig.route = 1
    expected = 0.5 * F.layer_norm(x, (6,))
    torch.testing.assert_close(sig(x), expected, atol=atol(dtype), rtol=0)


@pytest.mark.parametrize(
    "layer, x, message",
    [
        (TaskBatchNorm(4, TASKS, spatial_dims=2), torch.randn(2, 4), "expected a 4D input"),
        (TaskBatchNorm(4, TASKS), torch.randn(2, 3, 5), "expected 4 channels"),
        (TaskLayerNorm(4, TASKS), torch.randn(2, 5), "normalizes trailing shape"),
    ],
)
def test_wrong_shapes_name_the_problem(layer, x, message) -> None:
    layer.route = 0
    with pytest.raises(ValueError, match=message):
        layer(x)


def test_no_task_chosen_explains_how_to_choose() -> None:
    layer = TaskSigmoidBatchNorm(4, TASKS)
    with pytest.raises(RuntimeError, match=r"use_task\(model, task\)"):
        layer(torch.randn(2, 4))


def test_batched_input_must_split_into_task_chunks() -> None:
    layer = TaskBatchNorm(4, TASKS)
    layer.route = mtnorm.BATCHED
    with pytest.raises(ValueError, match="divisible by the 3 tasks"):
        layer(torch.randn(7, 4))


@pytest.mark.parametrize("bad, error", [([], ValueError), (["a", "a"], ValueError),
                                         (["a", 3], TypeError), ("ab", TypeError), ([""], ValueError)])
def test_task_names_are_validated(bad, error) -> None:
    with pytest.raises(error):
        TaskBatchNorm(4, bad)


HALF_LAYERS = [
    mtnorm.TaskBatchNorm,
    mtnorm.TaskSigmoidBatchNorm,
    mtnorm.DynamicWeightedBatchNorm,
    mtnorm.AdaINBatchNorm,
    lambda c, tasks: mtnorm.convert_sync(mtnorm.TaskBatchNorm(c, tasks)),  # one process: its local path
]


@pytest.mark.parametrize("make", HALF_LAYERS, ids=["tsbn", "tssbn", "dwbn", "adain", "sync"])
@pytest.mark.parametrize("mode", ["sequential", "batched"])
@pytest.mark.parametrize("autocast", [False, True])
def test_half_inputs_normalize_in_float32_and_come_back_in_half(make, mode, autocast) -> None:
    """Activations of std 300 in fp16 (x^2 > 65504): every task norm gives the float32 result to
    half rounding, in half, as nn.BatchNorm's native kernel does. Before DW-BN and AdaIN-BN
    computed their moments in half: NaN (DW-BN) and an error of 4.1 (AdaIN-BN)."""
    torch.manual_seed(0)
    x = (300 * torch.randn(16, 4, 5, 5)).half()
    tasks = ["a", "b"]
    torch.manual_seed(1)
    ref_layer = make(4, tasks).train()
    torch.manual_seed(1)
    layer = make(4, tasks).train()
    ref = mtnorm.forward_tasks(ref_layer, x.float(), mode=mode)
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        out = mtnorm.forward_tasks(layer, x, mode=mode)
    for t in tasks:
        assert out[t].dtype == torch.float16
        # |y| <= 4 here: half's spacing there is 2**-8; measured max error 1.6e-3
        torch.testing.assert_close(out[t].float(), ref[t], rtol=0, atol=4e-3)
    torch.testing.assert_close(layer.running_var, ref_layer.running_var, rtol=1e-3, atol=0)
