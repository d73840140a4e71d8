"""The inner loops: batching a split, one training step, and evaluation over a split."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mtnorm.data.spec import TaskSpec
from mtnorm.norm import forward_tasks
from mtnorm.train.benchmarks import Split
from mtnorm.train.losses import LossFn

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch).

    Deriving it from the epoch rather than from a running generator is what makes a resumed run
    see exactly the batches an uninterrupted one would.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen)


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch; the last partial batch is dropped (BatchNorm dislikes tiny batches)."""
    return max(n // batch_size, 1)


def take(split: Split, index: torch.Tensor, device: torch.device) -> Batch:
    """The samples ``index`` of a split, on ``device``."""
    if split.inputs is not None:
        x = split.inputs[index]
        y = {t: v[index] for t, v in split.targets.items()}
    else:
        items = [split.dataset[int(i)] for i in index]
        x = torch.stack([it[0] for it in items])
        y = {t: torch.stack([torch.as_tensor(it[1][t]) for it in items]) for t in items[0][1]}
    return x.to(device, non_blocking=True), {t: v.to(device, non_blocking=True) for t, v in y.items()}


def train_batches(
    split: Split, batch_size: int, seed: int, epoch: int, start: int = 0
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(step_in_epoch, indices)`` of the global batches of one epoch, from batch ``start`` on."""
    order = epoch_order(len(split), seed, epoch)
    for b in range(start, num_batches(len(split), batch_size)):
        yield b, order[b * batch_size : (b + 1) * batch_size]


def task_losses(
    outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], losses: Mapping[str, LossFn]
) -> dict[str, torch.Tensor]:
    """``{task: scalar loss}``, computed in fp32 whatever precision produced the outputs."""
    return {t: fn(outputs[t].float(), targets[t]) for t, fn in losses.items()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    specs: Mapping[str, TaskSpec],
    losses: Mapping[str, LossFn],
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
    forward_mode: str = "auto",
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Metrics ``{task: {name: value}}`` and mean losses ``{task: value}`` over a whole split."""
    was_training = model.training
    model.eval()
    accs = {t: spec.metric() for t, spec in specs.items()}
    loss_sums = dict.fromkeys(specs, 0.0)
    n = len(split)
    try:
        for start in range(0, n, batch_size):
            x, y = take(split, torch.arange(start, min(start + batch_size, n)), device)
            with autocast():
                out = forward_tasks(model, x, mode=forward_mode)
            for t, loss in task_losses(out, y, losses).items():
                loss_sums[t] += float(loss) * x.shape[0]
                accs[t].update(out[t].float(), y[t])
    finally:
        model.train(was_training)
    return {t: a.compute() for t, a in accs.items()}, {t: s / n for t, s in loss_sums.items()}
