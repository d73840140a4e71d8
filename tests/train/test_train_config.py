"""Config loading: unknown keys and wrong types are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtnorm.train import Config, ConfigError, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_unknown_top_level_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"methd": "hps"})
    msg = str(e.value)
    assert "'methd'" in msg and "did you mean 'method'" in msg
    assert "method" in msg and "balancer" in msg and "epochs" in msg


def test_unknown_nested_key_names_its_section():
    with pytest.raises(ConfigError, match=r"unknown key optim\.'lrr'.*valid keys in optim: name, lr"):
        config_from_dict({"optim": {"lrr": 0.1}})


@pytest.mark.parametrize(
    "values,pattern",
    [
        ({"epochs": "ten"}, r"epochs: expected int, got 'ten'"),
        ({"epochs": 2.5}, r"epochs: expected int"),
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected float"),
        ({"deterministic": "yes"}, r"deterministic: expected bool"),
        ({"epochs": True}, r"epochs: expected int, got the boolean True"),
        ({"data": {"tasks": "left"}}, r"data\.tasks: expected"),
        ({"data": 3}, r"data: expected a mapping"),
        ({"precision": "fp8"}, r"precision: 'fp8' is not one of"),
        ({"epochs": 0}, r"epochs: 0 is out of range; expected an integer >= 1"),
        ({"device": "tpu"}, r"device: 'tpu'"),
    ],
)
def test_wrong_values_are_errors(values, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(values)


def test_ints_are_accepted_for_floats_and_yaml_exponents_parse(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 0\nepochs: 3\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.0 and cfg.epochs == 3
    assert isinstance(cfg, Config)


def test_load_config_prefixes_the_file_and_applies_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: hps\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'bogus'"):
        load_config(path)
    path.write_text("method: hps\n")
    assert load_config(path, {"optim.lr": 0.5}).optim.lr == 0.5
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"multifashion.yaml", "scenes.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    from mtnorm.models import available_methods
    from mtnorm.train.benchmarks import BENCHMARKS

    cfg = load_config(path)
    assert cfg.method in available_methods()
    assert cfg.data.name in BENCHMARKS


@pytest.mark.parametrize("name", ["multifashion", "scenes"])
def test_embedded_configs_match_the_run_presets(name):
    """`mtnorm run` and `mtnorm train configs/<name>.yaml` train the same thing."""
    from mtnorm.train import to_dict
    from mtnorm.train.experiment import PRESETS

    cfg = to_dict(load_config(Path(__file__).parents[2] / "configs" / f"{name}.yaml"))
    for section, values in PRESETS[name].items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert cfg[section][key] == value, f"{section}.{key}"
        else:
            assert cfg[section] == values, section
