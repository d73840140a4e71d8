"""The norm-converter registry: which normalization classes ``convert`` makes task-specific, and how.

One table, read by :func:`mtnorm.convert` (what to replace and with what), :func:`mtnorm.extract`
(task modules rebuild the class the model had), and :func:`mtnorm.param_groups` (which shared
modules are norms). Adding a class is one call::

    mtnorm.register_norm(MyNorm, mtnorm.norm.registry.batch_norm_converter(spatial_dims=2))

Resolution (:func:`resolve`): the exact class first; then its bases in MRO order, where a base
counts only if the subclass does not override ``forward`` (a subclass that computes something else
is never silently treated as its base: it is reported as left shared); then recognizers for classes
identified by shape rather than by type (transformers' RMSNorm family, checked numerically).

Third-party converters (torchvision, timm, transformers) are registered at ``convert`` time, and
only for packages the process has already imported: a model built from them has imported them, and
mtnorm never imports or requires them itself.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Converter = Callable[[nn.Module, "ConvertContext"], nn.Module]


@dataclass
class ConvertContext:
    """What a converter needs besides the module: the options of this ``convert`` call."""

    tasks: tuple[str, ...]
    norm: str
    share_stats: bool = False
    shift: bool | None = None
    init: str = "auto"
    layernorm: bool = True
    norm_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    report: Any = None  # ConvertReport


class Skip(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a converter to leave a module shared; the message is the reason reported."""


_REGISTRY: dict[type, Converter] = {}
_RECOGNIZERS: list[tuple[Callable[[nn.Module], bool], Converter]] = []
_LOADED: set[str] = set()


