"""CGC and PLE (Tang et al., "Progressive layered extraction (PLE): a novel multi-task learning
(MTL) model for personalized recommendations", RecSys 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtnorm.arch.base import Architecture, TaskModules, active_tasks, convert_shared
from mtnorm.arch.experts import (
    GateFeatures,
    SoftmaxGate,
    StageSlice,
    check_count,
    combine,
    example_carries,
    level_bounds,
    parse_options,
    stage_count_error,
)
from mtnorm.arch.stages import stage_shapes, stages_of
from mtnorm.models.methods import BackboneFactory, register_method
from mtnorm.norm.routing import PerTask, TaskHeads

PLE_DEFAULTS: dict[str, Any] = {
    "levels": 2,
    "shared_experts": 1,
    "task_experts": 1,
    "gate_input": "flatten",
    "gate_pool": 4,
    "norm": None,
}
"""Options of ``ple`` (``method_kwargs``); ``cgc`` takes the same but ``levels`` (always 1)."""

CGC_DEFAULTS: dict[str, Any] = {k: v for k, v in PLE_DEFAULTS.items() if k != "levels"}


class ExtractionLevel(nn.Module):
    """One extraction level: shared experts, every task's experts, task gates, a shared gate.

    The containers say who owns what (see :class:`PLE`): ``task_experts`` and ``task_gates`` are
    a :class:`~mtnorm.arch.base.TaskModules` when only their task's loss reaches them, a plain
    ``nn.ModuleDict`` (shared) otherwise; ``shared_gate`` is ``None`` at the last level.
    """

    def __init__(
        self,
        shared_experts: Sequence[nn.Module],
        task_experts: Mapping[str, Sequence[nn.Module]],
        task_gates: Mapping[str, nn.Module],
        shared_gate: nn.Module | None,
        experts_task_specific: bool,
        gates_task_specific: bool,
    ) -> None:
        super().__init__()
        self.shared_experts = nn.ModuleList(shared_experts)
        own = {t: nn.ModuleList(e) for t, e in task_experts.items()}
        self.task_experts = TaskModules(own) if experts_task_specific else nn.ModuleDict(own)
        self.task_gates = TaskModules(task_gates) if gates_task_specific else nn.ModuleDict(task_gates)
        self.shared_gate = shared_gate


class PLE(Architecture):
    """Progressive layered extraction: CGC levels stacked along the backbone's stages.

    The backbone's stages are split into ``L`` consecutive groups (``levels``; 7 SegNet stages in
    2 levels: stem + encoder | decoder). Level l has ``S`` shared experts ``f^l_s`` and ``K``
    experts ``f^l_{t,k}`` per task, each a fresh copy of the level's stages
    (:class:`~mtnorm.arch.experts.StageSlice`). With ``u^l`` the shared input and ``v^l_t`` task
    t's input of level l (``u^0 = v^0_t = x``):

        v^{l+1}_t = sum_j g^l_{t,j}(v^l_t) E^l_{t,j},   E^l_t = [f^l_s(u^l)]_s ++ [f^l_{t,k}(v^l_t)]_k
        u^{l+1}   = sum_j g^l_{s,j}(u^l) A^l_j,         A^l = all S + T K experts of level l

    (task gate t mixes the shared experts and task t's own; the shared gate, at levels ``l < L-1``
    only, mixes every expert), gates softmax over a linear map of ``phi`` of their level's input,
    and ``y_t = head_t(v^L_t)``. Each expert slot is a column through the levels: the state a
    stage hands on (SegNet's pooling indices) travels from slot (t, k) of level l to slot (t, k)
    of level l+1, while the features are mixed.

    Parameter partition (which losses reach what, tested): the shared gate of level l reads every
    task's experts, so task t's experts of a level ``l < L-1`` reach every task's output through
    the next level's shared experts and are *shared* parameters; only the last level's task
    experts are task t's own. Task gate t of level l feeds task t's experts of level l+1, which are
    task t's own only if ``l + 1 = L - 1``: the task gates of the last two levels are task t's own,
    earlier ones shared. Shared experts and shared gates are shared. Task-specific parts live in
    :class:`~mtnorm.arch.base.TaskModules`; with ``norm`` set only the shared experts' norms are
    converted.

    Cost: ``S + T K`` expert copies of every stage (default ``S = K = 1``: T + 1 backbones'
    parameters and, in one all-task pass, compute). A task's pass (under ``use_task``) still
    computes every task's experts below the last level, since the shared gates read them.
    """

    def __init__(
        self, levels: Sequence[ExtractionLevel], features: GateFeatures, heads: Mapping[str, nn.Module]
    ):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.features = features
        self.heads = TaskHeads(dict(heads))

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.heads.tasks

    def forward(self, x: torch.Tensor) -> PerTask:
        active = active_tasks(self.heads)
        everyone, last = self.tasks, len(self.levels) - 1
        first = self.levels[0]
        shared_in, task_in = x, {t: x for t in everyone}
        shared_carry = [{} for _ in first.shared_experts]
        task_carry = {t: [{} for _ in first.task_experts[t]] for t in everyone}
        phi = self.features(x)
        shared_phi, task_phi = phi, {t: phi for t in everyone}
        for level_index, level in enumerate(self.levels):
            # experts of every task below the last level (the shared gate reads them), then only
            # those of the tasks to produce; gates only for the tasks the next level needs
            run = active if level_index == last else everyone
            needed = active if level_index >= last - 1 else everyone
            shared_out = [f(shared_in, c) for f, c in zip(level.shared_experts, shared_carry)]
            task_out = {
                t: [f(task_in[t], c) for f, c in zip(level.task_experts[t], task_carry[t])] for t in run
            }
            next_in = {t: combine(level.task_gates[t](task_phi[t]), shared_out + task_out[t]) for t in needed}
            if level.shared_gate is not None:
                every = shared_out + [o for t in everyone for o in task_out[t]]
                shared_in = combine(level.shared_gate(shared_phi), every)
            task_in = next_in
            if level_index < last:
                shared_phi = self.features(shared_in)
                task_phi = {t: self.features(task_in[t]) for t in needed}
        return PerTask({t: self.heads.heads[t](task_in[t]) for t in active})


class CGC(PLE):
    """Customized gate control: PLE's single level, on the whole backbone.

    ``S`` shared experts and ``K`` experts per task, each a fresh backbone; task t's gate mixes
    the shared experts and task t's own: ``y_t = head_t(sum_j g_{t,j}(x) E_{t,j})``,
    ``E_t = [f_s(x)]_s ++ [f_{t,k}(x)]_k``, ``g_t = softmax(W_t phi(x) + b_t)``. There is no
    shared gate, so task t's experts and gate are task t's own (``TaskModules``) and the shared
    experts shared. Defaults ``S = K = 1``: T + 1 backbones. ``norm`` converts the shared experts'
    norms only.
    """


def _build_levels(
    method: str,
    backbone_factory: BackboneFactory,
    tasks: Sequence[str],
    example_input: torch.Tensor,
    opts: Mapping[str, Any],
    levels: int,
) -> tuple[list[ExtractionLevel], GateFeatures]:
    # both kinds are the point of CGC / PLE: without shared experts the tasks are separate
    # networks (stl), without task experts it is MMoE over the shared ones (mmoe)
    shared_count = check_count(method, "shared_experts", opts["shared_experts"])
    task_count = check_count(method, "task_experts", opts["task_experts"])
    features = GateFeatures(opts["gate_input"], opts["gate_pool"])
    probe = backbone_factory("bn")
    if levels == 1:
        bounds, inputs = [0, None], [tuple(example_input.shape)]
        examples: list = [None]
    else:
        num_stages = len(stages_of(probe))
        if levels > num_stages:
            raise stage_count_error(method, probe, num_stages, levels)
        bounds = level_bounds(num_stages, levels)
        shapes = stage_shapes(probe, example_input)
        inputs = [tuple(example_input.shape)] + [shapes[b - 1] for b in bounds[1:-1]]
        examples = example_carries(probe, example_input, bounds[:-1])
    norm, count = opts["norm"], len(tasks)

    def expert(level: int, shared: bool) -> nn.Module:
        start, stop = bounds[level], bounds[level + 1]
        part = StageSlice(backbone_factory("bn"), start, None if levels == 1 else stop, examples[level])
        return convert_shared(part, tasks, norm) if shared else part

    built = []
    for level in range(levels):
        final = level == levels - 1
        size = features.size(inputs[level])
        built.append(
            ExtractionLevel(
                [expert(level, True) for _ in range(shared_count)],
                {t: [expert(level, not final) for _ in range(task_count)] for t in tasks},
                {t: SoftmaxGate(size, shared_count + task_count) for t in tasks},
                None if final else SoftmaxGate(size, shared_count + count * task_count),
                experts_task_specific=final,
                gates_task_specific=level >= levels - 2,
            )
        )
    return built, features


@register_method(
    "cgc",
    "customized gate control (CGC): shared + per-task experts, one gate per task",
    needs_example_input=True,
)
def build_cgc(
    backbone_factory: BackboneFactory,
    tasks: Sequence[str],
    heads: Mapping[str, nn.Module],
    *,
    example_input: torch.Tensor,
    **options: Any,
) -> CGC:
    """CGC on ``backbone_factory``'s backbones; options in :data:`CGC_DEFAULTS`."""
    opts = parse_options("cgc", options, CGC_DEFAULTS)
    levels, features = _build_levels("cgc", backbone_factory, tasks, example_input, opts, 1)
    return CGC(levels, features, heads)


@register_method(
    "ple",
    "progressive layered extraction (PLE): CGC levels along the backbone's stages",
    needs_example_input=True,
)
def build_ple(
    backbone_factory: BackboneFactory,
    tasks: Sequence[str],
    heads: Mapping[str, nn.Module],
    *,
    example_input: torch.Tensor,
    **options: Any,
) -> PLE:
    """PLE on ``backbone_factory``'s backbones; options in :data:`PLE_DEFAULTS`."""
    opts = parse_options("ple", options, PLE_DEFAULTS)
    levels = check_count("ple", "levels", opts["levels"])
    built, features = _build_levels("ple", backbone_factory, tasks, example_input, opts, levels)
    return PLE(built, features, heads)
