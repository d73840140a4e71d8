"""Training configuration: nested dataclasses, loaded from YAML with strict checking.

Every key is checked against the dataclass fields: an unknown or misspelled key is an error that
names it (with the closest valid key) and lists the valid ones, and a value of the wrong type is an
error naming the key, the expected type and what was given. Nothing is silently ignored, because a
typo in a config should never quietly fall back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says which key and why."""


@dataclass
class DataConfig:
    """Which benchmark, how much of it, and how it is batched."""

    name: str = "multifashion"
    root: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    seed: int = 0
    batch_size: int = 256
    eval_batch_size: int = 1024
    tasks: list[str] | None = None  # a subset of the benchmark's tasks; None = its default set


@dataclass
class ModelConfig:
    """Backbone size; which fields matter depends on the benchmark's backbone."""

    backbone: str = "default"  # the benchmark's own; dense benchmarks: segnet | resnet50
    width: int = 16
    hidden: int = 128
    levels: int = 3
    max_width: int | None = None
    checkpoint: str | None = None  # user-provided pretrained backbone weights (never downloaded)


@dataclass
class OptimConfig:
    """Optimizer, discriminative learning rates and schedule."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    norm_lr_mult: float | None = None  # α; None = the method's default (100 for tssbn, else 1)
    layernorm_lr_mult: float = 10.0
    scheduler: str = "none"  # none | step | cosine
    step_size: int = 100
    gamma: float = 0.5


@dataclass
class Config:
    """One training run: a method on a benchmark, combined with a balancer."""

    method: str = "tssbn"
    balancer: str = "ew"
    balancer_kwargs: dict[str, Any] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    # per-task loss multipliers applied before the balancer (tasks not named keep 1.0)
    loss_weights: dict[str, float] = field(default_factory=dict)
    epochs: int = 5
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16
    forward_mode: str = "auto"  # auto | sequential | batched (see mtnorm.forward_tasks)
    deterministic: bool = True
    eval_every: int = 1  # epochs
    log_every: int = 50  # steps
    save_every: int = 0  # steps between mid-epoch checkpoints; 0 = only at epoch ends
    out: str = "runs/default"
    progress: bool | None = None  # None = only when stderr is a TTY
    tensorboard: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "precision": ("fp32", "bf16", "fp16"),
    "forward_mode": ("auto", "sequential", "batched"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.scheduler": ("none", "step", "cosine"),
    "model.backbone": ("default", "segnet", "resnet50"),
}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        (item,) = typing.get_args(tp)
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" as a string; accept it when it parses as a number
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and tp is not bool:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got the boolean {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, values: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {prefix}{key!r}{hint}; valid keys in {where}: {', '.join(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(value, tp, f"{prefix}{key}")
            allowed = CHOICES.get(f"{prefix}{key}")
            if allowed and kwargs[key] not in allowed:
                raise ConfigError(f"{prefix}{key}: {kwargs[key]!r} is not one of {list(allowed)}")
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain (nested) dict."""
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config; ``overrides`` (dotted keys, e.g. ``{"optim.lr": 0.01}``) win."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for dotted, value in (overrides or {}).items():
        set_dotted(values, dotted, value)
    try:
        return config_from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """``values["a"]["b"] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    *parents, last = dotted.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    positive = {
        "epochs": cfg.epochs,
        "eval_every": cfg.eval_every,
        "log_every": cfg.log_every,
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "model.width": cfg.model.width,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {cfg.optim.lr}")
    for task, weight in cfg.loss_weights.items():
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not ok or not math.isfinite(weight) or weight < 0:
            raise ConfigError(
                f"loss_weights.{task}: expected a finite non-negative number, got {weight!r}"
            )
        cfg.loss_weights[task] = float(weight)
    if not (cfg.device in ("cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: {cfg.device!r} is not one of 'cpu', 'cuda', 'cuda:N', 'mps'")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict (what checkpoints and results store)."""
    return dataclasses.asdict(cfg)
