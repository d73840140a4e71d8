"""The interface every balancing method implements, and the checks they share.

A balancer maps the per-task gradients ``G`` (a ``T x P`` matrix, row ``t`` the gradient of task
``t``'s *raw* loss) and the losses ``l`` (``T`` numbers) to one update direction ``d`` (``P``
numbers). :meth:`Balancer.aggregate` is that map and nothing else; :meth:`Balancer.backward` runs
it on a real model: it computes whatever gradients the method needs, writes ``d`` into the shared
parameters' ``.grad`` and gives every task-specific parameter its own task's gradient, scaled the
way the method scales that task's loss. Loss weighting's step is one scalar, ``sum_t w_t l_t``
(:meth:`Balancer.weighted_objective`), for callers that run the backward themselves (e.g.
DistributedDataParallel, whose reducer sees only ``.backward()``).

Each call of ``aggregate`` or ``backward`` is one training step: stateful methods (moving averages,
previous losses, learned weights) advance their state on every call. That state is saved by
``state_dict()`` and restored by ``load_state_dict()``; methods with learnable parameters expose
them through ``parameters()`` and accumulate their gradients into ``.grad`` on every call, so the
trainer just adds ``balancer.parameters()`` to its optimizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from mtnorm.balance import grads as _grads


class NonFiniteError(FloatingPointError, ValueError):
    """A loss or gradient is NaN or infinite; raised before any parameter's ``.grad`` changes.

    ``kind`` says which: ``"loss"`` or ``"gradient"``.
    """

    kind: str = "gradient"


class Combination(NamedTuple):
    """What one step of a method produces.

    ``direction`` is the update ``d`` (``P``); ``weights`` are the per-task factors the method
    reports (for linear methods ``d = weights @ G``); ``loss_scale`` is the factor task ``t``'s loss
    gets on its task-specific parameters (``1`` for gradient methods, ``w_t`` for loss weighting,
    ``1 / (l_t + eps)`` under the log transform).
    """

    direction: Tensor
    weights: Tensor
    loss_scale: Tensor


@dataclass
class Diagnostics:
    """What :meth:`Balancer.backward` reports about one step.

    ``grad_norms`` and ``cosines`` describe the per-task gradients the method combined (with
    respect to ``rep`` in representation mode); they are ``None`` on the cheap path of loss
    weighting, which never forms per-task gradients (ask for them with ``diagnostics=True``).
    ``losses`` are the loss values the method used (with ``reduce``: the averaged ones).
    """

    tasks: tuple[str, ...]
    step: int
    weights: Tensor
    loss_scale: Tensor
    grad_norms: Tensor | None = None
    cosines: Tensor | None = None
    losses: Tensor | None = None

    def as_dict(self) -> dict[str, float]:
        """Flat ``{name: value}`` for a logger: ``weight/<task>``, ``grad_norm/<task>``, ``cos/<a>/<b>``."""
        out = {f"weight/{t}": float(w) for t, w in zip(self.tasks, self.weights)}
        out.update({f"loss_scale/{t}": float(s) for t, s in zip(self.tasks, self.loss_scale)})
        if self.grad_norms is not None:
            out.update({f"grad_norm/{t}": float(n) for t, n in zip(self.tasks, self.grad_norms)})
        if self.cosines is not None:
            rows, cols = torch.triu_indices(len(self.tasks), len(self.tasks), offset=1)
            for i, j in zip(rows.tolist(), cols.tolist()):
                out[f"cos/{self.tasks[i]}/{self.tasks[j]}"] = float(self.cosines[i, j])
        return out


def gram(grads: Tensor) -> np.ndarray:
    """``G G^T`` as a float64 array: the small solvers run in double precision."""
    return (grads @ grads.T).double().cpu().numpy()


def cosine_matrix(grads: Tensor, eps: float = 1e-12) -> Tensor:
    """Pairwise cosines of the rows of ``grads``; a zero row has cosine 0 with everything."""
    k = grads @ grads.T
    norms = k.diagonal().clamp_min(0).sqrt()
    return k / (norms[:, None] * norms[None, :]).clamp_min(eps)


class Balancer(nn.Module):
    """Base class of every method: subclasses implement :meth:`combine`.

    Args:
        tasks: the task names, in the order of the rows of ``G``. Optional for most methods (taken
            from the first ``backward`` call's ``losses`` dict); required by methods with one
            learnable parameter per task, which must exist before the optimizer is built.

    Attributes:
        step: how many steps (``aggregate`` or ``backward`` calls) this balancer has taken.
    """

    #: Whether the method needs per-task gradients; loss weighting does not (one backward).
    requires_grads: bool = True
    #: Whether the method assumes positive losses (ratios, logarithms, products of losses), which
    #: rules out combining it with the log transform.
    positive_losses: bool = False
    #: Whether a loss <= 0 is refused at run time: the method takes log(l_t) or ratios of losses,
    #: which a non-positive loss turns into gradient ascent or NaN.
    requires_positive_losses: bool = False
    #: Whether the method's state lives in gradient space (an EMA of ``G`` across steps). Such a
    #: method cannot run on representation gradients, whose coordinates are one batch's samples:
    #: row ``t`` of step ``k`` and of step ``k + 1`` describe different images.
    gradient_state: bool = False
    #: Names of tensor attributes (or ``None``) holding the method's state, saved in state_dict.
    _state: tuple[str, ...] = ()

    def __init__(self, tasks: Sequence[str] | None = None) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] | None = _validate_tasks(tasks) if tasks is not None else None
        self.step = 0

    # ---------------------------------------------------------------- the method
    def combine(self, grads: Tensor, losses: Tensor) -> Combination:
        """One step of the method on checked inputs; subclasses implement it."""
        raise NotImplementedError

    # ---------------------------------------------------------------- public entry points
    def aggregate(self, grads: Tensor, losses: Tensor) -> Tensor:
        """The update direction ``d`` (``P``) from per-task gradients ``G`` (``T x P``) of the raw
        losses and the losses ``l`` (``T``). Advances the method's state by one step."""
        losses = torch.as_tensor(losses, dtype=grads.dtype, device=grads.device).detach()
        self._check_shapes(grads, losses)
        self._check_finite(losses, "loss")
        self._check_positive(losses)
        self._check_finite_rows(grads, "gradient")
        out = self.combine(grads.detach(), losses)
        self.step += 1
        return out.direction

    def forward(self, grads: Tensor, losses: Tensor) -> Tensor:
        """Same as :meth:`aggregate`, so ``balancer(G, l)`` works."""
        return self.aggregate(grads, losses)

    def backward(
        self,
        losses: Mapping[str, Tensor],
        shared: Iterable[Tensor],
        *,
        rep: Tensor | None = None,
        grad_mode: str = "auto",
        diagnostics: bool = False,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> Diagnostics:
        """Compute the method's gradients and add them to ``.grad`` (like ``Tensor.backward``).

        Args:
            losses: ``{task: scalar loss}``, every task of the balancer exactly once.
            shared: the shared parameters; they receive the combined direction ``d``. Every other
                parameter reachable from a task's loss is that task's own and receives that task's
                gradient times the method's loss scale (see :class:`Combination`).
            rep: the shared representation (encoder output) of a hard-parameter-sharing model.
                Per-task gradients are then taken with respect to ``rep``, combined, and
                backpropagated once through the encoder (LibMTL's ``rep_grad``).
            grad_mode: how per-task gradients are computed: ``"autograd"`` (one
                ``torch.autograd.grad`` per task, shared and task-specific parameters together),
                ``"batched"`` (one vmapped backward, ``is_grads_batched=True``), ``"rep"`` (needs
                ``rep``) or ``"auto"``: ``"rep"`` when ``rep`` is given, else ``"autograd"``; loss
                weighting skips per-task gradients altogether and backpropagates its weighted sum.
            diagnostics: force per-task gradients (norms and cosines) for loss weighting too.
            reduce: data parallelism. A callable taking one flat 1-D tensor and returning it
                averaged over processes (e.g. ``mtnorm.train.distributed.average_flat_``); each
                process passes the losses of its shard of the global batch. With per-task
                gradients the flat tensor holds the ``T`` loss values, then ``G`` (``T x P``),
                then every task-specific gradient: ONE call per step, after which every process
                combines the global batch's losses and per-task gradients (the method is
                nonlinear: PCGrad of averaged gradients is not the average of PCGrads). Loss
                weighting makes two calls: the ``T`` loss values before the weights
                (:meth:`weighted_objective`), then the gradient of the one weighted backward. The
                checks of losses and gradients run on the averaged values, so every process
                raises, or not, together. Not with ``rep`` (the gradients of a representation are
                per sample, not averageable).

        Raises:
            KeyError: a task is missing from ``losses`` or unknown.
            NonFiniteError: a loss or gradient is NaN/inf; no ``.grad`` has changed.
        """
        names, loss_list = self._bind_graphs(losses)
        shared = _grads.unique(shared)
        _warn_task_specific(shared)
        mode = _grads.resolve_mode(grad_mode, rep, cheap=not self.requires_grads and not diagnostics)
        if reduce is not None and mode == "rep":
            raise ValueError("reduce= cannot average gradients with respect to rep (they are per sample)")
        if mode == "rep" and self.gradient_state:
            raise ValueError(
                f"{type(self).__name__} keeps a moving average of the task gradients across steps, "
                "which gradients with respect to rep (one batch's samples) cannot have; pass the "
                "shared parameters without rep (grad_mode='autograd')"
            )
        if mode == "weighted":
            # The weights come first (they advance state and learned-weight gradients); a
            # non-finite gradient found afterwards rolls both back.
            snapshot = self.snapshot()
            objective, result = self._weighted_objective(names, loss_list, reduce)
            bad = self._weighted_backward(objective, loss_list, reduce)
            if bad is not None:
                self.restore(snapshot)  # before the message, which names the step
                self._raise_nonfinite("gradient", bad)
            return result

        values = torch.stack([loss.detach().reshape(()) for loss in loss_list])
        if reduce is None:
            self._check_values(values)
        task_grads = _grads.task_gradients(loss_list, shared, mode, rep=rep)
        if reduce is not None:
            values = _grads.reduce_task_grads(task_grads, values, reduce)
            self._check_values(values)
        self._check_finite_rows(task_grads.shared, "gradient")
        for t, specific in enumerate(task_grads.specific):
            self._check_finite_list(specific.values(), t)
        out = self.combine(task_grads.shared, values.to(task_grads.shared.dtype))
        direction = out.direction
        if mode == "rep":
            direction = _grads.through_rep(rep, shared, direction)
            self._check_finite_list(direction, None)
            _grads.accumulate(shared, direction)
        else:
            _grads.accumulate_flat(shared, direction)
        for scale, specific in zip(out.loss_scale.tolist(), task_grads.specific):
            _grads.accumulate(list(specific), [g * scale for g in specific.values()])
        g = task_grads.shared
        result = Diagnostics(
            names,
            self.step,
            out.weights.detach(),
            out.loss_scale.detach(),
            grad_norms=g.norm(dim=1),
            cosines=cosine_matrix(g),
            losses=values,
        )
        self.step += 1
        return result

    def weighted_objective(
        self, losses: Mapping[str, Tensor], *, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> tuple[Tensor, Diagnostics]:
        """Loss weighting as one scalar to backpropagate: ``L = sum_t w_t l_t``, ``w`` a constant.

        ``w = loss_weights(l_bar)``, where ``l_bar`` are the loss values (``reduce``: averaged over
        processes first, one call on the ``T`` values, so that every process computes the weights
        of the global batch and learned weights move as in one process). ``w`` is detached, so
        ``L.backward()`` gives every parameter ``sum_t w_t dl_t/dtheta``: the shared parameters the
        direction ``d = w @ G``, each task-specific parameter its task's gradient times ``w_t``,
        which is what :meth:`backward` writes. This is the step :meth:`backward` runs for loss
        weighting; call it directly when something else does the backward (e.g. DDP, whose
        buckets average the gradients during ``L.backward()``).

        Advances the method by one step (its state, ``step``, the ``.grad`` of learned weights):
        take a :meth:`snapshot` first to :meth:`restore` if the step is then skipped (an fp16
        overflow) or its gradient is not finite.

        Returns:
            ``(L, diagnostics)``; ``diagnostics.losses`` are the (averaged) loss values the
            weights came from.

        Raises:
            TypeError: the method combines per-task gradients (``requires_grads``).
            NonFiniteError: a loss value (after ``reduce``) is NaN/inf; nothing has changed.
        """
        if self.requires_grads:
            raise TypeError(
                f"{type(self).__name__} combines per-task gradients, not losses: it has no weighted "
                "objective; use backward()"
            )
        names, loss_list = self._bind_graphs(losses)
        return self._weighted_objective(names, loss_list, reduce)

    def loss_weights(self, losses: Tensor) -> Tensor:
        """Loss weighting only: the weights ``w`` (``T``) of one step; ``d = w @ G``."""
        raise TypeError(f"{type(self).__name__} is a gradient method; it has no loss weights")

    # ---------------------------------------------------------------- helpers
    def _weighted_objective(
        self, names: tuple[str, ...], loss_list: list[Tensor], reduce: Callable[[Tensor], Tensor] | None
    ) -> tuple[Tensor, Diagnostics]:
        """:meth:`weighted_objective` on bound losses."""
        values = torch.stack([loss.detach().reshape(()) for loss in loss_list])
        if reduce is not None:
            values = reduce(values.clone())
        self._check_values(values)
        weights = self.loss_weights(values).detach()
        stacked = torch.stack([loss.reshape(()) for loss in loss_list])
        objective = (stacked * weights.to(stacked.dtype)).sum()
        result = Diagnostics(names, self.step, weights, weights, losses=values)
        self.step += 1
        return objective, result

    def _weighted_backward(
        self, objective: Tensor, loss_list: list[Tensor], reduce: Callable[[Tensor], Tensor] | None = None
    ) -> list[int] | None:
        """The cheap path: one backward of ``objective`` (``sum_t w_t l_t``) into temporaries,
        (averaged over processes by ``reduce``,) checked, then added. Returns ``None``, or, with
        nothing added, the tasks whose gradient is not finite."""
        params = _grads.reachable_parameters(objective)
        if not params:
            return None
        # Retained so that the rare error path below can still find the culprit task.
        grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if reduce is not None:
            grads = _grads.reduce_flat(grads, reduce)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            # Rare path: find the culprit task, which the summed gradient cannot tell.
            return _grads.nonfinite_tasks(loss_list, params) or list(range(len(loss_list)))
        _grads.accumulate(params, grads)
        return None

    def _bind_graphs(self, losses: Mapping[str, Tensor]) -> tuple[tuple[str, ...], list[Tensor]]:
        """:meth:`_bind`, refusing a loss without an autograd graph."""
        names, loss_list = self._bind(losses)
        for t, loss in zip(names, loss_list):
            if not loss.requires_grad:
                raise ValueError(
                    f"the loss of task {t!r} has no autograd graph (requires_grad=False): it was "
                    "computed under torch.no_grad() or detached, so backward would write nothing"
                )
        return names, loss_list

    def _bind(self, losses: Mapping[str, Tensor]) -> tuple[tuple[str, ...], list[Tensor]]:
        if not isinstance(losses, Mapping):
            raise TypeError(f"losses must be a dict {{task: loss}}, got {type(losses).__name__}")
        if self.tasks is None:
            self.tasks = _validate_tasks(list(losses))
        missing = [t for t in self.tasks if t not in losses]
        extra = [t for t in losses if t not in self.tasks]
        if missing or extra:
            raise KeyError(
                f"losses must have exactly the tasks {list(self.tasks)}; "
                f"missing {missing}, unexpected {extra}"
            )
        out = []
        for t in self.tasks:
            loss = losses[t]
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"the loss of task {t!r} must be a scalar tensor, got {loss!r}")
            out.append(loss)
        return self.tasks, out

    def _check_shapes(self, grads: Tensor, losses: Tensor) -> None:
        if grads.dim() != 2:
            raise ValueError(f"grads must be a T x P matrix, got shape {tuple(grads.shape)}")
        if losses.shape != (grads.shape[0],):
            raise ValueError(
                f"losses must have shape ({grads.shape[0]},) to match grads, got {tuple(losses.shape)}"
            )
        if self.tasks is not None and len(self.tasks) != grads.shape[0]:
            raise ValueError(
                f"this balancer has {len(self.tasks)} tasks {list(self.tasks)}, grads has "
                f"{grads.shape[0]} rows"
            )

    def _task_name(self, t: int) -> str:
        return repr(self.tasks[t]) if self.tasks is not None else f"#{t}"

    def _raise_nonfinite(self, what: str, bad: list[int]) -> None:
        names = ", ".join(self._task_name(t) for t in bad)
        err = NonFiniteError(
            f"non-finite {what} for task {names} at step {self.step}; no gradient was written"
        )
        err.kind = what
        raise err

    def _check_values(self, values: Tensor) -> None:
        self._check_finite(values, "loss")
        self._check_positive(values)

    def _check_finite(self, values: Tensor, what: str) -> None:
        ok = torch.isfinite(values)
        if not bool(ok.all()):
            self._raise_nonfinite(what, torch.nonzero(~ok).flatten().tolist())

    def _check_positive(self, values: Tensor) -> None:
        """Methods built on log(l_t) or loss ratios need l_t > 0; a loss <= 0 would turn their
        update into gradient ascent, so it is refused instead."""
        if not self.requires_positive_losses:
            return
        bad = torch.nonzero(values <= 0).flatten().tolist()
        if bad:
            found = ", ".join(f"{self._task_name(t)} = {float(values[t]):.4g}" for t in bad)
            raise ValueError(
                f"{type(self).__name__} needs positive losses (it uses log l_t or loss ratios) but got "
                f"{found} at step {self.step}; add an offset so every loss stays > 0 "
                "(e.g. loss + 1 for a loss bounded below by -1), or use a method without this need"
            )

    def _check_finite_rows(self, grads: Tensor, what: str) -> None:
        ok = torch.isfinite(grads).all(dim=1)
        if not bool(ok.all()):
            self._raise_nonfinite(what, torch.nonzero(~ok).flatten().tolist())

    def _check_finite_list(self, tensors: Iterable[Tensor], task: int | None) -> None:
        for g in tensors:
            if not bool(torch.isfinite(g).all()):
                if task is None:
                    raise NonFiniteError(
                        f"non-finite gradient of the shared parameters at step {self.step}; "
                        "no gradient was written"
                    )
                self._raise_nonfinite("gradient", [task])

    # ---------------------------------------------------------------- state
    def snapshot(self) -> tuple[dict[str, Any], list[Tensor | None]]:
        """The method's state (``state_dict``, ``step`` included) and its parameters' ``.grad``,
        for :meth:`restore`: undoing a step that was skipped (fp16 overflow) or failed. Parameter
        values are held, not copied: a step changes only their ``.grad``, the optimizer the rest."""
        grads = [None if p.grad is None else p.grad.clone() for p in self.parameters()]
        return self.state_dict(keep_vars=True), grads

    def restore(self, snapshot: tuple[dict[str, Any], list[Tensor | None]]) -> None:
        """Put back what :meth:`snapshot` took: the state and the learned weights' ``.grad``."""
        state, grads = snapshot
        self.load_state_dict(state)
        for p, g in zip(self.parameters(), grads):
            p.grad = g

    def get_extra_state(self) -> dict[str, Any]:
        state = {name: _to_saveable(getattr(self, name)) for name in self._state}
        return {"step": self.step, "tasks": self.tasks, **state}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.tasks = state["tasks"]
        for name in self._state:
            setattr(self, name, _from_saveable(getattr(self, name), state[name]))

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}" if self.tasks is not None else ""


class LossWeighting(Balancer):
    """Base of the loss-based methods: losses to weights ``w``; the direction is ``d = w @ G``.

    Through :meth:`backward` they need no per-task gradients: one backward of ``sum_t w_t l_t``
    (:meth:`weighted_objective`).
    """

    requires_grads = False

    def combine(self, grads: Tensor, losses: Tensor) -> Combination:
        w = self.loss_weights(losses).to(grads.dtype)
        return Combination(w @ grads, w, w)


def _warn_task_specific(shared: Sequence[Tensor]) -> None:
    """Task-specific parameters (task norms, heads) must not be passed as shared: the method would
    mix every task's gradient into them instead of giving each its own task's gradient."""
    count = sum(1 for p in shared if getattr(p, "_mtnorm_task_specific", False))
    if count:
        warnings.warn(
            f"`shared` holds {count} task-specific parameter(s) (task norms or heads): they get the "
            "combined direction instead of their own task's gradient; pass "
            "mtnorm.shared_parameters(model)",
            stacklevel=3,
        )


def _validate_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    from mtnorm.norm.routing import validate_tasks

    return validate_tasks(tasks)


def _to_saveable(value: Any) -> Any:
    if isinstance(value, np.random.Generator):
        return value.bit_generator.state
    if isinstance(value, Tensor):
        return value.detach().clone()
    return value


def _from_saveable(current: Any, saved: Any) -> Any:
    if isinstance(current, np.random.Generator):
        current.bit_generator.state = saved
        return current
    return saved.clone() if isinstance(saved, Tensor) else saved
