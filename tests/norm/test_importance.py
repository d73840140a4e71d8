"""mtnorm.importance: the task-filter matrices the analysis is built on."""

from __future__ import annotations

import pytest
import torch
from norm_models import Block, ConvNet
from torch import nn

import mtnorm


def test_importance_is_the_gate_for_sigma_layers_in_module_order() -> None:
    model = mtnorm.convert(ConvNet(), ["a", "b", "c"], norm="sigma")
    with torch.no_grad():
        model.features[4].gamma.copy_(torch.randn(3, 6))
    imp = mtnorm.importance(model)
    assert list(imp) == ["features.1", "features.4", "bn"]
    assert imp["features.1"].shape == (3, 6) and imp["bn"].shape == (3, 5)
    torch.testing.assert_close(imp["features.4"], torch.sigmoid(model.features[4].gamma))
    assert not imp["features.4"].requires_grad
    imp["features.4"].zero_()  # a copy: the model is unaffected
    assert model.features[4].gamma.abs().sum() > 0


def test_importance_is_abs_gamma_for_tsbn_and_flattened_for_layernorm() -> None:
    body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Unflatten(1, (1, 4)), Block(4, 1))
    model = mtnorm.convert(body, ["a", "b"], norm="bn")
    with torch.no_grad():
        model[1].weight.copy_(-torch.ones(2, 4))
    imp = mtnorm.importance(model)
    assert torch.equal(imp["1"], torch.ones(2, 4))
    assert imp["3.ln1"].shape == (2, 4)


def test_importance_of_an_unconverted_model_is_an_error() -> None:
    with pytest.raises(ValueError, match="convert it"):
        mtnorm.importance(ConvNet())
