"""Convergence speed: epochs a run needs to reach 95% of its final score (AdaBN's claim).

The score of an evaluation is scale-free and needs no baseline:

    score_e = mean over tasks t of  m_t,e / m_t,final   (higher is better)
                                 or  m_t,final / m_t,e   (lower is better, inverted)

where ``m_t`` is the task's *primary* metric, its first reported one (``accuracy`` for
classification, ``miou`` for segmentation, ``abs`` for depth, ``mean`` for normals), ``m_t,e``
its value after epoch ``e`` and ``m_t,final`` its value at the run's last evaluation. The final
score is therefore 1. *Epochs to 95%* is the first evaluated epoch from which the score stays
at or above 0.95 until the end (a lucky early evaluation followed by a drop does not count).

The evaluations come from the run folder's ``metrics.jsonl`` (``kind == "eval"``), which the
trainer writes every ``eval_every`` epochs; with ``eval_every > 1`` the answer is only as fine as
the evaluation grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

History = list[tuple[int, dict[str, dict[str, float]]]]

FRACTION = 0.95


def eval_history(run_dir: str | Path) -> History:
    """``[(epoch, {task: {metric: value}}), ...]`` from a run folder, sorted by epoch.

    A resumed run may have evaluated an epoch twice; the last record of an epoch wins.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, dict[str, float]]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") != "eval":
            continue
        nested: dict[str, dict[str, float]] = {}
        for key, value in record.items():
            task, sep, name = key.partition("/")
            if sep and task != "loss" and isinstance(value, (int, float)):
                nested.setdefault(task, {})[name] = float(value)
        by_epoch[int(record["epoch"])] = nested
    return sorted(by_epoch.items())


def _ratio(value: float, final: float, lower: bool) -> float:
    num, den = (final, value) if lower else (value, final)
    if den == 0:
        return 1.0 if num == 0 else math.inf
    return num / den


def scores(history: History, lower_is_better: Collection[str] = ()) -> list[tuple[int, float]]:
    """``[(epoch, score_e)]``: each evaluation's primary metrics relative to the last one's."""
    if not history:
        return []
    final = history[-1][1]
    primary = {t: next(iter(m)) for t, m in final.items()}
    out = []
    for epoch, results in history:
        ratios = [
            _ratio(results[t][name], final[t][name], name in lower_is_better) for t, name in primary.items()
        ]
        out.append((epoch, sum(ratios) / len(ratios)))
    return out


def epochs_to_fraction(
    history: History, lower_is_better: Collection[str] = (), fraction: float = FRACTION
) -> int | None:
    """The first epoch from which the score stays >= ``fraction`` of the final one (None: no evals)."""
    series = scores(history, lower_is_better)
    if not series:
        return None
    reached = series[-1][0]
    for epoch, score in reversed(series):
        if score < fraction:
            break
        reached = epoch
    return reached


def run_epochs_to_fraction(
    run: Mapping[str, object], lower_is_better: Collection[str] = (), fraction: float = FRACTION
) -> int | None:
    """:func:`epochs_to_fraction` of a grid run record (its ``out`` folder); None without history."""
    out = run.get("out")
    return epochs_to_fraction(eval_history(str(out)), lower_is_better, fraction) if out else None


def summarize_epochs(values: Sequence[int | None]) -> dict[str, object] | None:
    """Mean, sample std (None for one run) and the values; None when any run lacks a history."""
    if not values or any(v is None for v in values):
        return None
    nums = [float(v) for v in values if v is not None]
    mean = sum(nums) / len(nums)
    std = None
    if len(nums) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in nums) / (len(nums) - 1))
    return {"mean": mean, "std": std, "values": list(values)}
