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
from collections.abc import Callable, Sequence
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

    # the benchmark's own; dense: segnet | segnet_mtan | resnet50 | resnet18 | vit_s | swin_t (timm)
    backbone: str = "default"
    width: int = 16
    hidden: int = 128
    levels: int = 3
    max_width: int | None = None
    checkpoint: str | None = None  # user-provided pretrained backbone weights (never downloaded)
    lora_rank: int | None = None  # shared LoRA adapters on the backbone's linears, the rest frozen


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
    # steps between gradient-conflict records (conflict.jsonl, mtnorm.analysis.conflict); 0 = off
    conflict_every: int = 0
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
    "model.backbone": ("default", "segnet", "segnet_mtan", "resnet50", "resnet18", "vit_s", "swin_t"),
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


def _section_fields(dotted_parent: list[str]) -> dict[str, Any] | None:
    """The field types of the config section at ``dotted_parent`` (None past a non-section key)."""
    cls: Any = Config
    for part in dotted_parent:
        hints = typing.get_type_hints(cls)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return None
        cls = hints[part]
    return typing.get_type_hints(cls)


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """``values["a"]["b"] = value`` for ``dotted == "a.b"``, creating sections as needed.

    The path is checked against the config's sections: an unknown key names the valid ones at
    that level, and a whole section cannot be replaced by a scalar or null (``--set data=null``
    would otherwise silently reset every data key to its default). Keys inside free-form mappings
    (``balancer_kwargs.*``, ``method_kwargs.*``, ``loss_weights.*``) are not checked here.
    """
    *parents, last = dotted.split(".")
    if not all(parents + [last]):
        raise ConfigError(f"--set {dotted}: empty key in the dotted path")
    fields = _section_fields(parents)
    if fields is not None:
        if last not in fields:
            where = ".".join(parents) or "the config"
            close = difflib.get_close_matches(last, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(f"--set {dotted}: unknown key{hint}; valid keys in {where}: {valid}")
        if dataclasses.is_dataclass(fields[last]) and not isinstance(value, dict):
            raise ConfigError(
                f"--set {dotted}={value!r}: {dotted} is a section, not a value; set its keys one by one, "
                f"e.g. --set {dotted}.{dataclasses.fields(fields[last])[0].name}=..."
            )
    node = values
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[last] = value


def _finite(v: float) -> bool:
    return math.isfinite(v)


RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "eval_every": (lambda v: v >= 1, "an integer >= 1 (epochs)"),
    "log_every": (lambda v: v >= 1, "an integer >= 1 (steps)"),
    "save_every": (lambda v: v >= 0, "an integer >= 0 (steps; 0 = only at epoch ends)"),
    "conflict_every": (lambda v: v >= 0, "an integer >= 0 (steps; 0 = off)"),
    "data.n_train": (lambda v: v is None or v >= 2, "null or an integer >= 2"),
    "data.n_test": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "data.seed": (lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "data.batch_size": (lambda v: v >= 2, "an integer >= 2 (batch statistics need 2 samples)"),
    "data.eval_batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "model.width": (lambda v: v >= 1, "an integer >= 1"),
    "model.hidden": (lambda v: v >= 1, "an integer >= 1"),
    "model.levels": (lambda v: v >= 1, "an integer >= 1"),
    "model.max_width": (lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "optim.lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "optim.weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "optim.momentum": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.norm_lr_mult": (lambda v: v is None or (_finite(v) and v >= 0), "null or a finite number >= 0"),
    "optim.layernorm_lr_mult": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "optim.step_size": (lambda v: v >= 1, "an integer >= 1 (epochs)"),
    "optim.gamma": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
}
"""Every numeric config key and its valid range: one table that :func:`validate` applies and the
docs list (docs/training.md, "Refused up front")."""


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    """Range checks (:data:`RANGES`) and cross-field checks that a type alone cannot express."""
    for key, (ok, valid) in RANGES.items():
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}: {value!r} is out of range; expected {valid}")
    for task, weight in cfg.loss_weights.items():
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not ok or not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"loss_weights.{task}: expected a finite non-negative number, got {weight!r}")
        cfg.loss_weights[task] = float(weight)
    if not (cfg.device in ("cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device: {cfg.device!r} is not one of 'cpu', 'cuda', 'cuda:N', 'mps'")
    validate_names(method=cfg.method, balancer=cfg.balancer)


def validate_names(
    method: str | Sequence[str] | None = None,
    balancer: str | None = None,
    baseline: str | None = None,
) -> None:
    """Check method, balancer and baseline names before anything is built or trained."""
    from mtnorm import balance
    from mtnorm.models import available_methods

    methods = available_methods()
    names = [method] if isinstance(method, str) else list(method or [])
    for name in names + ([baseline] if baseline is not None else []):
        if name not in methods:
            close = difflib.get_close_matches(name, list(methods), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            which = "baseline" if name == baseline and name not in names else "method"
            raise ConfigError(f"{which}: unknown method {name!r}{hint}; choose one of {sorted(methods)}")
    if balancer is not None and balancer not in balance.available():
        known = balance.available()
        close = difflib.get_close_matches(balancer, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"balancer: unknown balancing method {balancer!r}{hint}; choose one of {known}")


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=0.01", "epochs=3"]`` -> dotted overrides with YAML-typed values."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. optim.lr=0.01), got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            reason = str(e).splitlines()[0]
            raise ConfigError(f"--set {key.strip()}: {value!r} is not valid YAML ({reason})") from None
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict (what checkpoints and results store)."""
    return dataclasses.asdict(cfg)
