"""``mtnorm.convert``: turn any model's normalization layers into task-specific ones.

Every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` becomes a task batch norm of the chosen
kind and every ``nn.LayerNorm`` a task layer norm; convolutions, linears and everything else stay
shared. Pretrained parameters and running statistics are copied into every task's slot.

Loading a checkpoint of the *unconverted* model: build the unconverted model, ``load_state_dict``
it, then ``convert`` — conversion copies the loaded values into every task (this is how pretrained
backbones are used). A checkpoint of a *converted* model loads into a model converted the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mtnorm.norm.adaptive import AdaINBatchNorm, DynamicWeightedBatchNorm
from mtnorm.norm.batchnorm import TaskBatchNorm, TaskNorm, TaskSigmoidBatchNorm
from mtnorm.norm.layernorm import TaskLayerNorm, TaskSigmoidLayerNorm
from mtnorm.norm.routing import TaskRouted, validate_tasks

NORMS = ("bn", "sigma", "dw", "adain")
"""The kinds ``convert`` accepts: TSBN, TSσBN, DW-BN, AdaIN-BN."""

_BN_TYPES: dict[type, int | None] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.SyncBatchNorm: None,
}
# Norm layers that convert leaves alone but reports, so nothing is silently mishandled.
_OTHER_NORMS = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
    )
    if t is not None
)

SIGMOID_CLAMP = 1e-3
"""Pretrained scales are clamped into ``[SIGMOID_CLAMP, 1 - SIGMOID_CLAMP]`` before the logit."""


def inverse_sigmoid(weight: torch.Tensor, clamp: float = SIGMOID_CLAMP) -> tuple[torch.Tensor, int]:
    """``logit(w)`` for a pretrained scale, so that ``sigmoid(gamma)`` reproduces ``w``.

    A gate can only express scales in (0, 1). Values outside are clamped into
    ``[clamp, 1 - clamp]`` first: scales >= 1 become an almost open gate, scales <= 0 an almost
    closed one (the sign of a negative scale cannot be represented). Returns the logits and the
    number of clamped entries, which ``convert`` reports in a warning.
    """
    clamped = weight.clamp(clamp, 1.0 - clamp)
    changed = int((clamped != weight).sum())
    return torch.logit(clamped), changed


def _is_fresh(module: nn.Module) -> bool:
    """True when a norm layer still holds PyTorch's initial values (nothing pretrained to keep)."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None and not torch.all(weight == 1):
        return False
    if bias is not None and not torch.all(bias == 0):
        return False
    nbt = getattr(module, "num_batches_tracked", None)
    return nbt is None or int(nbt) == 0


