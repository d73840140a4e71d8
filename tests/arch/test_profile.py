import torch
from torch import nn

from mtnorm.profile import profile


def test_profile_matches_hand_count_on_two_linear_layers():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.zeros(5, 4)
    result = profile(model, x, baseline=nn.Linear(4, 2))
    # hand count: params 4*3+3 + 3*2+2 = 23; FLOPs 2*batch*(4*3 + 3*2) = 180 (bias adds are not counted)
    assert result.params == 23
    assert result.flops == 180
    assert result.params_ratio == 23 / 10
    assert result.flops_ratio == 180 / (2 * 5 * 4 * 2)


def test_profile_of_a_converted_model_counts_every_task_pass():
    import copy

    import mtnorm

    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).eval()
    single = profile(net, torch.randn(5, 4))
    tsbn = mtnorm.convert(copy.deepcopy(net), ["a", "b", "c"], norm="bn").eval()
    multi = profile(tsbn, torch.randn(5, 4), baseline=net)
    assert multi.params == single.params + 2 * 2 * 3  # two more tasks' weight and bias rows
    assert multi.flops == 3 * single.flops and multi.flops_ratio == 3.0
