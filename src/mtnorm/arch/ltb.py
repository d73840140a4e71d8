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

    * search (training, the first ``search`` fraction of the epochs): ``w_k = gumbel_softmax(θ_k,
      τ)`` per row, a fresh sample every forward (soft weights; ``hard=True`` gives straight-through
      one-hot samples). τ goes geometrically from ``tau`` at the first epoch to ``tau_final`` at the
      last search epoch, ``τ_e = tau · (tau_final / tau)^(e / (S - 1))``;
    * fine-tuning (the remaining epochs): the tree is frozen at the argmax of ``θ_k``
      (:meth:`freeze`) and trained as a plain branched network. Guo et al. retrain the found tree
      from scratch; mtnorm keeps the searched weights and continues, so one run of the trainer
      gives the final model. ``search=1.0`` searches for the whole run (no fine-tuning);
    * eval: ``w_k`` is the one-hot argmax of ``θ_k`` (the tree of :meth:`branching`), and only the
      nodes on the paths of the active tasks run.

    The trainer calls :meth:`on_epoch_start` before every epoch (also when a run resumes), which
    sets τ and freezes the tree; the frozen tree is a buffer, so checkpoints keep it.

    The stage carry (SegNet's pooling indices) follows one path: node j forks the carry of its most
    likely parent, the argmax of its row of ``w_k`` (the sampled one in training), so the indices a
    decoder node unpools with come from the encoder nodes its input mostly came from.

    Nodes are shared parameters (several tasks may reach a node), and so are the logits; heads are
    per task. In eval and fine-tuning, nodes off every path (and the logits) get no gradient; in
    the search all do.

    Args:
        columns: T alike backbones; node ``(k, j)`` is stage k of ``columns[j]``.
        heads: ``{task: head}``.
        tau: the Gumbel-softmax temperature at the first search epoch.
        hard: straight-through one-hot samples in the search.
        search: the fraction of the epochs spent searching, in (0, 1].
        tau_final: the temperature at the last search epoch (default: ``tau``, no annealing).
    """

    # a frozen tree leaves the nodes off its paths (and the logits) out of the graph: DDP must look
    ddp_find_unused_parameters = True

    def __init__(
        self,
        columns: Sequence[nn.Module],
        heads: Mapping[str, nn.Module],
        tau: float = 1.0,
        hard: bool = False,
        search: float = 0.5,
        tau_final: float | None = None,
    ) -> None:
        super().__init__()
        tasks = validate_tasks(list(heads))
        if len(columns) != len(tasks):
            raise ValueError(f"LTB needs T node copies per stage: {len(columns)} backbones, tasks {tasks}")
        counts = {len(stages_of(c)) for c in columns}
        if len(counts) != 1:
            raise ValueError(f"the backbones have different numbers of stages: {sorted(counts)}")
        tau_final = tau if tau_final is None else tau_final
        if tau <= 0 or tau_final <= 0:
            raise ValueError(f"tau and tau_final must be positive, got {tau} and {tau_final}")
        if not 0 < search <= 1:
            raise ValueError(f"search is the fraction of the epochs spent searching, in (0, 1]; got {search}")
        self.columns = nn.ModuleList(columns)
        self.heads = TaskHeads(dict(heads))
        t = len(tasks)
        # logits[k][j, i]: child j of level k+1 (stage k+1; task j's head when k = K-1) reads
        # node i of stage k
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(t, t)) for _ in range(counts.pop()))
        self.tau = float(tau)
        self.tau_initial, self.tau_final = float(tau), float(tau_final)
        self.hard = bool(hard)
        self.search = float(search)
        # the frozen tree, row k = the parents chosen at level k; -1 while searching
        self.register_buffer("tree", torch.full((len(self.logits), t), -1, dtype=torch.long))

    @property
    def frozen(self) -> bool:
        """Whether the search is over and training runs the fixed tree."""
        return bool((self.tree >= 0).all())

    def freeze(self) -> Branching:
        """End the search: from now on training runs the argmax tree, like eval."""
        with torch.no_grad():
            self.tree.copy_(torch.stack([theta.argmax(-1) for theta in self.logits]))
        return self.branching()

    def search_epochs(self, epochs: int) -> int:
        """``S``: how many of ``epochs`` the search takes (at least one)."""
        return epochs if self.search >= 1 else min(epochs, max(1, round(self.search * epochs)))

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        """The schedule: τ for a search epoch, or the frozen tree once ``epoch >= S``."""
        s = self.search_epochs(epochs)
        if epoch >= s:
            if not self.frozen:
                self.freeze()
            return
        self.tau = self.tau_initial * (self.tau_final / self.tau_initial) ** (epoch / max(s - 1, 1))

    def _choice(self) -> list[list[int]]:
        if self.frozen:
            return self.tree.tolist()
        return [theta.detach().argmax(-1).tolist() for theta in self.logits]

    def _weights(self) -> tuple[list[torch.Tensor] | None, list[list[int]]]:
        if self.training and not self.frozen:
            weights = [F.gumbel_softmax(theta, tau=self.tau, hard=self.hard, dim=-1) for theta in self.logits]
            return weights, [w.detach().argmax(-1).tolist() for w in weights]
        return None, self._choice()

    def forward(self, x: torch.Tensor) -> PerTask:
        tasks = active_tasks(self.heads)
        rows = [self.heads.tasks.index(t) for t in tasks]
        weights, choice = self._weights()
        n, depth = len(self.columns), len(self.logits)
        # nodes to compute per stage: all in the search (every parent enters the soft mix), the
        # paths of the active tasks in eval and fine-tuning
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
        """The tree the logits choose (argmax), as used in eval; the frozen one after :meth:`freeze`."""
        choice = self._choice()
        parents = ((-1,) * len(self.columns), *(tuple(c) for c in choice[:-1]))
        heads = {t: choice[-1][i] for i, t in enumerate(self.heads.tasks)}
        return Branching(self.heads.tasks, parents, heads)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, hard={self.hard}, search={self.search}, frozen={self.frozen}"


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
    """Options: ``tau`` (1.0), ``tau_final`` (None: ``tau``, no annealing), ``search`` (0.5: half
    the epochs search, the rest fine-tune the argmax tree; 1.0: no fine-tuning), ``hard`` (False),
    ``norm`` (None: plain BatchNorm; ``"bn"`` /
    ``"sigma"`` / ...: every node's norms converted by :func:`mtnorm.convert`; nodes are shared, so
    task t's pass normalizes every node on its path with task t's norm parameters)."""
    o = check_options(
        "ltb", options, {"tau": 1.0, "tau_final": None, "search": 0.5, "hard": False, "norm": None}
    )
    heads = check_heads(tasks, heads)
    tasks = tuple(heads)
    columns = [backbone_factory("bn") for _ in tasks]
    stage_shapes(columns[0], example_input)  # a backbone whose stages do not compose fails here
    columns = [convert_shared(c, tasks, o["norm"]) for c in columns]
    return LearningToBranch(
        columns, heads, tau=o["tau"], hard=o["hard"], search=o["search"], tau_final=o["tau_final"]
    )
