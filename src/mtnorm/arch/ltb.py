"""Learning to Branch (Guo, Lee, Ulbricht, ICML 2020): a tree over the backbone's stages, learned
with Gumbel-softmax choices of each node's parent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtnorm.arch.base import (
    Architecture,
    active_tasks,
    check_heads,
    check_options,
    convert_shared,
    fork_carry,
)
from mtnorm.arch.stages import stage_shapes, stages_of
from mtnorm.models.methods import BackboneFactory, register_method
from mtnorm.norm import PerTask, TaskHeads, validate_tasks


@dataclass(frozen=True)
class Branching:
    """A learned tree (the argmax choices): ``parents[k][j]`` is the node of stage ``k - 1`` that
    node ``j`` of stage ``k`` reads (``-1`` at stage 0: the input), ``heads[t]`` the node of the
    last stage that task ``t``'s head reads."""

    tasks: tuple[str, ...]
    parents: tuple[tuple[int, ...], ...]
    heads: dict[str, int]

    @property
    def paths(self) -> dict[str, tuple[int, ...]]:
        """``{task: (node at stage 0, ..., node at stage K-1)}``: two tasks share stage k's
        parameters (and everything before) where their paths meet."""
        out = {}
        for t, node in self.heads.items():
            path = [node]
            for k in range(len(self.parents) - 1, 0, -1):
                path.append(self.parents[k][path[-1]])
            out[t] = tuple(reversed(path))
        return out

    def shared_stages(self, a: str, b: str) -> int:
        """How many leading stages tasks ``a`` and ``b`` share."""
        pa, pb = self.paths[a], self.paths[b]
        return next((k for k, (i, j) in enumerate(zip(pa, pb)) if i != j), len(pa))

    def __str__(self) -> str:
        return "; ".join(f"{t}: " + " -> ".join(map(str, p)) for t, p in self.paths.items())


