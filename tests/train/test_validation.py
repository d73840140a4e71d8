"""Validation up front (issue 9, item 5): every bad value is one `mtnorm: error:` line naming the key,
the value and the valid range, exit 2, before any data is built or any epoch runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtnorm.cli import main
from mtnorm.train import ConfigError, config_from_dict
from mtnorm.train.config import RANGES, parse_overrides, set_dotted

BAD_VALUES = {
    "epochs": 0,
    "seed": -1,
    "eval_every": 0,
    "log_every": 0,
    "save_every": -1,
    "conflict_every": -1,
    "data.n_train": 0,
    "data.n_test": 0,
    "data.seed": 2**32,
    "data.batch_size": 1,
    "data.eval_batch_size": 0,
    "model.width": 0,
    "model.hidden": 0,
    "model.levels": 0,
    "model.max_width": 0,
    "optim.lr": float("nan"),
    "optim.weight_decay": -0.1,
    "optim.momentum": 1.0,
    "optim.norm_lr_mult": -1.0,
    "optim.layernorm_lr_mult": float("inf"),
    "optim.step_size": 0,
    "optim.gamma": 0.0,
}


def nested(dotted: str, value) -> dict:
    values: dict = {}
    set_dotted(values, dotted, value)
    return values


def test_every_range_entry_has_a_bad_value_here():
    assert set(BAD_VALUES) == set(RANGES)


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_every_out_of_range_value_is_refused_with_its_range(key):
    with pytest.raises(ConfigError, match=rf"{key}: .* is out of range; expected {RANGES[key][1][:12]}"):
        config_from_dict(nested(key, BAD_VALUES[key]))


def test_the_defaults_are_in_range():
    config_from_dict({})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-3, 0.0])
def test_learning_rates_must_be_finite_and_positive(value):
    with pytest.raises(ConfigError, match="optim.lr"):
        config_from_dict({"optim": {"lr": value}})


def test_unknown_set_path_names_the_valid_keys():
    expected = r"optim.lrr: unknown key \(did you mean 'lr'\?\); valid keys in optim"
    with pytest.raises(ConfigError, match=expected):
        set_dotted({}, "optim.lrr", 0.1)


def test_a_section_cannot_be_set_to_null():
    with pytest.raises(ConfigError, match="data is a section, not a value"):
        set_dotted({"data": {"n_train": 10}}, "data", None)


def test_free_form_mappings_accept_any_key():
    values: dict = {}
    set_dotted(values, "balancer_kwargs.beta", 0.5)
    assert values == {"balancer_kwargs": {"beta": 0.5}}


def test_broken_yaml_in_a_value_is_a_clear_error():
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["optim.lr=[0.1"])


def _yaml(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "hps",
                "epochs": 1,
                "out": str(tmp_path / "run"),
                "data": {"name": "toy", "n_train": 64, "n_test": 32, "batch_size": 32},
                "model": {"hidden": 8},
            }
        )
    )
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "optim.norm_lr_mult=-1"], "optim.norm_lr_mult: -1.0 is out of range"),
        (["--set", "optim.weight_decay=-0.5"], "optim.weight_decay: -0.5 is out of range"),
        (["--set", "optim.lr=.nan"], "optim.lr: nan is out of range"),
        (["--set", "data.n_train=0"], "data.n_train: 0 is out of range"),
        (["--set", "data.n_test=0"], "data.n_test: 0 is out of range"),
        (["--set", "model.hidden=0"], "model.hidden: 0 is out of range"),
        (["--set", "optim.step_size=0"], "optim.step_size: 0 is out of range"),
        (["--set", "optim.nope=1"], "unknown key"),
        (["--set", "data=null"], "data is a section"),
        (["--set", "optim.lr={a: [1"], "not valid YAML"),
        (["--set", "balancer=nope"], "unknown balancing method 'nope'"),
    ],
)
def test_cli_refuses_bad_values_before_training(tmp_path, capsys, argv, message):
    assert main(["train", str(_yaml(tmp_path)), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("mtnorm: error:") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was trained or written


def test_run_with_a_balancer_typo_fails_before_anything_trains(tmp_path, capsys):
    code = main(["run", "--balancer", "db_mlt", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "did you mean 'db_mtl'" in err
    assert not (tmp_path / "r").exists()


def test_run_with_a_bad_size_fails_before_anything_trains(tmp_path, capsys):
    assert main(["run", "--n-train", "0", "--out", str(tmp_path / "r")]) == 2
    assert "data.n_train: 0 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_with_a_baseline_typo_is_an_error(tmp_path, capsys):
    path = _yaml(tmp_path)
    code = main(["bench", str(path), "--methods", "hps", "--baseline", "stll", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "baseline: unknown method 'stll'" in err
    assert not (tmp_path / "b").exists()