def _batch_norm_like(
    old: nn.modules.batchnorm._BatchNorm,
    tasks: tuple[str, ...],
    norm: str,
    share_stats: bool,
    shift: bool | None,
    init: str,
    report: dict[str, Any],
    name: str,
    norm_kwargs: dict[str, Any],
) -> TaskNorm:
    ref = old.weight if old.weight is not None else old.running_mean
    factory = {
        "device": None if ref is None else ref.device,
        "dtype": None if ref is None else ref.dtype,
    }
    common = {
        "eps": old.eps,
        "momentum": old.momentum,
        "spatial_dims": _BN_TYPES[type(old)],
        **factory,
    }
    t = len(tasks)
    if norm == "sigma":
        new: TaskNorm = TaskSigmoidBatchNorm(
            old.num_features, tasks, shift=bool(shift),
            track_running_stats=old.track_running_stats, share_stats=share_stats,
            **common, **norm_kwargs,
        )
    elif norm == "bn":
        new = TaskBatchNorm(
            old.num_features, tasks, affine=old.affine,
            track_running_stats=old.track_running_stats, share_stats=share_stats,
            **common, **norm_kwargs,
        )
    else:
        if not old.track_running_stats:
            raise ValueError(
                f"{name}: norm={norm!r} needs running statistics, but this layer was built with "
                "track_running_stats=False; use norm='bn' or 'sigma'"
            )
        if share_stats:
            raise ValueError(f"share_stats applies to norm='bn' and 'sigma', not {norm!r}")
        cls = DynamicWeightedBatchNorm if norm == "dw" else AdaINBatchNorm
        new = cls(old.num_features, tasks, affine=old.affine, **common, **norm_kwargs)

    with torch.no_grad():
        if old.track_running_stats and old.running_mean is not None:
            rows = new.running_mean.shape[0]
            new.running_mean.copy_(old.running_mean.expand(rows, -1))
            new.running_var.copy_(old.running_var.expand(rows, -1))
            new.num_batches_tracked.fill_(int(old.num_batches_tracked))
        if old.affine:
            if norm == "sigma":
                fresh = init == "scratch" or (init == "auto" and _is_fresh(old))
                if not fresh:
                    logits, clamped = inverse_sigmoid(old.weight)
                    new.gamma.copy_(logits.expand(t, -1))
                    if clamped:
                        report["clamped"].append((name, clamped, old.num_features))
                if new.beta is not None:
                    new.beta.copy_(old.bias.expand(t, -1))
                elif torch.any(old.bias != 0):
                    report["dropped_bias"].append(name)
                new.gamma.requires_grad_(old.weight.requires_grad)
            else:
                new.weight.copy_(old.weight.expand(t, -1))
                new.bias.copy_(old.bias.expand(t, -1))
                new.weight.requires_grad_(old.weight.requires_grad)
                new.bias.requires_grad_(old.bias.requires_grad)
    return new


def _layer_norm_like(
    old: nn.LayerNorm,
    tasks: tuple[str, ...],
    norm: str,
    shift: bool | None,
    init: str,
    report: dict[str, Any],
    name: str,
) -> TaskNorm:
    ref = old.weight
    factory = {"device": None if ref is None else ref.device, "dtype": None if ref is None else ref.dtype}
    t = len(tasks)
    has_bias = old.bias is not None
    if norm == "sigma":
        use_shift = has_bias if shift is None else shift
        new: TaskNorm = TaskSigmoidLayerNorm(
            old.normalized_shape, tasks, eps=old.eps, shift=use_shift, **factory
        )
        with torch.no_grad():
            if old.weight is not None:
                fresh = init == "scratch" or (init == "auto" and _is_fresh(old))
                if not fresh:
                    logits, clamped = inverse_sigmoid(old.weight)
                    new.gamma.copy_(logits.expand(t, *logits.shape))
                    if clamped:
                        report["clamped"].append((name, clamped, old.weight.numel()))
            if new.beta is not None and has_bias:
                new.beta.copy_(old.bias.expand(t, *old.bias.shape))
            elif has_bias and torch.any(old.bias != 0):
                report["dropped_bias"].append(name)
        return new
    new = TaskLayerNorm(
        old.normalized_shape, tasks, eps=old.eps,
        elementwise_affine=old.elementwise_affine, bias=has_bias, **factory,
    )
    with torch.no_grad():
        if old.weight is not None:
            new.weight.copy_(old.weight.expand(t, *old.weight.shape))
        if has_bias:
            new.bias.copy_(old.bias.expand(t, *old.bias.shape))
    return new


