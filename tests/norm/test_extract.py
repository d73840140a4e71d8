"""mtnorm.extract: a standard single-task network with that task's exact outputs."""

from __future__ import annotations

import pytest
import torch
from norm_models import MODELS, ConvNet, atol, make
from torch import nn

import mtnorm
from mtnorm import TaskHeads, TaskRouted

TASKS = ("seg", "depth", "normal")


def _trained(model: nn.Module, x: torch.Tensor, norm: str) -> nn.Module:
    """A converted model whose tasks really differ: perturbed task parameters, a few train steps."""
    converted = mtnorm.convert(model, TASKS, norm=norm, shift=True if norm == "sigma" else None)
    with torch.no_grad():
        for p in mtnorm.task_parameters(converted):
            p.add_(torch.randn_like(p) * 0.3)
    converted.train()
    for _ in range(2):
        mtnorm.forward_tasks(converted, torch.randn_like(x), mode="sequential")
    return converted.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("norm", ["bn", "sigma", "dw"])
def test_extracted_model_gives_the_tasks_outputs(name, norm, dtype) -> None:
    model, x = make(name, dtype)
    converted = _trained(model, x, norm)
    for task in TASKS:
        single = mtnorm.extract(converted, task).eval()
        assert not any(isinstance(m, TaskRouted) for m in single.modules())
        assert not any(type(m).__module__.startswith("mtnorm") for m in single.modules())
        with mtnorm.use_task(converted, task):
            expected = converted(x)
        torch.testing.assert_close(single(x), expected, atol=atol(dtype), rtol=0)
    # the original is untouched and still multi-task
    assert mtnorm.tasks_of(converted) == TASKS


def test_sigmoid_gate_is_folded_into_the_batchnorm_weight() -> None:
    model, x = make("conv")
    converted = _trained(model, x, "sigma")
    single = mtnorm.extract(converted, "normal")
    bn = single.features[1]
    assert type(bn) is nn.BatchNorm2d
    torch.testing.assert_close(bn.weight, torch.sigmoid(converted.features[1].gamma[2]))
    assert sum(p.numel() for p in single.parameters()) == sum(p.numel() for p in ConvNet().parameters())


def test_heads_become_the_tasks_own_head() -> None:
    torch.manual_seed(0)
    heads = TaskHeads({t: nn.Linear(5, i + 1) for i, t in enumerate(TASKS)})
    model = mtnorm.convert(nn.Sequential(ConvNet(), heads), TASKS, norm="sigma").eval()
    x = torch.randn(4, 3, 8, 8)
    single = mtnorm.extract(model, "normal").eval()
    with mtnorm.use_task(model, "normal"):
        expected = model(x)["normal"]
    torch.testing.assert_close(single(x), expected, atol=1e-6, rtol=0)
    assert single[1] is not heads.heads["normal"]  # a copy, not the original head


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_extracted_models_script_and_export() -> None:
    model, x = make("conv", torch.float32)
    converted = _trained(model, x, "sigma")
    single = mtnorm.extract(converted, "depth").eval()
    scripted = torch.jit.script(single)
    torch.testing.assert_close(scripted(x), single(x))
    exported = torch.export.export(single, (x,))
    torch.testing.assert_close(exported.module()(x), single(x))


def test_extract_refuses_unknown_tasks_and_adain() -> None:
    model, x = make("conv")
    converted = _trained(model, x, "bn")
    with pytest.raises(KeyError, match=r"unknown task 'sky'.*'seg', 'depth', 'normal'"):
        mtnorm.extract(converted, "sky")
    adain = mtnorm.convert(make("conv")[0], TASKS, norm="adain")
    with pytest.raises(NotImplementedError, match="instance normalization"):
        mtnorm.extract(adain, "seg")
