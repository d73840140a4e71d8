"""Measured task affinity: what a step on one task does to the others' losses (TAG).

Fifty et al. 2021, "Efficiently Identifying Task Groupings for Multi-Task Networks" (TAG), measure
inter-task affinity with a lookahead: take one SGD step of size ``lr`` on the *shared* parameters
``θ_s`` with task i's gradient alone and compare every task j's loss on the same batch before and
after it,

    Z[i→j] = 1 − L_j(θ_s − lr ∇_{θ_s} L_i, θ_j) / L_j(θ_s, θ_j),

averaged over batches. ``Z[i→j] > 0``: a step for i lowers j's loss (i helps j); ``< 0``: it raises
it (i interferes with j). The diagonal ``Z[i→i]`` is the step's effect on its own task (positive
for a small enough ``lr``). Rows are the task stepped, columns the task measured; ``Z`` is not
symmetric.

This is the measured counterpart of the gate-based relations of :mod:`mtnorm.analysis.relations`
(``S = cos(I_s, I_t)``): :func:`affinity_agreement` ranks the task pairs by both and correlates
them; :func:`average_task_interference` summarizes ``Z`` as the AdaBN paper's ATI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mtnorm.norm.optim import shared_parameters
from mtnorm.norm.routing import forward_tasks, tasks_of

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
Batch = tuple[Any, Mapping[str, torch.Tensor]]


class _Tasks(nn.Module):
    """``forward_tasks`` as a module, so ``torch.func.functional_call`` can run it on swapped
    parameters and buffers (the model becomes a child; the model itself is not changed)."""

    def __init__(self, model: nn.Module, tasks: tuple[str, ...], mode: str) -> None:
        super().__init__()
        self.model = model
        self.run = tasks
        self.mode = mode

    def forward(self, x: Any) -> dict[str, Any]:
        return forward_tasks(self.model, x, mode=self.mode, tasks=self.run)


class _Rewind:
    """Rewinds the random generators to the state :meth:`mark` saw, so that every forward pass of
    a batch draws the same dropout masks. Use inside ``torch.random.fork_rng(devices)``, which
    restores the generators afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        self.cpu: torch.Tensor | None = None
        self.cuda: list[torch.Tensor] = []

    def mark(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def __call__(self) -> None:
        if self.cpu is not None:
            torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(s, d)


def _scalar(loss: Any, task: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fns[{task!r}] must return a scalar tensor, got {type(loss).__name__}")
    return loss.reshape(())


def lookahead_affinity(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fns: Mapping[str, LossFn],
    lr: float,
    params: Sequence[nn.Parameter] | None = None,
    *,
    tasks: Sequence[str] | None = None,
    train: bool = True,
    mode: str = "sequential",
) -> torch.Tensor:
    """TAG's lookahead affinity ``Z`` (``[T, T]`` float64, rows = task stepped, columns = task
    measured, in the order of ``tasks``, default :func:`mtnorm.tasks_of`), averaged over ``batches``.

    ``batches``: ``(x, {task: target})`` pairs; ``loss_fns[t](output, target)`` returns task t's
    scalar loss; ``lr`` is the size of the SGD step; ``params`` the parameters stepped (default
    :func:`mtnorm.shared_parameters`: everything but task norms and heads, the ``θ_s`` of TAG).
    Works for every model that :func:`mtnorm.forward_tasks` runs (converted task-norm models, hard
    sharing with :class:`mtnorm.TaskHeads`); ``mode`` is passed on to it.

    The model is not modified: every pass runs through ``torch.func.functional_call`` on the
    stepped parameters and on *copies* of the persistent buffers, gradients come from
    ``torch.autograd.grad`` (``.grad`` stays as it was), and the training flag and the random
    generators are restored. ``train=True`` (default) runs the passes in training mode, as the
    step TAG imitates does: batch statistics, and the same dropout masks in every pass of a batch
    (the generators are rewound before each), so ``Z`` measures the step and not the masks; the
    running statistics this would update live in the copies. ``train=False`` runs in eval mode
    (running statistics, no dropout): the affinity of the model as it is deployed.

    Degenerate inputs: a task whose gradient does not reach ``params`` has ``Z = 0`` in its row.
    A batch on which task j's loss is exactly 0 (nothing to lower) does not count for column j;
    an entry with no counting batch is 0. A negative loss raises (the ratio has no meaning).

    Cost per batch: T + 1 calls of ``forward_tasks`` (one with the graph, T lookaheads without)
    and T backward passes; with ``mode="sequential"`` a task-norm model runs each call as T task
    passes, a hard-sharing model as one.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    run = tuple(tasks) if tasks is not None else tasks_of(model)
    missing = [t for t in run if t not in loss_fns]
    if missing:
        raise KeyError(f"no loss function for tasks {missing}; loss_fns has {list(loss_fns)}")
    names = {id(p): n for n, p in model.named_parameters()}
    stepped = list(params) if params is not None else shared_parameters(model)
    if not stepped:
        raise ValueError("no parameters to step: the model has no shared trainable parameters")
    unknown = [i for i, p in enumerate(stepped) if id(p) not in names]
    if unknown:
        raise ValueError(f"params {unknown} are not parameters of the model")
    frozen = [names[id(p)] for p in stepped if not p.requires_grad]
    if frozen:
        raise ValueError(f"params {frozen} do not require grad, so no task gradient reaches them")
    kept = model.state_dict(keep_vars=True)
    buffers = {n: b for n, b in model.named_buffers() if n in kept}

    wrapper = _Tasks(model, run, mode)
    rewind = _Rewind(model)

    def losses(x: Any, y: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every task's loss on the batch, the parameters ``new`` swapped in, on buffer copies."""
        rewind()
        state = {f"model.{n}": b.clone() for n, b in buffers.items()}
        state.update({f"model.{n}": v for n, v in new.items()})
        out = torch.func.functional_call(wrapper, state, (x,), strict=False)
        return [_scalar(loss_fns[t](out[t], y[t]), t) for t in run]

    t_count = len(run)
    sums = np.zeros((t_count, t_count))
    counts = np.zeros(t_count)
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    n_batches = 0
    try:
        with torch.random.fork_rng(devices=rewind.devices):
            for x, y in batches:
                n_batches += 1
                rewind.mark()
                with torch.enable_grad():
                    before = losses(x, y, {})
                    grads = [
                        torch.autograd.grad(loss, stepped, retain_graph=i < t_count - 1, allow_unused=True)
                        for i, loss in enumerate(before)
                    ]
                base = np.array([float(v.detach()) for v in before], dtype=np.float64)
                if (base < 0).any():
                    raise ValueError(
                        f"negative losses {dict(zip(run, base.tolist()))}: the lookahead ratio "
                        "L_j(after) / L_j(before) needs non-negative losses"
                    )
                valid = base > 0
                counts += valid
                with torch.no_grad():
                    for i, g in enumerate(grads):
                        if all(gi is None for gi in g):
                            continue  # task i does not reach the stepped parameters: Z = 0
                        new = {names[id(p)]: p if gi is None else p - lr * gi for p, gi in zip(stepped, g)}
                        after = np.array([float(v) for v in losses(x, y, new)], dtype=np.float64)
                        ratio = np.divide(after, base, out=np.ones_like(after), where=valid)
                        sums[i] += np.where(valid, 1.0 - ratio, 0.0)
    finally:
        for m, flag in flags:
            m.training = flag
    if n_batches == 0:
        raise ValueError("batches is empty: give at least one (x, {task: target}) batch")
    return torch.from_numpy(sums / np.maximum(counts, 1)[None, :])


def _check_square(matrix: torch.Tensor, name: str) -> torch.Tensor:
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square [T, T] matrix, got shape {tuple(matrix.shape)}")
    return matrix.detach().double()


def task_interference(
    affinity: torch.Tensor, tasks: Sequence[str] | None = None, harm_only: bool = False
) -> dict[str, dict[str, float]]:
    """Per task, the interference it causes and the interference it suffers.

    ``{task: {"caused": mean_{j≠i} −Z[i→j], "suffered": mean_{j≠i} −Z[j→i]}}``: the mean relative
    rise of the other tasks' losses after a step on task i, and of task i's loss after a step on
    each other task. Positive = interference, negative = help. With ``harm_only`` the terms are
    ``max(0, −Z)`` (help does not offset harm). A single task has nothing to interfere with: 0.
    The mean of either column over tasks is :func:`average_task_interference`.
    """
    z = _check_square(affinity, "affinity")
    t = z.shape[0]
    names = list(tasks) if tasks is not None else [str(i) for i in range(t)]
    if len(names) != t:
        raise ValueError(f"{len(names)} task names for a {t}x{t} affinity matrix")
    harm = -z.clamp_max(0.0) if harm_only else -z
    harm.fill_diagonal_(0.0)
    scale = 1.0 / max(t - 1, 1)
    caused, suffered = harm.sum(1) * scale, harm.sum(0) * scale
    return {n: {"caused": float(caused[i]), "suffered": float(suffered[i])} for i, n in enumerate(names)}


def average_task_interference(affinity: torch.Tensor, harm_only: bool = False) -> float:
    """Average Task Interference (ATI) of a lookahead affinity matrix ``Z``.

    The AdaBN paper (Adaptive Batch Normalization Techniques for Enhancing Model Tuning in
    Multi-Task Learning Environments, §4) only names it: "the Average Task Interference (ATI)
    metric, which quantifies the degree to which the learning of one task negatively impacts the
    performance of another", and reports its reduction in %. It gives no formula, so mtnorm
    defines it on the measured lookahead affinity, where "the learning of one task" is a step on
    task i and "the performance of another" is task j's loss:

        ATI = 1 / (T (T − 1)) · Σ_{i≠j} −Z[i→j],

    the mean over ordered pairs of distinct tasks of the relative rise of j's loss caused by a
    step on i. Positive = the tasks hurt each other on average (negative transfer), negative =
    they help each other, 0 = no effect; a one-task matrix gives 0. The diagonal (a task's effect
    on itself) is left out. Signed by default, so that help offsets harm and ATI is linear in
    ``Z`` (the ATI of a batch-averaged ``Z`` is the average of the batches' ATIs);
    ``harm_only=True`` averages ``max(0, −Z[i→j])`` instead, only the negative impacts of the
    paper's wording.
    """
    z = _check_square(affinity, "affinity")
    t = z.shape[0]
    if t < 2:
        return 0.0
    harm = -z.clamp_max(0.0) if harm_only else -z
    off = ~torch.eye(t, dtype=torch.bool)
    return float(harm[off].mean())


def affinity_agreement(affinity: torch.Tensor, similarity: torch.Tensor) -> float:
    """Spearman rank correlation, over task pairs, of measured affinity and gate similarity.

    Compares the upper triangles (pairs s < t) of the symmetrized affinity ``(Z + Zᵀ) / 2`` and
    of the gate-based similarity ``S`` (:func:`mtnorm.analysis.task_similarity`): 1 when the
    pairs that help each other most are the pairs whose gates overlap most, −1 when the ranking is
    reversed. Ties get average ranks. Like :func:`relation_stability`, never NaN: if either side's
    pair values are all equal there is no ranking, and the agreement is 1 if both are constant,
    else 0. Needs at least 3 tasks (2 give one pair, nothing to rank): ValueError otherwise.
    """
    from scipy.stats import spearmanr

    z = _check_square(affinity, "affinity")
    s = _check_square(similarity, "similarity")
    if z.shape != s.shape:
        raise ValueError(f"affinity {tuple(z.shape)} and similarity {tuple(s.shape)} differ in shape")
    t = z.shape[0]
    if t < 3:
        raise ValueError("affinity_agreement needs at least 3 tasks: with 2 there is one pair, no ranking")
    rows, cols = np.triu_indices(t, k=1)
    a = ((z + z.T) / 2).numpy()[rows, cols]
    b = s.numpy()[rows, cols]
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("affinity and similarity must be finite")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.ptp(a) == np.ptp(b) == 0 else 0.0
    return float(spearmanr(a, b).statistic)
