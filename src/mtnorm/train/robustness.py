"""Robustness to loss scales (paper §7.2): each task's loss scaled in turn, the others left at 1.

For every method of a grid, the unperturbed runs are repeated once per (task, scale) with
``loss_weights = {task: scale}``. The *relative performance* of a perturbed run is its Δm% against
the same method's unperturbed run with the same seed (how much the perturbation moved the method;
0 = unaffected). Per method we report mean, std, min and max over all perturbed runs; a robust
method has a small spread. The same runs are also scored against the unperturbed baseline
(``stl``) for comparison with the paper's Figure 5.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtnorm import metrics
from mtnorm.train.experiment import GridResult, Variant, run_grid
from mtnorm.train.report import fmt, markdown_table

DEFAULT_SCALES = (0.5, 1.5, 2.0)


@dataclass
class Perturbation:
    """One task's loss multiplied by ``scale``; the other tasks keep 1.0."""

    task: str
    scale: float

    @property
    def slug(self) -> str:
        return f"{self.task}_x{self.scale:g}"


@dataclass
class RobustnessResult:
    """The unperturbed grid and one grid per perturbation."""

    unperturbed: GridResult
    perturbed: dict[str, tuple[Perturbation, GridResult]] = field(default_factory=dict)
    seconds: float = 0.0


def perturbations(tasks: Sequence[str], scales: Sequence[float]) -> list[Perturbation]:
    """Every task with every scale (scale 1.0 is the unperturbed run and is skipped)."""
    return [Perturbation(t, s) for t in tasks for s in scales if s != 1.0]


def run_robustness(
    base: dict[str, Any],
    variants: Sequence[Variant],
    seeds: Sequence[int],
    scales: Sequence[float],
    out: str | Path,
    unperturbed: GridResult | None = None,
    log: Callable[[str], None] = print,
) -> RobustnessResult:
    """Run (or reuse ``unperturbed``) the plain grid, then one grid per (task, scale).

    Perturbed runs go to ``<out>/loss_<task>_x<scale>/``; ``base["loss_weights"]`` (if any) is
    the reference the perturbation multiplies.
    """
    out = Path(out)
    if unperturbed is None:
        unperturbed = run_grid(base, variants, seeds, out, log=log)
    first = next(iter(unperturbed.runs.values()))[0]
    tasks = list(first["metrics"])
    result = RobustnessResult(unperturbed, seconds=unperturbed.seconds)
    for p in perturbations(tasks, scales):
        values = copy.deepcopy(base)
        weights = dict(values.get("loss_weights") or {})
        weights[p.task] = weights.get(p.task, 1.0) * p.scale
        values["loss_weights"] = weights
        log(f"loss scale: {p.task} x{p.scale:g}")
        grid = run_grid(values, variants, seeds, out / f"loss_{p.slug}", log=log)
        result.perturbed[p.slug] = (p, grid)
        result.seconds += grid.seconds
    return result


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"runs": len(values), "mean": math.nan, "std": None, "min": math.nan, "max": math.nan}
    return {
        "runs": len(values),
        "mean": statistics.fmean(finite),
        "std": statistics.stdev(finite) if len(finite) > 1 else None,
        "min": min(finite),
        "max": max(finite),
    }


def _delta(run: dict[str, Any], reference: dict[str, Any], lower: set[str]) -> float:
    try:
        return metrics.delta_m(run, reference, lower)
    except ValueError:  # a reference metric of 0
        return math.nan


def relative_performance(result: RobustnessResult, baseline: str = "stl") -> dict[str, dict[str, Any]]:
    """Per variant: Δm% of every perturbed run vs its own unperturbed run (same seed) and vs the
    mean unperturbed ``baseline``; each list with its summary statistics."""
    plain = result.unperturbed
    lower = plain.lower_is_better
    base_runs = plain.runs.get(baseline)
    base_metrics = metrics.average_metrics([r["metrics"] for r in base_runs]) if base_runs else None
    out: dict[str, dict[str, Any]] = {}
    for label, runs in plain.runs.items():
        own = {r["seed"]: r["metrics"] for r in runs}
        vs_own, vs_base, detail = [], [], []
        for p, grid in result.perturbed.values():
            for r in grid.runs.get(label, []):
                d_own = _delta(r["metrics"], own[r["seed"]], lower)
                d_base = _delta(r["metrics"], base_metrics, lower) if base_metrics else math.nan
                vs_own.append(d_own)
                vs_base.append(d_base)
                detail.append(
                    {
                        "task": p.task,
                        "scale": p.scale,
                        "seed": r["seed"],
                        "vs_own": d_own,
                        f"vs_{baseline}": d_base,
                    }
                )
        out[label] = {"vs_own": _stats(vs_own), f"vs_{baseline}": _stats(vs_base), "runs": detail}
    return out


