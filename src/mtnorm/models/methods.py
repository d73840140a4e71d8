"""Multi-task methods as one registry: every method turns (backbone, heads) into an ``nn.Module``.

All methods share one code path downstream: the trainer calls ``mtnorm.forward_tasks(model, x)``
and gets ``{task: output}``, whatever the method. A method is a function

    build(backbone_factory, tasks, heads, **options) -> nn.Module

where ``backbone_factory(norm_kind)`` returns a fresh encoder whose norms are of that kind (see
:func:`~mtnorm.models.factory.norm_layer`) and ``heads`` maps each task to a fresh head. Later
architectures (Cross-Stitch, MTAN, MMoE, ...) join with ``@register_method("name")``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from mtnorm.norm import PerTask, TaskHeads, TaskRouted, convert, validate_tasks


class BackboneFactory(Protocol):
    def __call__(self, norm: str) -> nn.Module: ...


MethodBuilder = Callable[..., nn.Module]
_METHODS: dict[str, MethodBuilder] = {}
_DESCRIPTIONS: dict[str, str] = {}
_NEEDS_EXAMPLE: set[str] = set()


def register_method(
    name: str, description: str = "", *, needs_example_input: bool = False
) -> Callable[[MethodBuilder], MethodBuilder]:
    """Decorator adding a builder to the registry under ``name`` (lower case, unique).

    ``needs_example_input=True``: the builder sizes its modules from the backbone's stage shapes
    and takes a keyword ``example_input`` (a small batch of inputs), which :func:`build_method`
    requires and passes on.
    """

    def add(fn: MethodBuilder) -> MethodBuilder:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = fn
        _DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        if needs_example_input:
            _NEEDS_EXAMPLE.add(name)
        return fn

    return add


def _load_architectures() -> None:
    """Register the architectures of :mod:`mtnorm.arch` (they import this module, so not at the top)."""
    import mtnorm.arch  # noqa: F401


def available_methods() -> dict[str, str]:
    """``{name: one-line description}`` of every registered method."""
    _load_architectures()
    return dict(_DESCRIPTIONS)


class UnknownMethodError(KeyError):
    """A method name that is not in the registry; the message lists the valid ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def build_method(
    name: str,
    backbone_factory: BackboneFactory,
    tasks: Sequence[str],
    heads: Mapping[str, nn.Module],
    *,
    example_input: torch.Tensor | None = None,
    **options: Any,
) -> nn.Module:
    """Build method ``name`` on a backbone and per-task heads.

    The result runs through :func:`mtnorm.forward_tasks`; its task-specific parameters are those
    of :func:`mtnorm.task_parameters` (the heads and task norms; for STL, everything).
    ``example_input`` (a small batch, e.g. two training inputs) sizes the modules of the
    architectures that sit between backbone stages (Cross-Stitch, MTAN, ...); others ignore it.
    """
    _load_architectures()
    if name not in _METHODS:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of {sorted(_METHODS)}")
    tasks = validate_tasks(tasks)
    missing = [t for t in tasks if t not in heads]
    if missing:
        raise ValueError(f"no head for tasks {missing}; heads were given for {list(heads)}")
    if name in _NEEDS_EXAMPLE:
        if example_input is None:
            raise ValueError(
                f"method {name!r} sizes its modules from the backbone's stage outputs: pass "
                "example_input=<a batch of two inputs> to build_method"
            )
        options["example_input"] = example_input
    return _METHODS[name](backbone_factory, tasks, {t: heads[t] for t in tasks}, **options)


class MultiTaskNet(nn.Module):
    """A shared encoder followed by :class:`mtnorm.TaskHeads`."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = TaskHeads(dict(heads))

    def forward(self, x: torch.Tensor) -> PerTask:
        return self.heads(self.encoder(x))


class SingleTaskNets(TaskRouted):
    """STL: one independent encoder + head per task, behind the same interface as the others.

    It is routed like a head (so ``use_task`` runs one network), and being a routed module makes
    every parameter task-specific: nothing is shared, so no balancer has anything to combine.
    """

    def __init__(self, nets: Mapping[str, nn.Module]) -> None:
        super().__init__(list(nets))
        self.nets = nn.ModuleDict(nets)

    def forward(self, x: torch.Tensor) -> PerTask:
        if self.route is None:
            return PerTask({t: self.nets[t](x) for t in self.tasks})
        task = self.tasks[self.route]
        return PerTask({task: self.nets[task](x)})


@register_method("stl", "single-task learning: one network per task")
def _stl(backbone_factory: BackboneFactory, tasks: tuple[str, ...], heads: dict[str, nn.Module]) -> nn.Module:
    return SingleTaskNets({t: nn.Sequential(backbone_factory("bn"), heads[t]) for t in tasks})


@register_method("hps", "hard parameter sharing: one shared encoder pass, one head per task")
def _hps(backbone_factory: BackboneFactory, tasks: tuple[str, ...], heads: dict[str, nn.Module]) -> nn.Module:
    return MultiTaskNet(backbone_factory("bn"), heads)


def _shared_norm(kind: str) -> MethodBuilder:
    def build(
        backbone_factory: BackboneFactory, tasks: tuple[str, ...], heads: dict[str, nn.Module]
    ) -> nn.Module:
        return MultiTaskNet(backbone_factory(kind), heads)

    return build


register_method("ln", "hard sharing with shared LayerNorm instead of BatchNorm (AdaBN baseline)")(
    _shared_norm("ln")
)
register_method("gn", "hard sharing with shared GroupNorm instead of BatchNorm (AdaBN baseline)")(
    _shared_norm("gn")
)


def _task_norm(kind: str) -> MethodBuilder:
    def build(
        backbone_factory: BackboneFactory,
        tasks: tuple[str, ...],
        heads: dict[str, nn.Module],
        **convert_options: Any,
    ) -> nn.Module:
        # only the shared encoder is converted: heads are per task already
        encoder = convert(backbone_factory("bn"), tasks, norm=kind, **convert_options)
        return MultiTaskNet(encoder, heads)

    return build


for _name, _kind, _text in (
    ("tsbn", "bn", "task-specific BatchNorm (TSBN)"),
    ("tssbn", "sigma", "task-specific sigmoid BatchNorm (TSσBN)"),
    ("dwbn", "dw", "dynamic-weighted BatchNorm (DW-BN, AdaBN paper)"),
    ("adain", "adain", "AdaIN-BN (AdaBN paper)"),
):
    register_method(_name, _text)(_task_norm(_kind))

DEFAULT_NORM_LR_MULT: dict[str, float] = {"tssbn": 100.0}
"""α per method when the config leaves it unset: the paper's 100 for TSσBN, 1 for the rest."""


def default_norm_lr_mult(method: str, method_kwargs: Mapping[str, Any] | None = None) -> float:
    """The learning-rate multiplier α of the task-specific norm parameters for ``method``.

    An architecture whose shared BatchNorms are converted to TSσBN (``method_kwargs`` holding
    ``norm: sigma``, e.g. MTAN + TSσBN) gets TSσBN's α too.
    """
    if method_kwargs and method_kwargs.get("norm") == "sigma":
        return DEFAULT_NORM_LR_MULT["tssbn"]
    return DEFAULT_NORM_LR_MULT.get(method, 1.0)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
