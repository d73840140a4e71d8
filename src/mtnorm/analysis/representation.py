"""Task representations of the encoder, embedded in 2-D (paper Fig. 2 middle).

A task's representation of an input is what its head receives: the input of
:class:`mtnorm.TaskHeads` while the model runs that task (``use_task``). With hard sharing every
task gets the same representation; with task-specific norms each task normalizes (and, with
TSσBN, gates) the shared filters its own way, and the paper shows the tasks' representations of
the same inputs forming separate clusters in a t-SNE plot.

All tasks are embedded *jointly* (one embedding of the concatenation of every task's ``[N, D]``
representations), so that positions are comparable across tasks; the result is split back per
task. ``method="tsne"`` uses scikit-learn's t-SNE (an optional dependency, imported on use);
``method="pca"`` projects on the two leading principal components with an exact SVD: no extra
dependency, deterministic, and linear (distances along the axes mean what they say), so a report
can always draw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mtnorm.norm.routing import TaskHeads, tasks_of, use_task


def _task_heads(model: nn.Module) -> TaskHeads:
    found = [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, TaskHeads)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no mtnorm.TaskHeads: a task's representation is the input of "
            "its head, read from TaskHeads; build the model as nn.Sequential(encoder, "
            "mtnorm.TaskHeads({task: head})) (or the methods of mtnorm.models)"
        )
    if len(found) > 1:
        raise ValueError(
            f"the model has several TaskHeads ({[n for n, _ in found]}); which input is the task "
            "representation is ambiguous"
        )
    return found[0][1]


@torch.no_grad()
def task_representations(
    model: nn.Module, x: Any, tasks: Sequence[str] | None = None, train: bool = False
) -> dict[str, torch.Tensor]:
    """``{task: [N, D]}``: the input of task's head in the model's :class:`mtnorm.TaskHeads` under
    ``use_task(model, task)``, flattened after the batch dimension (a ``[N, C, H, W]`` feature map
    gives ``D = C·H·W``), detached.

    Runs in eval mode (running statistics, no dropout) unless ``train``; the training flags are
    restored. In training mode batch statistics are used and, as in any training pass, running
    statistics are updated. Raises ValueError for a model without TaskHeads.
    """
    heads = _task_heads(model)
    run = tuple(tasks) if tasks is not None else tasks_of(model)
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])

    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    out = {}
    try:
        for task in run:
            captured.clear()
            # the hook sits on the task's own head, not on TaskHeads: architectures (mtnorm.arch)
            # call the head modules of their TaskHeads directly
            handle = heads.heads[task].register_forward_pre_hook(hook)
            try:
                with use_task(model, task):
                    model(x)
            finally:
                handle.remove()
            if len(captured) != 1:
                raise RuntimeError(f"the head of task {task!r} ran {len(captured)} times in one pass")
            z = captured[0]
            out[task] = z.detach().reshape(z.shape[0], -1)
    finally:
        for m, flag in flags:
            m.training = flag
    return out


def pca_2d(features: torch.Tensor) -> np.ndarray:
    """``[M, 2]``: the centred rows of ``features`` (``[M, D]``) projected on the two leading
    principal directions (exact SVD in float64).

    Deterministic up to nothing: each direction's sign is fixed so that its largest-magnitude
    loading is positive (scikit-learn's ``svd_flip`` rule). With fewer than two non-degenerate
    directions (D < 2, M < 2, or constant rows) the missing coordinates are 0.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [M, D], got shape {tuple(features.shape)}")
    a = features.detach().double().cpu()
    a = a - a.mean(0, keepdim=True)
    out = np.zeros((a.shape[0], 2))
    if a.numel() == 0:
        return out
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    tol = s.max() * max(a.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    for k in range(min(2, s.numel())):
        if s[k] <= tol:
            break
        v = vh[k]
        v = v * torch.sign(v[v.abs().argmax()])
        out[:, k] = (a @ v).numpy()
    return out


def _tsne(features: torch.Tensor, perplexity: float | None, seed: int, threads: int | None) -> np.ndarray:
    try:
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn
    except ImportError as err:
        raise ImportError(
            "representation_embedding(method='tsne') needs scikit-learn: pip install scikit-learn "
            "(or use method='pca', which needs nothing extra)"
        ) from err
    m = features.shape[0]
    if m < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {m}")
    if perplexity is None:
        perplexity = min(30.0, (m - 1) / 3)  # sklearn's default 30, lowered for small sets
    if not 0 < perplexity < m:
        raise ValueError(f"perplexity must lie in (0, {m}) for {m} points, got {perplexity}")
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with threadpool_limits(threads, user_api="openmp"):
        coords = tsne.fit_transform(features.detach().double().cpu().numpy())
    return np.asarray(coords, dtype=np.float64)


def representation_embedding(
    model: nn.Module,
    x: Any,
    tasks: Sequence[str] | None = None,
    perplexity: float | None = None,
    seed: int = 0,
    method: str = "tsne",
    threads: int | None = 1,
) -> dict[str, np.ndarray]:
    """``{task: [N, 2]}`` float64: every task's representation of the N inputs ``x``
    (:func:`task_representations`, eval mode), embedded jointly in 2-D.

    One embedding of the ``[T·N, D]`` concatenation in task order, split back per task, so that
    all tasks share one coordinate system (paper Fig. 2 middle: well separated clusters = the
    tasks see the inputs differently).

    * ``method="tsne"``: scikit-learn's ``TSNE`` (PCA initialization, ``random_state=seed``, so
      repeated calls agree). ``perplexity`` defaults to ``min(30, (T·N − 1) / 3)``. Needs
      scikit-learn, an optional dependency: ImportError ("pip install scikit-learn") otherwise.
      ``threads``: OpenMP threads of its Barnes-Hut gradient (``None``: scikit-learn's default,
      all cores). Default 1: on a 2-core machine under load, 1 thread took 0.2 s / 2.6 s / 7.8 s
      for 30 / 300 / 1000 points, all cores 1.3 s / 11 s / 42 s (threads waiting on each other).
    * ``method="pca"``: :func:`pca_2d`, exact and deterministic, no extra dependency
      (``perplexity`` and ``seed`` are ignored).
    """
    if method not in ("tsne", "pca"):
        raise ValueError(f"unknown method {method!r}; choose 'tsne' or 'pca'")
    reps = task_representations(model, x, tasks)
    names = list(reps)
    joint = torch.cat([reps[t] for t in names])
    coords = _tsne(joint, perplexity, seed, threads) if method == "tsne" else pca_2d(joint)
    sizes = np.cumsum([0, *(reps[t].shape[0] for t in names)])
    return {t: coords[sizes[i] : sizes[i + 1]] for i, t in enumerate(names)}