class LearningToBranch(Architecture):
    """Learning to Branch (Guo, Lee, Ulbricht, ICML 2020), over a backbone's stages.

    Stage k has T nodes; node ``(k, j)`` is stage k of the j-th of T fresh backbones (T times the
    backbone's parameters). Node j of stage ``k >= 1`` reads its parent among the T nodes of stage
    k-1, and task t's head reads a node of the last stage, each chosen with learnable logits
    ``θ_k`` (``T x T``, zeros at init: every parent equally likely):

        y_j^0 = f_j^0(x),    y_j^k = f_j^k(Σ_i w_k[j, i] y_i^{k-1}),    z_t = Σ_i w_K[t, i] y_i^{K-1},

    * training: ``w_k = gumbel_softmax(θ_k, tau)`` per row, a fresh sample every forward (soft
      weights; ``hard=True`` gives straight-through one-hot samples). The temperature is fixed
      (``tau``, default 1); anneal it by setting ``model.tau`` between epochs;
    * eval: ``w_k`` is the one-hot argmax of ``θ_k`` (the tree of :meth:`branching`), and only the
      nodes on the paths of the active tasks run.

    The stage carry (SegNet's pooling indices) follows one path: node j forks the carry of its most
    likely parent, the argmax of its row of ``w_k`` (the sampled one in training), so the indices a
    decoder node unpools with come from the encoder nodes its input mostly came from.

    Nodes are shared parameters (several tasks may reach a node), and so are the logits; heads are
    per task. In eval, nodes off every path (and the logits) get no gradient; in training all do.

    Args:
        columns: T alike backbones; node ``(k, j)`` is stage k of ``columns[j]``.
        heads: ``{task: head}``.
        tau: the Gumbel-softmax temperature.
        hard: straight-through one-hot samples in training.
    """

    def __init__(
        self,
        columns: Sequence[nn.Module],
        heads: Mapping[str, nn.Module],
        tau: float = 1.0,
        hard: bool = False,
    ) -> None:
        super().__init__()
        tasks = validate_tasks(list(heads))
        if len(columns) != len(tasks):
            raise ValueError(f"LTB needs T node copies per stage: {len(columns)} backbones, tasks {tasks}")
        counts = {len(stages_of(c)) for c in columns}
        if len(counts) != 1:
            raise ValueError(f"the backbones have different numbers of stages: {sorted(counts)}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.columns = nn.ModuleList(columns)
        self.heads = TaskHeads(dict(heads))
        t = len(tasks)
        # logits[k][j, i]: child j of level k+1 (stage k+1; task j's head when k = K-1) reads
        # node i of stage k
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(t, t)) for _ in range(counts.pop()))
        self.tau = float(tau)
        self.hard = bool(hard)

    def _weights(self) -> tuple[list[torch.Tensor] | None, list[list[int]]]:
        if self.training:
            weights = [F.gumbel_softmax(theta, tau=self.tau, hard=self.hard, dim=-1) for theta in self.logits]
            return weights, [w.detach().argmax(-1).tolist() for w in weights]
        return None, [theta.detach().argmax(-1).tolist() for theta in self.logits]

    def forward(self, x: torch.Tensor) -> PerTask:
        tasks = active_tasks(self.heads)
        rows = [self.heads.tasks.index(t) for t in tasks]
        weights, choice = self._weights()
        n, depth = len(self.columns), len(self.logits)
        # nodes to compute per stage: all in training (every parent enters the soft mix), the
        # paths of the active tasks in eval
        needed: list[list[int]] = [list(range(n))] * depth
        if weights is None:
            needed = [[] for _ in range(depth)]
            needed[-1] = sorted({choice[-1][r] for r in rows})
            for k in range(depth - 2, -1, -1):
                needed[k] = sorted({choice[k][j] for j in needed[k + 1]})

        def mix(k: int, j: int, ys: dict[int, torch.Tensor]) -> torch.Tensor:
            if weights is None:
                return ys[choice[k][j]]
            w = weights[k][j]
            stacked = torch.stack([ys[i] for i in range(n)])
            return (w.view(-1, *[1] * (stacked.dim() - 1)) * stacked).sum(0)

        stages = [stages_of(c) for c in self.columns]
        ys: dict[int, torch.Tensor] = {}
        carries: dict[int, dict] = {}
        for j in needed[0]:
            carries[j] = {}
            ys[j] = stages[j][0](x, carries[j])
        for k in range(1, depth):
            new_ys, new_carries = {}, {}
            for j in needed[k]:
                new_carries[j] = fork_carry(carries[choice[k - 1][j]])
                new_ys[j] = stages[j][k](mix(k - 1, j, ys), new_carries[j])
            ys, carries = new_ys, new_carries
        return PerTask({t: self.heads.heads[t](mix(depth - 1, r, ys)) for t, r in zip(tasks, rows)})

    def probabilities(self) -> list[torch.Tensor]:
        """``softmax(θ_k)`` per level: row j is the distribution over the parents of child j."""
        return [theta.detach().softmax(-1) for theta in self.logits]

    def branching(self) -> Branching:
        """The tree the logits choose (argmax), as used in eval."""
        choice = [theta.detach().argmax(-1).tolist() for theta in self.logits]
        parents = ((-1,) * len(self.columns), *(tuple(c) for c in choice[:-1]))
        heads = {t: choice[-1][i] for i, t in enumerate(self.heads.tasks)}
        return Branching(self.heads.tasks, parents, heads)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, hard={self.hard}"


@register_method(
    "ltb",
    "Learning to Branch (Guo et al. 2020): a tree over stages learned with Gumbel-softmax parent choices",
    needs_example_input=True,
)
def build_ltb(
    backbone_factory: BackboneFactory,
    tasks: Sequence[str],
    heads: Mapping[str, nn.Module],
    *,
    example_input: torch.Tensor,
    **options: Any,
) -> LearningToBranch:
    """Options: ``tau`` (1.0, fixed), ``hard`` (False), ``norm`` (None: plain BatchNorm; ``"bn"`` /
    ``"sigma"`` / ...: every node's norms converted by :func:`mtnorm.convert`; nodes are shared, so
    task t's pass normalizes every node on its path with task t's norm parameters)."""
    o = check_options("ltb", options, {"tau": 1.0, "hard": False, "norm": None})
    heads = check_heads(tasks, heads)
    tasks = tuple(heads)
    columns = [backbone_factory("bn") for _ in tasks]
    stage_shapes(columns[0], example_input)  # a backbone whose stages do not compose fails here
    columns = [convert_shared(c, tasks, o["norm"]) for c in columns]
    return LearningToBranch(columns, heads, tau=o["tau"], hard=o["hard"])
