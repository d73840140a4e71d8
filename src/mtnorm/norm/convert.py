"""``mtnorm.convert``: turn any model's normalization layers into task-specific ones.

Every normalization module of a registered class (:mod:`mtnorm.norm.registry`: torch's batch,
layer and RMS norms, torchvision's and timm's norm classes, transformers' RMSNorm family) becomes
its task-specific version; convolutions, linears and everything else stay shared. Pretrained
parameters and running statistics are copied into every task's slot.

Loading a checkpoint of the *unconverted* model: build the unconverted model, ``load_state_dict``
it, then ``convert`` — conversion copies the loaded values into every task (this is how pretrained
backbones are used). A checkpoint of a *converted* model loads into a model converted the same way.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mtnorm.norm.adaptive import AdaINBatchNorm, DynamicWeightedBatchNorm
from mtnorm.norm.batchnorm import TaskBatchNorm, TaskNorm, TaskSigmoidBatchNorm
from mtnorm.norm.layernorm import TaskLayerNorm, TaskSigmoidLayerNorm
from mtnorm.norm.registry import ConvertContext, Skip, load_thirdparty, looks_like_norm, qualname, resolve
from mtnorm.norm.rmsnorm import TaskRMSNorm, TaskSigmoidRMSNorm
from mtnorm.norm.routing import TaskRouted, validate_tasks

NORMS = ("bn", "sigma", "dw", "adain")
"""The kinds ``convert`` accepts: TSBN, TSσBN, DW-BN, AdaIN-BN."""

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


@dataclass
class ConvertReport:
    """What :func:`convert` did, one line per class (``str(report)``); kept on the model as
    ``model.mtnorm_report``."""

    converted: Counter = field(default_factory=Counter)  # (old class, new class) -> count
    shared: Counter = field(default_factory=Counter)  # (old class, reason) -> count
    clamped: list[tuple[str, int, int]] = field(default_factory=list)
    dropped_bias: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {n} x {old} -> {new}" for (old, new), n in sorted(self.converted.items())]
        lines += [f"left shared {n} x {old} ({why})" for (old, why), n in sorted(self.shared.items())]
        return "\n".join(lines) or "nothing to convert"


def _factory(ref: torch.Tensor | None) -> dict[str, Any]:
    return {"device": None if ref is None else ref.device, "dtype": None if ref is None else ref.dtype}


def batch_norm_like(old: nn.Module, ctx: ConvertContext, spatial_dims: int | None) -> TaskNorm:
    """The task batch norm of kind ``ctx.norm`` for a ``BatchNorm``-like module, values copied."""
    tasks, norm, name = ctx.tasks, ctx.norm, ctx.name or "<root>"
    ref = old.weight if old.weight is not None else old.running_mean
    common = {"eps": old.eps, "momentum": old.momentum, "spatial_dims": spatial_dims, **_factory(ref)}
    t = len(tasks)
    if norm == "sigma":
        new: TaskNorm = TaskSigmoidBatchNorm(
            old.num_features, tasks, shift=bool(ctx.shift),
            track_running_stats=old.track_running_stats, share_stats=ctx.share_stats,
            **common, **ctx.norm_kwargs,
        )
    elif norm == "bn":
        new = TaskBatchNorm(
            old.num_features, tasks, affine=old.affine,
            track_running_stats=old.track_running_stats, share_stats=ctx.share_stats,
            **common, **ctx.norm_kwargs,
        )
    else:
        if not old.track_running_stats:
            raise ValueError(
                f"{name}: norm={norm!r} needs running statistics, but this layer was built with "
                "track_running_stats=False; use norm='bn' or 'sigma'"
            )
        if ctx.share_stats:
            raise ValueError(f"share_stats applies to norm='bn' and 'sigma', not {norm!r}")
        cls = DynamicWeightedBatchNorm if norm == "dw" else AdaINBatchNorm
        new = cls(old.num_features, tasks, affine=old.affine, **common, **ctx.norm_kwargs)

    with torch.no_grad():
        if old.track_running_stats and old.running_mean is not None:
            rows = new.running_mean.shape[0]
            new.running_mean.copy_(old.running_mean.expand(rows, -1))
            new.running_var.copy_(old.running_var.expand(rows, -1))
            new.num_batches_tracked.fill_(int(old.num_batches_tracked))
        if old.affine:
            if norm == "sigma":
                fresh = ctx.init == "scratch" or (ctx.init == "auto" and _is_fresh(old))
                if not fresh:
                    logits, clamped = inverse_sigmoid(old.weight)
                    new.gamma.copy_(logits.expand(t, -1))
                    if clamped and ctx.report is not None:
                        ctx.report.clamped.append((name, clamped, old.num_features))
                if new.beta is not None:
                    new.beta.copy_(old.bias.expand(t, -1))
                elif torch.any(old.bias != 0) and ctx.report is not None:
                    ctx.report.dropped_bias.append(name)
                new.gamma.requires_grad_(old.weight.requires_grad)
            else:
                new.weight.copy_(old.weight.expand(t, -1))
                new.bias.copy_(old.bias.expand(t, -1))
                new.weight.requires_grad_(old.weight.requires_grad)
                new.bias.requires_grad_(old.bias.requires_grad)
    return new.train(old.training)


def _gate_init(new: TaskNorm, old_weight: torch.Tensor | None, ctx: ConvertContext, old: nn.Module) -> None:
    if old_weight is None:
        return
    fresh = ctx.init == "scratch" or (ctx.init == "auto" and _is_fresh(old))
    if not fresh:
        logits, clamped = inverse_sigmoid(old_weight)
        new.gamma.copy_(logits.expand(len(ctx.tasks), *logits.shape))
        if clamped and ctx.report is not None:
            ctx.report.clamped.append((ctx.name or "<root>", clamped, old_weight.numel()))


def layer_norm_like(old: nn.Module, ctx: ConvertContext) -> TaskNorm:
    """The task layer norm (σLN for ``norm="sigma"``) for a ``LayerNorm``-like module."""
    weight, bias = getattr(old, "weight", None), getattr(old, "bias", None)
    factory = _factory(weight)
    t = len(ctx.tasks)
    has_bias = bias is not None
    if ctx.norm == "sigma":
        use_shift = has_bias if ctx.shift is None else ctx.shift
        new: TaskNorm = TaskSigmoidLayerNorm(
            old.normalized_shape, ctx.tasks, eps=old.eps, shift=use_shift, **factory
        )
        with torch.no_grad():
            _gate_init(new, weight, ctx, old)
            if new.beta is not None and has_bias:
                new.beta.copy_(bias.expand(t, *bias.shape))
            elif has_bias and torch.any(bias != 0) and ctx.report is not None:
                ctx.report.dropped_bias.append(ctx.name or "<root>")
        return new.train(old.training)
    new = TaskLayerNorm(
        old.normalized_shape, ctx.tasks, eps=old.eps,
        elementwise_affine=weight is not None, bias=has_bias, **factory,
    )
    with torch.no_grad():
        if weight is not None:
            new.weight.copy_(weight.expand(t, *weight.shape))
        if has_bias:
            new.bias.copy_(bias.expand(t, *bias.shape))
    return new.train(old.training)


def rms_norm_like(old: nn.Module, ctx: ConvertContext) -> TaskNorm:
    """The task RMS norm (σRMSNorm for ``norm="sigma"``) for an ``RMSNorm``-like module: torch's
    and timm's (``normalized_shape``, ``eps``) or transformers' (``weight``, ``variance_epsilon``)."""
    weight = getattr(old, "weight", None)
    shape = getattr(old, "normalized_shape", None) or tuple(weight.shape)
    eps = getattr(old, "eps", getattr(old, "variance_epsilon", None))
    factory = _factory(weight)
    if ctx.norm == "sigma":
        new: TaskNorm = TaskSigmoidRMSNorm(shape, ctx.tasks, eps=eps, **factory)
        with torch.no_grad():
            _gate_init(new, weight, ctx, old)
        return new.train(old.training)
    new = TaskRMSNorm(shape, ctx.tasks, eps=eps, elementwise_affine=weight is not None, **factory)
    if weight is not None:
        with torch.no_grad():
            new.weight.copy_(weight.expand(len(ctx.tasks), *weight.shape))
    return new.train(old.training)


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
            returned). Children are replaced in place; a module reachable under several names
            becomes one task module, tied in every place.
        tasks: the task names (a list or tuple of non-empty, distinct strings).
        norm: ``"bn"`` (TSBN), ``"sigma"`` (TSσBN / σLN / σRMSNorm), ``"dw"`` (DW-BN), ``"adain"``
            (AdaIN-BN). Layer and RMS norms become their gated version for ``"sigma"`` and their
            task version otherwise.
        share_stats: keep one running estimate shared by all tasks; only the affine part is
            task-specific (``"bn"`` and ``"sigma"``).
        shift: for ``"sigma"``, whether gates get a per-task shift ``beta``. ``None`` follows the
            paper for batch norms (no shift; a non-zero pretrained bias that is dropped is warned
            about) and keeps the shift where a LayerNorm has a bias.
        init: how ``"sigma"`` initializes ``gamma``: ``"scratch"`` gives 0 (gate 0.5, the paper's
            from-scratch choice), ``"pretrained"`` gives ``logit(weight)`` (see
            :func:`inverse_sigmoid` for scales outside (0, 1)), and ``"auto"`` picks scratch for
            layers that still hold their initial values and pretrained otherwise.
        layernorm: also convert layer and RMS norms.
        norm_kwargs: extra keyword arguments for the new batch-norm layers (e.g.
            ``{"self_weight": 0.8}`` for DW-BN, ``{"in_weight": 0.2}`` for AdaIN-BN).

    Which classes: see :mod:`mtnorm.norm.registry` (add one with :func:`mtnorm.register_norm`).
    What was converted and what was left shared is in ``model.mtnorm_report`` (one line per
    class); norm-like modules left shared are also warned about in one warning. A model in which
    nothing could be converted is an error that names the norm-like classes it saw.

    Guarantee: with ``norm="bn"`` every task of the converted model computes exactly what the
    original model computed, in eval mode.
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
    load_thirdparty()
    report = ConvertReport()
    base = ConvertContext(
        names, norm, share_stats=share_stats, shift=shift, init=init, layernorm=layernorm,
        norm_kwargs=dict(norm_kwargs or {}), report=report,
    )
    done: dict[int, nn.Module | None] = {}  # id(original) -> its replacement (None: kept)

    def replace(module: nn.Module, name: str) -> nn.Module | None:
        if id(module) in done:
            return done[id(module)]
        converter, reason = resolve(module)
        new = None
        if converter is not None:
            ctx = ConvertContext(**{**base.__dict__, "name": name or "<root>"})
            try:
                new = converter(module, ctx)
            except Skip as why:
                reason = str(why)
        if new is None:
            if reason:
                report.shared[(qualname(type(module)), reason)] += 1
        else:
            new.train(module.training)
            report.converted[(qualname(type(module)), type(new).__name__)] += 1
        done[id(module)] = new
        return new

    def walk(module: nn.Module, prefix: str) -> None:
        # _modules, not named_children(): the latter skips a module's second name, and an aliased
        # norm must be replaced under every name it has
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            full = f"{prefix}.{child_name}" if prefix else child_name
            seen = id(child) in done
            new = replace(child, full)
            if new is not None:
                setattr(module, child_name, new)
            elif not seen:
                walk(child, full)

    root = replace(model, "")
    if root is None:
        walk(model, "")
    else:
        model = root
    if not report.converted:
        seen = sorted({qualname(type(m)) for m in model.modules() if looks_like_norm(m)})
        listed = ", ".join(seen) if seen else "none"
        raise ValueError(
            f"mtnorm.convert found no normalization layer it can convert (norm-like classes seen: "
            f"{listed}). Register a class with mtnorm.register_norm(cls, converter), e.g. "
            "mtnorm.register_norm(MyNorm, mtnorm.norm.registry.batch_norm_converter(2)) "
            "(docs/norm.md); "
            + "; ".join(f"{old}: {why}" for (old, why) in sorted(report.shared))
        )
    model.mtnorm_report = report
    _warn(report, norm)
    return model


def _warn(report: ConvertReport, norm: str) -> None:
    if report.shared:
        lines = [f"{n} x {old} ({why})" for (old, why), n in sorted(report.shared.items())]
        warnings.warn(
            "mtnorm.convert left these normalization layers shared: " + "; ".join(lines)
            + ". Register a converter with mtnorm.register_norm to make them task-specific",
            stacklevel=3,
        )
    if report.clamped:
        detail = ", ".join(f"{n} ({c}/{f})" for n, c, f in report.clamped)
        warnings.warn(
            f"norm={norm!r}: pretrained scales outside (0, 1) were clamped into "
            f"[{SIGMOID_CLAMP}, {1 - SIGMOID_CLAMP}] before the inverse sigmoid: {detail}",
            stacklevel=3,
        )
    if report.dropped_bias:
        warnings.warn(
            "norm='sigma' without shift drops these layers' non-zero pretrained bias; pass "
            "shift=True to keep it: " + ", ".join(report.dropped_bias),
            stacklevel=3,
        )
