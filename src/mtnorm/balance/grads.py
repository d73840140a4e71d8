"""Per-task gradients of a model, and writing combined gradients back into ``.grad``.

Three ways to get the ``T x P`` matrix of per-task gradients of the shared parameters:

* ``"autograd"``: one ``torch.autograd.grad`` per task over the shared parameters *and* that task's
  own parameters (heads, task norms), so nothing is backpropagated twice. When each task's loss
  lives in its own graph (``mtnorm.forward_tasks(model, x, mode="sequential")`` on a model with
  task-specific norms), the T calls together cost one ordinary backward: the per-task gradients
  are free. Through one shared graph (hard parameter sharing, or a *batched* task pass) every
  call pays for the whole backward, so prefer sequential passes there, or ``rep``.
* ``"batched"``: one vmapped backward (``is_grads_batched=True``) with the identity as the batch
  of output gradients: fewer Python round trips, the same arithmetic.
* ``"rep"``: gradients with respect to a shared representation ``rep`` (LibMTL's ``rep_grad``):
  T cheap backwards through the heads, then one backward of the combined ``rep`` gradient
  through the encoder.

Task-specific parameters are found by walking each loss's autograd graph: every leaf that
requires grad and is not shared belongs to the tasks whose losses reach it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

GRAD_MODES = ("auto", "autograd", "batched", "rep")


@dataclass
class TaskGrads:
    """``shared``: ``T x P`` (``P`` = shared numel, or ``rep.numel()`` in rep mode);
    ``specific[t]``: ``{parameter: gradient of task t's raw loss}`` for task t's own parameters."""

    shared: Tensor
    specific: list[dict[Tensor, Tensor]]


def unique(params: Iterable[Tensor]) -> list[Tensor]:
    """The parameters in order, each once (a tied weight must not get its gradient twice)."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def resolve_mode(grad_mode: str, rep: Tensor | None, cheap: bool) -> str:
    """The gradient strategy; ``"weighted"`` is the loss-weighting path without per-task grads."""
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"unknown grad_mode {grad_mode!r}; choose one of {list(GRAD_MODES)}")
    if grad_mode == "rep" and rep is None:
        raise ValueError("grad_mode='rep' needs rep=, the shared representation tensor")
    if rep is not None and grad_mode not in ("auto", "rep"):
        raise ValueError(f"rep= is only used by grad_mode='rep' (or 'auto'), got {grad_mode!r}")
    if rep is not None and not rep.requires_grad:
        raise ValueError("rep does not require grad: pass the encoder output, not a detached copy")
    if grad_mode == "auto":
        if cheap:
            return "weighted"
        return "rep" if rep is not None else "autograd"
    return grad_mode


def reachable_parameters(root: Tensor, stop: Tensor | None = None) -> list[Tensor]:
    """Leaves requiring grad that ``root`` depends on, in a fixed order (not descending past the
    graph node of ``stop``)."""
    return _walk(root, stop)[0]


def _walk(root: Tensor, stop: Tensor | None = None) -> tuple[list[Tensor], set]:
    """The leaves requiring grad behind ``root`` and the set of graph nodes visited."""
    fn = root.grad_fn
    if fn is None:
        return ([root] if root.requires_grad else []), set()
    stop_fn = stop.grad_fn if stop is not None else None
    seen = {fn}
    stack = [fn]
    leaves: list[Tensor] = []
    while stack:
        node = stack.pop()
        if node is stop_fn:
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.append(variable)
            continue
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    seen.discard(stop_fn)  # the encoder behind ``stop`` is backpropagated once, separately
    return unique(leaves), seen


def task_gradients(
    losses: Sequence[Tensor], shared: Sequence[Tensor], mode: str, rep: Tensor | None = None
) -> TaskGrads:
    """Per-task gradients of ``losses`` (see the module docstring for the modes)."""
    targets = [rep] if mode == "rep" else list(shared)
    ids = {id(p) for p in shared}
    if rep is not None:
        ids.add(id(rep))
    walks = [_walk(loss, stop=rep) for loss in losses]
    specific = [[p for p in leaves if id(p) not in ids] for leaves, _ in walks]
    numels = [p.numel() for p in targets]
    ref = targets[0] if targets else losses[0]
    matrix = torch.zeros(len(losses), sum(numels), dtype=ref.dtype, device=ref.device)

    if mode == "batched":
        return _batched(losses, targets, specific, matrix, numels)

    retain = _needed_later([nodes for _, nodes in walks])
    out_specific = []
    for t, loss in enumerate(losses):
        inputs = targets + specific[t]
        if not inputs or not loss.requires_grad:
            out_specific.append({})
            continue
        grads = torch.autograd.grad(loss, inputs, retain_graph=retain[t], allow_unused=True)
        _fill_row(matrix[t], grads[: len(targets)], numels)
        out_specific.append(_present(specific[t], grads[len(targets) :]))
    return TaskGrads(matrix, out_specific)


