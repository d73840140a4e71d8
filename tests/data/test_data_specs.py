"""Task specs fit the datasets: perfect predictions built from the targets score perfectly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtnorm.data import FashionScenes, MultiFashion, TaskSpec
from mtnorm.data.spec import KINDS


def perfect_prediction(spec: TaskSpec, target: torch.Tensor) -> torch.Tensor:
    """What a flawless head of this kind would output for ``target``."""
    if spec.kind in ("classification", "segmentation"):
        logits = F.one_hot(target, spec.num_outputs).float()
        return logits.movedim(-1, 1) if spec.kind == "segmentation" else logits
    if spec.kind == "binary":
        return (2 * target - 1) * 5.0  # logits
    return target.clone()


def check_specs(dataset, specs):
    assert set(specs) == set(dataset.targets)
    for task, spec in specs.items():
        assert spec.kind in KINDS
        target = dataset.targets[task][:16]
        metric = spec.metric()
        metric.update(perfect_prediction(spec, target), target)
        value = metric.compute()[spec.primary_metric]
        assert value == pytest.approx(1.0 if spec.higher_is_better else 0.0, abs=0.05), task


def test_multifashion_specs(fashion_dir):
    ds = MultiFashion("test", n_test=40, root=fashion_dir)
    check_specs(ds, ds.task_specs())


def test_fashion_scenes_specs(fashion_dir):
    ds = FashionScenes("test", n_test=16, root=fashion_dir)
    specs = ds.task_specs()
    check_specs(ds, specs)
    assert specs["segment"].num_outputs == 11 and specs["normal"].num_outputs == 3
    assert [specs[t].kind for t in ("segment", "depth", "normal", "has_bag")] == [
        "segmentation",
        "depth",
        "normal",
        "binary",
    ]
    with pytest.raises(KeyError, match="unknown tasks"):
        FashionScenes.task_specs(("segment", "colour"))


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("ranking", 1, dict, "x")
