"""Backbones cut into stages: running the stages is the backbone's forward, on every backbone."""

import pytest
import torch
from torch import nn

from mtnorm.arch.stages import run_stages, sequential_groups, stage_shapes, stages_of
from mtnorm.models import LeNetEncoder, SegNet, ToyEncoder
from mtnorm.models.deeplab import CelebACNN
from mtnorm.models.resnet import ResNet50

BACKBONES = {
    "lenet": (lambda: LeNetEncoder(1, 4, 16, 36), (2, 1, 36, 36), 4),
    "segnet": (lambda: SegNet(1, 4, 2), (2, 1, 16, 16), 5),
    "celeba": (lambda: CelebACNN(3, (4, 8, 8, 8)), (2, 3, 32, 32), 4),
    "resnet50": (lambda: ResNet50(3, blocks=(1, 1, 1, 1)), (2, 3, 32, 32), 5),
    "toy": (lambda: ToyEncoder(8, 16), (2, 8), 2),
}


@pytest.mark.parametrize("name", BACKBONES)
def test_stages_compose_to_the_forward(name):
    make, shape, count = BACKBONES[name]
    torch.manual_seed(0)
    backbone = make().eval()
    x = torch.rand(shape)
    stages = stages_of(backbone)
    assert len(stages) == count
    assert torch.equal(run_stages(stages, x), backbone(x))


def test_stage_shapes_leave_running_statistics_and_mode_alone():
    backbone = SegNet(1, 4, 2).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    shapes = stage_shapes(backbone, torch.rand(2, 1, 16, 16))
    assert shapes == [(2, 4, 16, 16), (2, 4, 8, 8), (2, 8, 4, 4), (2, 4, 8, 8), (2, 4, 16, 16)]
    assert backbone.training
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_sequential_cut_after_activations_and_norm_blocks_with_pooling_in_the_last_stage():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    groups = sequential_groups(net)
    assert [len(g) for g in groups] == [3, 4]


def test_a_backbone_without_stages_is_refused_with_the_remedy():
    class Opaque(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="stages\\(\\) method"):
        stages_of(Opaque())
