"""Mixture-of-experts architectures: experts, gates, and the one combination they all share.

Every architecture of this family (:mod:`~mtnorm.arch.mmoe`, :mod:`~mtnorm.arch.ple`,
:mod:`~mtnorm.arch.dselect_k`) computes, for a task (or for PLE's shared path) t,

    y_t = sum_e g_{t,e}(x) * f_e(x),        g_t(x) in the simplex over the experts,

with experts ``f_e`` (copies of the backbone, or of a group of its stages) and a gate ``g_t`` that
reads the input ``x`` of the mixture through a parameter-free feature map ``phi``
(:class:`GateFeatures`). The members differ only in which experts a gate mixes (MMoE: all; CGC:
the shared ones and the task's own; PLE: the same at several levels) and in the gate (softmax of a
linear map, :class:`SoftmaxGate`; DSelect-k's differentiable sparse selector). :func:`combine`
is the product ``sum_e g_e f_e``; it broadcasts the ``[B, E]`` weights over expert outputs that are
vectors ``[B, C]`` (LeNet, the toy MLP) or maps ``[B, C, H, W]`` (SegNet).

Shared and task-specific parameters (what a gradient balancer combines and what it leaves to one
task, :mod:`mtnorm.arch.base`): a module lives in a :class:`~mtnorm.arch.base.TaskModules` exactly
when only one task's loss reaches it (MMoE's gates, CGC's task experts). Experts that several
tasks' outputs depend on are shared.

Task-specific normalization (option ``norm``): ``None`` keeps the backbones' BatchNorms shared;
``"bn"``, ``"sigma"`` (or ``"dw"``, ``"adain"``) converts the BatchNorms of the *shared* experts with
:func:`mtnorm.convert` (MMoE + TSσBN). The model then runs once per task inside ``use_task`` and
computes only :func:`~mtnorm.arch.base.active_tasks`. Experts that serve one task only (CGC's task
experts) are not converted: their other tasks' norm parameters would never be used.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from mtnorm.arch.base import Architecture, TaskModules, active_tasks, check_options, convert_shared
from mtnorm.arch.stages import stages_of
from mtnorm.norm.routing import PerTask, TaskHeads

GATE_INPUTS = ("flatten", "pool")
"""What a gate reads (:class:`GateFeatures`)."""

def parse_options(method: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`~mtnorm.arch.base.check_options` with the gate-input choices of the experts."""
    choices = {"gate_input": GATE_INPUTS} if "gate_input" in defaults else None
    return check_options(method, given, defaults, choices)


def check_count(method: str, option: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or a ``ValueError`` naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"method {method!r}: {option} must be an integer >= {minimum}, got {value!r}")
    return value