def robustness_table(data: dict[str, dict[str, Any]], key: str = "vs_own") -> str:
    """method | runs | mean rel. perf | std | min | max (Δm%, from :func:`relative_performance`)."""
    rows = []
    for label, entry in data.items():
        s = entry[key]
        rows.append(
            [
                label,
                str(s["runs"]),
                fmt(s["mean"]),
                fmt(s["std"]) if s["std"] is not None else "—",
                fmt(s["min"]),
                fmt(s["max"]),
            ]
        )
    return markdown_table(["Method", "runs", "mean rel. perf", "std", "min", "max"], rows)


def write_robustness(
    out: str | Path,
    own_table: str,
    base_table: str | None,
    data: dict[str, Any],
    scales: Sequence[float],
    baseline: str,
    seconds: float,
) -> Path:
    """``robustness.md`` (both tables) and ``robustness.json`` in ``out``; returns the .md path."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "robustness.md"
    text = f"Relative performance (Δm%) vs the method's own unperturbed run:\n\n{own_table}\n"
    if base_table is not None:  # None when the grid has no baseline runs
        text += f"\nΔm% vs unperturbed {baseline}:\n\n{base_table}\n"
    md.write_text(text)
    payload = {"scales": list(scales), "baseline": baseline, "seconds": seconds, "variants": data}
    (out / "robustness.json").write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    return md


def _label(slug: str) -> tuple[str, float | None]:
    method, sep, alpha = slug.partition("_alpha")
    return method, float(alpha) if sep else None


def _grid_from_folders(folder: Path, lower: set[str]) -> GridResult:
    """Finished runs ``<method>[_alpha<a>]-seed<k>/`` of ``folder`` (metrics of their last eval)."""
    from mtnorm.train.convergence import eval_history

    grid = GridResult(out=folder, lower_is_better=lower)
    for run in sorted(p for p in folder.glob("*-seed*") if p.is_dir()):
        slug, _, seed = run.name.rpartition("-seed")
        history = eval_history(run)
        if not history:
            continue
        method, alpha = _label(slug)
        label = Variant(method, alpha).label
        record = {"method": method, "alpha": alpha, "seed": int(seed), "metrics": history[-1][1]}
        record["epoch"] = history[-1][0]
        record["out"] = str(run)
        grid.runs.setdefault(label, []).append(record)
    return grid


def load_robustness(out: str | Path, lower_is_better: Sequence[str] = ()) -> RobustnessResult:
    """Rebuild a (possibly unfinished) robustness grid from its run folders.

    Only runs whose last evaluation is at the grid's final epoch (the largest seen) count, so an
    interrupted run is left out rather than scored half-trained.
    """
    out = Path(out)
    lower = set(lower_is_better)
    grids = {"": _grid_from_folders(out, lower)}
    for sub in sorted(out.glob("loss_*_x*")):
        grids[sub.name[len("loss_") :]] = _grid_from_folders(sub, lower)
    last = max((r["epoch"] for g in grids.values() for rs in g.runs.values() for r in rs), default=0)
    for g in grids.values():
        g.runs = {k: [r for r in rs if r["epoch"] == last] for k, rs in g.runs.items()}
        g.runs = {k: rs for k, rs in g.runs.items() if rs}
    result = RobustnessResult(grids.pop(""))
    for slug, grid in grids.items():
        task, _, scale = slug.rpartition("_x")
        if grid.runs:
            result.perturbed[slug] = (Perturbation(task, float(scale)), grid)
    return result
