"""Tiny configs on the synthetic ``toy`` benchmark: a full run takes well under a second."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtnorm.train import Config, config_from_dict


def toy_config(out: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "method": "tssbn",
        "epochs": 2,
        "out": str(out),
        "log_every": 1,
        "data": {"name": "toy", "n_train": 256, "n_test": 64, "batch_size": 32},
        "model": {"hidden": 16},
        "optim": {"lr": 0.01, "scheduler": "step", "step_size": 1, "gamma": 0.5},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return config_from_dict(values)


def params_of(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def only_child(parent: Path) -> Path:
    """The one folder that a `mtnorm run` / `bench` invocation created under ``parent``."""
    children = [p for p in Path(parent).iterdir() if p.is_dir()]
    assert len(children) == 1, children
    return children[0]


def toy_yaml(tmp_path: Path, **extra: Any) -> Path:
    """A tiny `toy` config file for CLI tests; top-level keys in ``extra`` replace the defaults."""
    import yaml

    values: dict[str, Any] = {
        "method": "tssbn",
        "epochs": 1,
        "out": str(tmp_path / "run"),
        "data": {"name": "toy", "n_train": 128, "n_test": 64, "batch_size": 32},
        "model": {"hidden": 16},
    }
    values.update(extra)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(values))
    return path