def convert(
    model: nn.Module,
    tasks: Sequence[str],
    norm: str = "sigma",
    *,
    share_stats: bool = False,
    shift: bool | None = None,
    init: str = "auto",
    layernorm: bool = True,
    norm_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Replace every normalization layer of ``model`` by its task-specific version; returns the model.

    Args:
        model: any ``nn.Module``; the root itself may be a norm layer (then the new layer is
            returned). Children are replaced in place.
        tasks: the task names (non-empty, distinct strings).
        norm: ``"bn"`` (TSBN), ``"sigma"`` (TSσBN / σLN), ``"dw"`` (DW-BN), ``"adain"`` (AdaIN-BN).
            LayerNorms become :class:`TaskSigmoidLayerNorm` for ``"sigma"`` and
            :class:`TaskLayerNorm` otherwise.
        share_stats: keep one running estimate shared by all tasks; only the affine part is
            task-specific (``"bn"`` and ``"sigma"``).
        shift: for ``"sigma"``, whether gates get a per-task shift ``beta``. ``None`` follows the
            paper for batch norms (no shift; a non-zero pretrained bias that is dropped is warned
            about) and keeps the shift where a LayerNorm has a bias.
        init: how ``"sigma"`` initializes ``gamma``: ``"scratch"`` gives 0 (gate 0.5, the paper's
            from-scratch choice), ``"pretrained"`` gives ``logit(weight)`` (see
            :func:`inverse_sigmoid` for scales outside (0, 1)), and ``"auto"`` picks scratch for
            layers that still hold PyTorch's initial values and pretrained otherwise.
        layernorm: also convert ``nn.LayerNorm`` layers.
        norm_kwargs: extra keyword arguments for the new layers (e.g. ``{"self_weight": 0.8}``
            for DW-BN, ``{"in_weight": 0.2}`` for AdaIN-BN).

    Guarantee: with ``norm="bn"`` every task of the converted model computes exactly what the
    original model computed, in eval mode. Norm layers it does not convert (GroupNorm,
    InstanceNorm, subclasses of BatchNorm/LayerNorm that may add behaviour, ...) are listed in one
    warning.
    """
    names = validate_tasks(tasks)
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {list(NORMS)}")
    if init not in ("auto", "scratch", "pretrained"):
        raise ValueError(f"unknown init {init!r}; choose 'auto', 'scratch' or 'pretrained'")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, TaskNorm) for m in model.modules()):
        raise ValueError("this model already has task-specific norm layers; convert it only once")
    for m in model.modules():
        if isinstance(m, TaskRouted) and m.tasks != names:
            raise ValueError(
                f"the model's {type(m).__name__} has tasks {list(m.tasks)}, "
                f"but convert was given {list(names)}"
            )
    report: dict[str, Any] = {"skipped": [], "clamped": [], "dropped_bias": []}
    kwargs = dict(norm_kwargs or {})

    def replace(module: nn.Module, name: str) -> nn.Module | None:
        name = name or "<root>"
        kind = type(module)
        if kind in _BN_TYPES:
            new = _batch_norm_like(
                module, names, norm, share_stats, shift, init, report, name, kwargs
            )
        elif kind is nn.LayerNorm and layernorm:
            new = _layer_norm_like(module, names, norm, shift, init, report, name)
        else:
            if isinstance(module, _OTHER_NORMS) and not (kind is nn.LayerNorm and not layernorm):
                report["skipped"].append(f"{name} ({kind.__name__})")
            return None
        new.train(module.training)
        return new

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            new = replace(child, full)
            if new is None:
                walk(child, full)
            else:
                setattr(module, child_name, new)

    root = replace(model, "")
    if root is None:
        walk(model, "")
    else:
        model = root
    _warn(report, norm)
    return model


def _warn(report: dict[str, Any], norm: str) -> None:
    if report["skipped"]:
        warnings.warn(
            "mtnorm.convert left these normalization layers shared (types it does not convert; "
            "replace them with BatchNorm/LayerNorm first if they should be task-specific): "
            + ", ".join(report["skipped"]),
            stacklevel=3,
        )
    if report["clamped"]:
        detail = ", ".join(f"{n} ({c}/{f})" for n, c, f in report["clamped"])
        warnings.warn(
            f"norm={norm!r}: pretrained scales outside (0, 1) were clamped into "
            f"[{SIGMOID_CLAMP}, {1 - SIGMOID_CLAMP}] before the inverse sigmoid: {detail}",
            stacklevel=3,
        )
    if report["dropped_bias"]:
        warnings.warn(
            "norm='sigma' without shift drops these layers' non-zero pretrained bias; pass "
            "shift=True to keep it: " + ", ".join(report["dropped_bias"]),
            stacklevel=3,
        )