def _needed_later(nodes: list[set]) -> list[bool]:
    """Whether task t's graph shares nodes with a later task's, so it must be retained. Disjoint
    task graphs (sequential task passes) are freed task by task, as one backward would."""
    later: set = set()
    out = []
    for seen in reversed(nodes):
        out.append(not later.isdisjoint(seen))
        later |= seen
    return out[::-1]


def _batched(
    losses: Sequence[Tensor],
    targets: list[Tensor],
    specific: list[list[Tensor]],
    matrix: Tensor,
    numels: list[int],
) -> TaskGrads:
    union = unique(p for ps in specific for p in ps)
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    try:
        grads = torch.autograd.grad(
            stacked, targets + union, grad_outputs=eye, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError as err:
        raise RuntimeError(
            f"grad_mode='batched' failed ({err}); some operation has no vmap rule, use "
            "grad_mode='autograd'"
        ) from err
    offset = 0
    for g, n in zip(grads[: len(targets)], numels):
        if g is not None:
            matrix[:, offset : offset + n] = g.reshape(len(losses), n)
        offset += n
    by_param = dict(zip(map(id, union), grads[len(targets) :]))
    out_specific = [
        _present(ps, [None if by_param[id(p)] is None else by_param[id(p)][t] for p in ps])
        for t, ps in enumerate(specific)
    ]
    return TaskGrads(matrix, out_specific)


def _fill_row(row: Tensor, grads: Sequence[Tensor | None], numels: list[int]) -> None:
    offset = 0
    for g, n in zip(grads, numels):
        if g is not None:
            row[offset : offset + n] = g.reshape(-1)
        offset += n


def _present(params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> dict[Tensor, Tensor]:
    return {p: g for p, g in zip(params, grads) if g is not None}


def through_rep(rep: Tensor, shared: Sequence[Tensor], direction: Tensor) -> list[Tensor]:
    """Backpropagate the combined gradient of ``rep`` once through the encoder."""
    grads = torch.autograd.grad(
        rep, list(shared), grad_outputs=direction.view_as(rep).to(rep.dtype), allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for p, g in zip(shared, grads)]


def accumulate(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """``p.grad += g`` (or ``= g``), like ``Tensor.backward``."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g.detach().to(p.dtype).clone()
            else:
                p.grad.add_(g.to(p.grad.dtype))


def accumulate_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    """Add the flat vector ``flat`` (concatenated parameters) to the parameters' ``.grad``."""
    pieces = flat.split([p.numel() for p in params])
    accumulate(params, [g.view_as(p) for g, p in zip(pieces, params)])


def reduce_flat(tensors: Sequence[Tensor], reduce) -> list[Tensor]:  # noqa: ANN001
    """``reduce`` (e.g. an all-reduce mean) applied once to ``tensors`` concatenated; new tensors of
    the same shapes and dtypes."""
    if not tensors:
        return []
    flat = reduce(torch.cat([t.detach().reshape(-1) for t in tensors]))
    pieces = flat.split([t.numel() for t in tensors])
    return [g.view_as(t).to(t.dtype) for g, t in zip(pieces, tensors)]


def reduce_task_grads(task_grads: TaskGrads, values: Tensor, reduce) -> Tensor:  # noqa: ANN001
    """One ``reduce`` call on the loss values, ``G`` and every task-specific gradient, in that
    order; ``task_grads`` is updated in place and the reduced values are returned."""
    specific = [g for grads in task_grads.specific for g in grads.values()]
    out = reduce_flat([values.to(task_grads.shared.dtype), task_grads.shared, *specific], reduce)
    task_grads.shared = out[1]
    it = iter(out[2:])
    task_grads.specific = [{param: next(it) for param in grads} for grads in task_grads.specific]
    return out[0].to(values.dtype)


def nonfinite_tasks(losses: Sequence[Tensor], params: Sequence[Tensor]) -> list[int]:
    """The tasks whose own gradient (over ``params``) has a NaN or inf (error path only)."""
    bad = []
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
        if any(g is not None and not bool(torch.isfinite(g).all()) for g in grads):
            bad.append(t)
    return bad
