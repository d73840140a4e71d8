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


def test_encoder_growth_follows_each_method_sharing():
    from mtnorm.models import ToyEncoder
    from mtnorm.profile import encoder_growth

    x = torch.randn(2, 8)
    growth = encoder_growth(["stl", "hps", "tsbn"], lambda norm: ToyEncoder(8, 16, norm), x, [1, 3])
    one = growth["hps"][0]
    channels = 2 * 16  # two BatchNorm1d(16)
    assert [r["params"] for r in growth["stl"]] == [one["params"], 3 * one["params"]]
    assert [r["params"] for r in growth["hps"]] == [one["params"]] * 2
    assert growth["tsbn"][1]["params"] == one["params"] + 2 * 2 * channels  # weight + bias per new task
    assert [r["flops"] for r in growth["hps"]] == [one["flops"]] * 2  # one pass serves every task
    assert growth["tsbn"][1]["flops"] == 3 * one["flops"]  # a pass per task


def test_profile_command_writes_the_plot_and_its_numbers(tmp_path, capsys):
    import json

    from mtnorm.cli import main

    out = tmp_path / "growth.png"
    assert main(["profile", "--methods", "hps,tssbn", "--tasks", "1,2", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["tasks"] for r in data["tssbn"]] == [1, 2]
    assert "| hps" in capsys.readouterr().out
    assert main(["profile", "--methods", "hsp"]) == 2  # a typo is named, nothing is built
    assert "did you mean 'hps'" in capsys.readouterr().err
