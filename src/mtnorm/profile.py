"""#P/#F profile of a model: trainable parameters and forward FLOPs (paper Tables 1-4).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts a multiply-add as 2 FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Profile:
    """Parameter count and forward FLOPs; ratios are relative to a baseline model when one is given."""

    params: int
    flops: int
    params_ratio: float | None = None
    flops_ratio: float | None = None


def _count(model: nn.Module, example_input: object) -> tuple[int, int]:
    from mtnorm.norm import TaskRouted, forward_tasks

    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counter = FlopCounterMode(display=False)
    training = model.training
    model.eval()  # counting must not move running statistics
    try:
        with torch.no_grad(), counter:
            if any(isinstance(m, TaskRouted) for m in model.modules()):
                # a multi-task model: the FLOPs of producing every task's output (T task passes for
                # task-specific norms, one pass for hard sharing), as the paper's #F counts them
                forward_tasks(model, example_input, mode="sequential")
            else:
                model(example_input)
    finally:
        model.train(training)
    return params, counter.get_total_flops()


def profile(model: nn.Module, example_input: object, baseline: nn.Module | None = None) -> Profile:
    """Count #P (trainable parameters) and #F (forward FLOPs) of ``model`` on ``example_input``.

    With ``baseline`` (e.g. the HPS model), also report #P and #F as ratios to it, as the paper's tables do.
    """
    params, flops = _count(model, example_input)
    if baseline is None:
        return Profile(params, flops)
    base_params, base_flops = _count(baseline, example_input)
    if base_params == 0 or base_flops == 0:
        raise ValueError("baseline has no trainable parameters or no FLOPs; pass a real baseline model")
    return Profile(params, flops, params / base_params, flops / base_flops)


def encoder_growth(
    methods: Sequence[str],
    backbone_factory: Callable[[str], nn.Module],
    example_input: torch.Tensor,
    task_counts: Sequence[int],
) -> dict[str, list[dict[str, int]]]:
    """#P and #F of each method's encoder as the number of tasks grows (paper Fig. 2 right).

    Each method is built with ``T`` tasks named ``t1..tT`` and identity heads, so every counted
    parameter and FLOP is the encoder's (experts, columns, attention branches, gates and task norms
    included). Returns ``{method: [{"tasks": T, "params": ..., "flops": ...}, ...]}``.
    """
    from mtnorm.models.methods import build_method

    if not task_counts or any(t < 1 for t in task_counts):
        raise ValueError(f"task counts must be positive integers, got {list(task_counts)}")
    out: dict[str, list[dict[str, int]]] = {}
    for method in methods:
        rows = []
        for t in task_counts:
            tasks = [f"t{i + 1}" for i in range(t)]
            torch.manual_seed(0)
            heads = {k: nn.Identity() for k in tasks}
            model = build_method(method, backbone_factory, tasks, heads, example_input=example_input)
            params, flops = _count(model, example_input)
            rows.append({"tasks": t, "params": params, "flops": flops})
        out[method] = rows
    return out


def plot_encoder_growth(growth: dict[str, list[dict[str, int]]], path: str | Path, title: str = "") -> Path:
    """Encoder parameters (left) and forward FLOPs per input (right) against the number of tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, rows in growth.items():
        tasks = [r["tasks"] for r in rows]
        axes[0].plot(tasks, [r["params"] / 1e6 for r in rows], marker="o", label=method)
        axes[1].plot(tasks, [r["flops"] / 1e6 for r in rows], marker="o", label=method)
    for ax, label in zip(axes, ("encoder parameters (M)", "forward MFLOPs, all tasks (batch of 2)")):
        ax.set_xlabel("number of tasks")
        ax.set_ylabel(label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