def register_norm(cls: type, converter: Converter) -> None:
    """Make ``convert`` replace every ``cls`` module with ``converter(module, ctx)``.

    ``converter`` returns the task-specific module (a :class:`~mtnorm.norm.batchnorm.TaskNorm`, or a
    :class:`~mtnorm.norm.wrappers.TaskNormWrapper` around one) and raises :class:`Skip` to leave a
    module shared. The built-in converters below cover the usual cases::

        register_norm(MyBN, batch_norm_converter(spatial_dims=2))
        register_norm(MyLN, layer_norm_converter(channels_first=True))
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_norm expects an nn.Module subclass, got {cls!r}")
    if not callable(converter):
        raise TypeError(f"converter must be callable (module, ctx) -> nn.Module, got {converter!r}")
    _REGISTRY[cls] = converter


def register_recognizer(predicate: Callable[[nn.Module], bool], converter: Converter) -> None:
    """Like :func:`register_norm`, for classes recognized by ``predicate(module)`` (no import)."""
    _RECOGNIZERS.append((predicate, converter))


def registered() -> list[str]:
    """Qualified names of the registered classes (after loading the imported libraries')."""
    load_thirdparty()
    return sorted(qualname(c) for c in _REGISTRY)


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve(module: nn.Module) -> tuple[Converter | None, str]:
    """The converter for ``module`` and, when there is none, why (for the report)."""
    kind = type(module)
    if kind in _REGISTRY:
        return _REGISTRY[kind], ""
    for base in kind.__mro__[1:]:
        if base in _REGISTRY:
            if kind.forward is base.forward:
                return _REGISTRY[base], ""
            return None, f"subclass of {qualname(base)} with its own forward"
    for predicate, converter in _RECOGNIZERS:
        if predicate(module):
            return converter, ""
    if looks_like_norm(module):
        return None, "not registered"
    return None, ""


def looks_like_norm(module: nn.Module) -> bool:
    """Norm-like by buffers, or by name together with an epsilon (so containers such as
    ``Conv2dNormActivation`` are not mistaken for norms): reported when left shared, never
    converted by guess."""
    if isinstance(getattr(module, "running_mean", None), torch.Tensor):
        return True
    has_eps = any(isinstance(getattr(module, a, None), float) for a in ("eps", "variance_epsilon"))
    return "Norm" in type(module).__name__ and has_eps


def is_norm(module: nn.Module) -> bool:
    """A (shared) normalization module: registered, recognized, or norm-like."""
    load_thirdparty()
    return resolve(module)[0] is not None or looks_like_norm(module)


# --------------------------------------------------------------------------- built-in converters


def batch_norm_converter(spatial_dims: int | None = None, frozen: bool = False) -> Converter:
    """For ``nn.BatchNorm{1,2,3}d``-like classes (``num_features, eps, momentum, affine,
    track_running_stats`` and the usual parameters and buffers). ``frozen``: the class always
    normalizes with its running statistics (``FrozenBatchNorm2d``)."""

    def convert(module: nn.Module, ctx: ConvertContext) -> nn.Module:
        from mtnorm.norm.convert import batch_norm_like

        new = batch_norm_like(_as_batch_norm(module) if frozen else module, ctx, spatial_dims)
        if frozen:
            new.frozen_stats = True
        return _with_template(new, module)

    return convert


def norm_act_converter(
    family: str, spatial_dims: int | None = None, channels_first: bool = False
) -> Converter:
    """For norm + dropout + activation modules (timm's ``BatchNormAct2d``, ``LayerNormAct``): the
    norm part becomes task-specific, ``drop`` and ``act`` stay shared."""

    def convert(module: nn.Module, ctx: ConvertContext) -> nn.Module:
        from mtnorm.norm.convert import batch_norm_like, layer_norm_like
        from mtnorm.norm.wrappers import TaskNormWrapper

        if family == "batch":
            norm = batch_norm_like(module, ctx, spatial_dims)
        else:
            if not ctx.layernorm:
                raise Skip("layernorm=False")
            norm = layer_norm_like(module, ctx)
        return TaskNormWrapper(
            norm, module, channels_first=channels_first,
            drop=getattr(module, "drop", None), act=getattr(module, "act", None),
        )

    return convert


def _feature_norm_converter(kind: str, channels_first: bool, exact_type: bool) -> Converter:
    """Layer and RMS norms alike: the task norm itself for torch's own class, else a wrapper that
    keeps the original (for extract) and, for ``channels_first``, the permutation around it."""

    def convert(module: nn.Module, ctx: ConvertContext) -> nn.Module:
        from mtnorm.norm.convert import layer_norm_like, rms_norm_like
        from mtnorm.norm.wrappers import TaskNormWrapper

        if not ctx.layernorm:
            raise Skip("layernorm=False")
        norm = (layer_norm_like if kind == "layer" else rms_norm_like)(module, ctx)
        if exact_type and not channels_first:
            return norm
        return TaskNormWrapper(norm, module, channels_first=channels_first)

    return convert


def layer_norm_converter(channels_first: bool = False, exact_type: bool = False) -> Converter:
    """For ``nn.LayerNorm``-like classes (``normalized_shape, eps, weight, bias``);
    ``channels_first``: the class normalizes dim 1 of ``[N, C, *S]`` (``LayerNorm2d``)."""
    return _feature_norm_converter("layer", channels_first, exact_type)


def rms_norm_converter(channels_first: bool = False, exact_type: bool = False) -> Converter:
    """For RMSNorm-like classes: ``nn.RMSNorm`` (``normalized_shape, eps, weight``), timm's
    ``RmsNorm``, and modules with ``weight`` + ``variance_epsilon`` (transformers)."""
    return _feature_norm_converter("rms", channels_first, exact_type)


def _with_template(new: nn.Module, module: nn.Module) -> nn.Module:
    """Remember the original class when it is not torch's own, so extract can rebuild it."""
    if type(module).__module__.split(".")[0] != "torch":
        import copy

        object.__setattr__(new, "_mtnorm_template", copy.deepcopy(module))
    return new


def _as_batch_norm(module: nn.Module) -> nn.BatchNorm2d:
    """A ``BatchNorm2d`` holding a frozen batch norm's values (its buffers become parameters)."""
    bn = nn.BatchNorm2d(
        module.weight.shape[0], eps=module.eps, device=module.weight.device, dtype=module.weight.dtype
    )
    with torch.no_grad():
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, key).copy_(getattr(module, key))
        bn.num_batches_tracked.fill_(1)  # holds trained statistics: not "fresh"
    return bn.train(module.training)