class GateFeatures(nn.Module):
    """``phi(x)``: the parameter-free features a gate reads, ``[B, ...] -> [B, F]``.

    * ``"flatten"``: every element of one input, ``F = x[0].numel()`` (what the MMoE paper's
      ``softmax(W x)`` and LibMTL's image gates do: 1296 features for a 36x36 MultiFashion image,
      4096 for a 64x64 scene; a linear gate over them costs ``F * E`` parameters per task, small
      beside the experts).
    * ``"pool"``: a map ``[B, C, H, W]`` average-pooled to at most ``pool x pool`` cells, then
      flattened (``F = C * min(H, pool) * min(W, pool)``): cheaper for large inputs and for PLE's
      gates on deep feature maps, at the price of a coarser view of the input.

    Vectors ``[B, C]`` are the same under both (``F = C``).
    """

    def __init__(self, mode: str = "flatten", pool: int = 4) -> None:
        super().__init__()
        if mode not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {list(GATE_INPUTS)}, got {mode!r}")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"gate_pool must be an integer >= 1, got {pool!r}")
        self.mode = mode
        self.pool = pool

    def _cells(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(min(int(s), self.pool) for s in shape[2:])

    def size(self, shape: Sequence[int]) -> int:
        """``F`` for inputs of ``shape`` (batch dimension included)."""
        if self.mode == "flatten" or len(shape) <= 2:
            return math.prod(int(s) for s in shape[1:])
        return int(shape[1]) * math.prod(self._cells(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pool" and x.dim() == 4:
            x = F.adaptive_avg_pool2d(x, self._cells(x.shape))
        elif self.mode == "pool" and x.dim() == 3:
            x = F.adaptive_avg_pool1d(x, self._cells(x.shape))
        return x.flatten(1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + (f", pool={self.pool}" if self.mode == "pool" else "")


class SoftmaxGate(nn.Module):
    """The MMoE / PLE gate: ``g(x) = softmax(W phi(x) + b)`` over ``num_experts`` experts."""

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_experts)
        self.num_experts = num_experts

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Weights ``[B, E]``: non-negative, each row sums to 1."""
        return torch.softmax(self.linear(features), dim=-1)


def combine(weights: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_e weights[:, e] * outputs[e]``: the gated mixture of expert outputs.

    ``weights`` is ``[B, E]``; every output is ``[B, ...]`` of one shape (vectors or maps), and
    the weights broadcast over the trailing dimensions.
    """
    if weights.shape[1] != len(outputs):
        raise ValueError(f"{weights.shape[1]} gate weights for {len(outputs)} expert outputs")
    stacked = torch.stack(tuple(outputs), dim=1)  # [B, E, ...]
    w = weights.reshape(*weights.shape, *([1] * (stacked.dim() - 2)))
    return (w * stacked).sum(dim=1)


# ---------------------------------------------------------------------------- stage slices


class _Pruned(nn.Module):
    """Stands where a backbone's submodule was that a :class:`StageSlice` never runs."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "this part of the backbone was removed from a StageSlice: it belongs to the stages of "
            "another extraction level"
        )


class StageSlice(nn.Module):
    """Stages ``[start, stop)`` of a backbone as an expert: ``slice(x, carry) -> x``.

    A PLE expert of level l is a fresh copy of the level's group of stages. Stages are closures
    over one backbone's submodules (:mod:`mtnorm.arch.stages`), so a slice is cut from a fresh
    backbone of its own, and it registers only the parameters its stages use:

    * an ``nn.Sequential`` backbone: the slice *is* the children of its stages, an
      ``nn.Sequential`` of them (the grouping of :func:`~mtnorm.arch.stages.sequential_groups`);
    * a backbone with ``stages()`` (SegNet, ResNet50): the backbone, with every submodule that the
      slice's stages do not call (found by forward hooks on one run of the stages on the example
      input) replaced by a parameter-free placeholder; its stages are rebuilt from it at every call
      (so copies, ``.to()`` and conversion are followed).

    Either way the cut is checked on the example input: the slice must give the output of the
    intact backbone's stages (a stage reading a submodule's parameters without calling it would
    fail here, with an error naming the backbone). State that a stage hands to later stages
    (SegNet's pooling indices) travels in ``carry``. A slice of all stages is the backbone itself,
    called as ``backbone(x)``, so any backbone (even one without stages) can be a CGC expert.
    """

    def __init__(
        self,
        backbone: nn.Module,
        start: int = 0,
        stop: int | None = None,
        example: tuple[torch.Tensor, dict] | None = None,
    ) -> None:
        super().__init__()
        self.span: tuple[int, int] | None = None
        if start == 0 and stop is None:
            self.body = backbone
            return
        if example is None:
            raise ValueError(
                "cutting stages out of a backbone needs the example (input, carry) of stage start"
            )
        x, carry = example
        reference = _run_span(backbone, start, stop, x, copy.deepcopy(carry))
        if isinstance(backbone, nn.Sequential) and not callable(getattr(backbone, "stages", None)):
            from mtnorm.arch.stages import sequential_groups

            groups = sequential_groups(backbone)[start:stop]
            self.body = nn.Sequential(*(m for group in groups for m in group))
        else:
            _prune(backbone, _called_modules(backbone, start, stop, x, copy.deepcopy(carry)))
            self.body = backbone
            self.span = (start, len(stages_of(backbone)) if stop is None else stop)
        try:
            got = self._run(x, copy.deepcopy(carry), eval_mode=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the backbone named
            raise RuntimeError(
                f"cannot cut stages [{start}, {stop}) out of a {type(backbone).__name__}: its stages "
                f"use modules they do not call ({e})"
            ) from e
        if not torch.equal(got, reference):
            raise RuntimeError(
                f"cannot cut stages [{start}, {stop}) out of a {type(backbone).__name__}: the cut "
                "stages compute something else than the intact backbone's"
            )

    def _run(self, x: torch.Tensor, carry: dict, eval_mode: bool = False) -> torch.Tensor:
        if eval_mode:
            training = self.training
            self.eval()
            try:
                with torch.no_grad():
                    return self._run(x, carry)
            finally:
                self.train(training)
        if self.span is None:
            return self.body(x)
        start, stop = self.span
        for stage in stages_of(self.body)[start:stop]:
            x = stage(x, carry)
        return x

    def forward(self, x: torch.Tensor, carry: dict | None = None) -> torch.Tensor:
        return self._run(x, {} if carry is None else carry)

    def extra_repr(self) -> str:
        return "" if self.span is None else f"stages={self.span[0]}..{self.span[1] - 1}"


def _run_span(
    backbone: nn.Module, start: int, stop: int | None, x: torch.Tensor, carry: dict
) -> torch.Tensor:
    training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for stage in stages_of(backbone)[start:stop]:
                x = stage(x, carry)
        return x
    finally:
        backbone.train(training)


def _called_modules(
    backbone: nn.Module, start: int, stop: int | None, x: torch.Tensor, carry: dict
) -> set[int]:
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: called.add(id(mod))) for m in backbone.modules()]
    try:
        _run_span(backbone, start, stop, x, carry)
    finally:
        for h in hooks:
            h.remove()
    return called


def _prune(module: nn.Module, called: set[int]) -> None:
    """Replace every submodule that was not called and holds parameters or buffers of its own by a
    placeholder; containers stay (a ``stages()`` may iterate them), emptied of such modules."""
    for name, child in list(module.named_children()):
        owns = any(True for _ in child.parameters(recurse=False)) or any(
            True for _ in child.buffers(recurse=False)
        )
        if owns and id(child) not in called:
            setattr(module, name, _Pruned())
        else:
            _prune(child, called)


def example_carries(backbone: nn.Module, example_input: torch.Tensor, bounds: Sequence[int]) -> list:
    """``(input, carry)`` of the stages at each index of ``bounds`` on ``example_input`` (eval mode,
    no gradients; the backbone's running statistics do not move)."""
    out = []
    training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            x, carry = example_input, {}
            for i, stage in enumerate(stages_of(backbone)):
                if i in bounds:
                    out.append((x, copy.deepcopy(carry)))
                x = stage(x, carry)
            if len(stages_of(backbone)) in bounds:
                out.append((x, copy.deepcopy(carry)))
    finally:
        backbone.train(training)
    return out


def level_bounds(num_stages: int, levels: int) -> list[int]:
    """Stage indices where each of ``levels`` consecutive groups starts, plus the end: the stages
    split as evenly as possible, earlier groups one stage longer (7 stages, 2 levels: 4 + 3)."""
    size, extra = divmod(num_stages, levels)
    bounds = [0]
    for level in range(levels):
        bounds.append(bounds[-1] + size + (level < extra))
    return bounds


def stage_count_error(method: str, backbone: nn.Module, num_stages: int, levels: int) -> ValueError:
    return ValueError(
        f"method {method!r}: levels={levels} is more than the {num_stages} stages of the "
        f"{type(backbone).__name__} backbone; choose levels between 1 and {num_stages} "
        "(each extraction level is a group of one or more consecutive stages)"
    )


# ---------------------------------------------------------------------------- one gate per task


class MixtureOfExperts(Architecture):
    """``E`` shared experts (full backbones) and one gate per task over all of them.

    ``y_t = head_t(sum_e g_{t,e}(x) f_e(x))``. The experts are shared parameters (every task's
    output depends on them); gate t lives in a :class:`~mtnorm.arch.base.TaskModules` (only task
    t's loss reaches it). MMoE (softmax gates) and DSelect-k (sparse selector gates) are this
    class with another gate.
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        gates: Mapping[str, nn.Module],
        features: GateFeatures,
        heads: Mapping[str, nn.Module],
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gates = TaskModules(gates)
        self.features = features
        self.heads = TaskHeads(dict(heads))

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.heads.tasks

    def gate_weights(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{task: [B, E] weights}`` of the gates on input ``x`` (default: the active tasks)."""
        phi = self.features(x)
        return {t: self.gates[t](phi) for t in (active_tasks(self.heads) if tasks is None else tasks)}

    def forward(self, x: torch.Tensor) -> PerTask:
        tasks = active_tasks(self.heads)
        outputs = [expert(x) for expert in self.experts]
        weights = self.gate_weights(x, tasks)
        return PerTask({t: self.heads.heads[t](combine(weights[t], outputs)) for t in tasks})


Mixture = TypeVar("Mixture", bound=MixtureOfExperts)


def build_mixture(
    cls: type[Mixture],
    method: str,
    backbone_factory: Callable[[str], nn.Module],
    tasks: Sequence[str],
    heads: Mapping[str, nn.Module],
    example_input: torch.Tensor,
    options: Mapping[str, Any],
    make_gate: Callable[[int, int], nn.Module],
) -> Mixture:
    """``cls`` with ``options["experts"]`` fresh backbones as experts (their norms converted when
    ``options["norm"]`` is set) and ``make_gate(in_features, num_experts)`` per task."""
    count = check_count(method, "experts", options["experts"])
    features = GateFeatures(options["gate_input"], options["gate_pool"])
    size = features.size(tuple(example_input.shape))
    experts = [convert_shared(backbone_factory("bn"), tasks, options["norm"]) for _ in range(count)]
    gates = {t: make_gate(size, count) for t in tasks}
    return cls(experts, gates, features, heads)
