"""Cross-Stitch networks (Misra et al., CVPR 2016): one backbone column per task, mixed after every stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtnorm.arch.base import (
    Architecture,
    active_tasks,
    check_heads,
    check_options,
    convert_shared,
)
from mtnorm.arch.stages import channels, stage_shapes, stages_of
from mtnorm.models.methods import BackboneFactory, register_method
from mtnorm.norm import PerTask, TaskHeads, validate_tasks
from mtnorm.norm.optim import LR_MULT


# ---------------------------------------------------------------- cross-stitch
def stitch_init(tasks: int, features: int, self_weight: float = 0.9) -> torch.Tensor:
    """``alpha[t, s, c]``: ``self_weight`` on the diagonal, ``(1 - self_weight) / (T - 1)`` elsewhere.

    Every row sums to one, so at initialization each column is a convex combination of the columns,
    mostly itself (Misra et al. found (0.9, 0.1) best for two tasks). One task: ``alpha = 1``.
    """
    if not 0.0 <= self_weight <= 1.0:
        raise ValueError(f"self_weight must be in [0, 1], got {self_weight}")
    if tasks == 1:
        return torch.ones(1, 1, features)
    other = (1.0 - self_weight) / (tasks - 1)
    alpha = torch.full((tasks, tasks), other)
    alpha.fill_diagonal_(self_weight)
    return alpha[:, :, None].expand(tasks, tasks, features).clone()


class CrossStitch(Architecture):
    """Cross-stitch networks (Misra, Shrivastava, Gupta, Hebert, CVPR 2016).

    One column per task, each a full backbone (stages ``f_s^k``); after every stage ``k`` a
    cross-stitch unit mixes the columns' activations channel by channel:

        x_s^k = f_s^k(x̃_s^{k-1}),    x̃_t^k = Σ_s α_k[t, s, c] · x_s^k[:, c, ...],    x̃_s^{-1} = input,

    and task t's head reads ``x̃_t^{K-1}``. ``α_k`` is ``T x T x C_k`` (per channel, as in the
    paper's channel-wise variant), initialized by :func:`stitch_init` (0.9 on the diagonal,
    ``0.1 / (T - 1)`` elsewhere). Choices:

    * columns and stitch units are shared parameters (every task's output depends on all of them,
      through the units), so a gradient balancer gives them the combined direction; heads are per
      task (:class:`~mtnorm.TaskHeads`);
    * each column keeps its own stage carry (SegNet's pooling indices are the column's own);
    * ``α``'s learning rate is ``lr * stitch_lr_mult``: Misra et al. train the units with a larger
      learning rate than the columns (their ablation scales it by powers of ten); the default 1 keeps
      them in the ``"rest"`` group, the setting of the measured tables;
    * only ``active_tasks`` are produced: inside ``use_task(model, t)`` all columns still run (task
      t's column depends on all of them), but the last unit computes row t only and one head runs.

    Args:
        columns: one backbone per task, all alike (same stage shapes).
        heads: ``{task: head}``; the order of the columns follows the order of the heads.
        shapes: the stage output shapes of one column (:func:`~mtnorm.arch.stage_shapes`).
        self_weight: the initial diagonal of every ``α_k``.
        stitch_lr_mult: the units' learning-rate multiplier (:func:`mtnorm.param_groups`).
    """

    def __init__(
        self,
        columns: Sequence[nn.Module],
        heads: Mapping[str, nn.Module],
        shapes: Sequence[Sequence[int]],
        self_weight: float = 0.9,
        stitch_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        tasks = validate_tasks(list(heads))
        if len(columns) != len(tasks):
            raise ValueError(f"cross-stitch needs one column per task: {len(columns)} columns, tasks {tasks}")
        counts = {len(stages_of(c)) for c in columns}
        if counts != {len(shapes)}:
            raise ValueError(
                f"the columns have {sorted(counts)} stages but {len(shapes)} stage shapes were given"
            )
        self.columns = nn.ModuleList(columns)
        self.heads = TaskHeads(dict(heads))
        self.stitches = nn.ParameterList(
            nn.Parameter(stitch_init(len(tasks), channels(s), self_weight)) for s in shapes
        )
        mult = stitch_lr_mult
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0:
            raise ValueError(f"cross_stitch: stitch_lr_mult must be a positive number, got {mult!r}")
        if mult != 1:
            setattr(self.stitches, LR_MULT, float(mult))

    def stitch(self, k: int, outputs: Sequence[torch.Tensor], rows: Sequence[int] | None = None) -> list:
        """``x̃_t = Σ_s α_k[t, s, c] x_s`` for the rows ``t`` in ``rows`` (all when None)."""
        alpha = self.stitches[k]
        if rows is not None:
            alpha = alpha[list(rows)]
        mixed = torch.einsum("tsc,sbc...->tbc...", alpha, torch.stack(list(outputs)))
        return list(mixed.unbind(0))

    def forward(self, x: torch.Tensor) -> PerTask:
        tasks = active_tasks(self.heads)
        rows = [self.heads.tasks.index(t) for t in tasks]
        stages = [stages_of(c) for c in self.columns]
        carries: list[dict] = [{} for _ in self.columns]
        xs = [x] * len(self.columns)
        last = len(self.stitches) - 1
        for k in range(last + 1):
            outputs = [col[k](xi, carry) for col, xi, carry in zip(stages, xs, carries)]
            xs = self.stitch(k, outputs, rows if k == last else None)
        return PerTask({t: self.heads.heads[t](z) for t, z in zip(tasks, xs)})


@register_method(
    "cross_stitch",
    "Cross-Stitch networks (Misra et al. 2016): one backbone per task, mixed after every stage",
    needs_example_input=True,
)
def build_cross_stitch(
    backbone_factory: BackboneFactory,
    tasks: Sequence[str],
    heads: Mapping[str, nn.Module],
    *,
    example_input: torch.Tensor,
    **options: Any,
) -> CrossStitch:
    """Options: ``self_weight`` (0.9), ``stitch_lr_mult`` (1: the units learn at the base rate),
    ``norm`` (None: plain BatchNorm in every column; ``"bn"`` /
    ``"sigma"`` / ...: every column's norms converted by :func:`mtnorm.convert`).

    Conversion of cross-stitch: the columns are shared (all tasks' outputs read every column), so
    converting them makes every norm of every column task-routed. Task t's pass then normalizes all
    columns with task t's statistics and affine parameters (TSσBN: gates), while the convolutions and
    stitch units stay shared; the model runs as T task passes (:func:`mtnorm.forward_tasks`).
    """
    o = check_options("cross_stitch", options, {"self_weight": 0.9, "stitch_lr_mult": 1.0, "norm": None})
    heads = check_heads(tasks, heads)
    tasks = tuple(heads)
    columns = [backbone_factory("bn") for _ in tasks]
    shapes = stage_shapes(columns[0], example_input)
    columns = [convert_shared(c, tasks, o["norm"]) for c in columns]
    return CrossStitch(
        columns, heads, shapes, self_weight=o["self_weight"], stitch_lr_mult=o["stitch_lr_mult"]
    )