# --------------------------------------------------------------------------- the built-in table


def _register_torch() -> None:
    for cls, dims in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)):
        register_norm(cls, batch_norm_converter(dims))
    register_norm(nn.SyncBatchNorm, batch_norm_converter(None))
    register_norm(nn.LayerNorm, layer_norm_converter(exact_type=True))
    if hasattr(nn, "RMSNorm"):
        register_norm(nn.RMSNorm, rms_norm_converter(exact_type=True))


def _register_torchvision() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    register_norm(FrozenBatchNorm2d, batch_norm_converter(2, frozen=True))
    try:
        from torchvision.models.convnext import LayerNorm2d
    except ImportError:
        return
    register_norm(LayerNorm2d, layer_norm_converter(channels_first=True))


def _register_timm() -> None:
    from timm.layers import norm as tn
    from timm.layers import norm_act as na

    table: list[tuple[str, Any, Converter]] = [
        ("BatchNormAct2d", na, norm_act_converter("batch", 2)),
        ("SyncBatchNormAct", na, norm_act_converter("batch", None)),
        ("LayerNormAct", na, norm_act_converter("layer")),
        ("LayerNormAct2d", na, norm_act_converter("layer", channels_first=True)),
        ("FrozenBatchNorm2d", na, batch_norm_converter(2, frozen=True)),
        ("LayerNorm", tn, layer_norm_converter()),
        ("LayerNorm2d", tn, layer_norm_converter(channels_first=True)),
        ("RmsNorm", tn, rms_norm_converter()),
        ("RmsNorm2d", tn, rms_norm_converter(channels_first=True)),
    ]
    for name, where, converter in table:
        cls = getattr(where, name, None)
        if isinstance(cls, type):
            register_norm(cls, converter)


def _transformers_rms_like(module: nn.Module) -> bool:
    """transformers' RMSNorm family (LlamaRMSNorm, T5LayerNorm, ...): recognized by shape —
    a 1-D ``weight`` and a ``variance_epsilon`` — then confirmed numerically by the converter."""
    name = type(module).__name__
    return (
        type(module).__module__.startswith("transformers.")
        and (name.endswith("RMSNorm") or name.endswith("RmsNorm") or name == "T5LayerNorm")
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _checked_rms(module: nn.Module, ctx: ConvertContext) -> nn.Module:
    """Convert a recognized RMSNorm-like module only if an exact task copy reproduces it."""
    from mtnorm.norm.convert import rms_norm_like
    from mtnorm.norm.wrappers import TaskNormWrapper

    if not ctx.layernorm:
        raise Skip("layernorm=False")
    probe_ctx = ConvertContext(tasks=ctx.tasks[:1], norm="bn", report=None, name=ctx.name)
    exact = rms_norm_like(module, probe_ctx)
    w = module.weight
    x = torch.randn(2, 3, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        exact.route = 0
        same = torch.allclose(exact(x), module(x), rtol=1e-4, atol=1e-5)
    if not same:
        raise Skip("recognized as RMSNorm-like, but a task copy does not reproduce its output")
    return TaskNormWrapper(rms_norm_like(module, ctx), module)


_THIRDPARTY: dict[str, Callable[[], None]] = {
    "torchvision": _register_torchvision,
    "timm": _register_timm,
}


def load_thirdparty() -> None:
    """Register the converters of every supported library this process has already imported."""
    for package, register in _THIRDPARTY.items():
        if package not in _LOADED and package in sys.modules:
            _LOADED.add(package)
            # an old release without these classes has nothing to register
            with contextlib.suppress(ImportError):
                register()


_register_torch()
register_recognizer(_transformers_rms_like, _checked_rms)
