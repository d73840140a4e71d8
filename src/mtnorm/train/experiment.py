"""Grids of runs (methods x seeds x α) and their summary: #P, metrics, Δm% against STL.

Used by ``mtnorm run`` (embedded presets) and ``mtnorm bench`` (a config file). Every run is an
ordinary :class:`~mtnorm.train.trainer.Trainer` run in its own folder; the summary is written as
``summary.md`` and ``summary.json`` next to them.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtnorm import metrics
from mtnorm.profile import profile
from mtnorm.train import convergence
from mtnorm.train.config import Config, config_from_dict, to_dict
from mtnorm.train.report import fmt, markdown_table
from mtnorm.train.trainer import Trainer

PRESETS: dict[str, dict[str, Any]] = {
    # Sized on the 2-core CPU this was developed on: STL+HPS+TSBN+TSσBN take about 4 minutes on
    # the idle machine, data generation included (docs/training.md has the measurement).
    "multifashion": {
        "epochs": 6,
        "data": {"name": "multifashion", "n_train": 24_000, "n_test": 6_000, "batch_size": 128},
        "model": {"width": 16, "hidden": 128},
        "optim": {"name": "adam", "lr": 1e-3},
    },
    "scenes": {
        "epochs": 5,
        "data": {"name": "scenes", "n_train": 1_500, "n_test": 300, "batch_size": 32, "eval_batch_size": 100},
        "model": {"width": 16, "levels": 3},
        "optim": {"name": "adam", "lr": 1e-3},
    },
}
DEFAULT_METHODS = ("stl", "hps", "tsbn", "tssbn")


@dataclass
class Variant:
    """One row of the summary: a method, optionally with a fixed α (``norm_lr_mult``)."""

    method: str
    alpha: float | None = None

    @property
    def label(self) -> str:
        return self.method if self.alpha is None else f"{self.method} (α={self.alpha:g})"


@dataclass
class GridResult:
    """All runs of a grid, grouped by variant label."""

    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    out: Path = Path(".")
    seconds: float = 0.0
    lower_is_better: set[str] = field(default_factory=set)


def _options(options: Any) -> str:
    if not isinstance(options, dict) or not options:
        return ""
    return "(" + ",".join(f"{k}={options[k]}" for k in sorted(options)) + ")"


def balancer_label(name: str, kwargs: dict[str, Any]) -> str:
    """The balancer of a run as a table label: its name and options, with DB-MTL's halves when
    switched on, so runs that differ only in those land in separate rows: ``ew`` + ``log_losses``
    -> ``"log_losses"``, ``pcgrad`` + ``log_losses`` -> ``"pcgrad+log_losses"``, ``db_mtl`` with
    ``beta=0`` -> ``"db_mtl(beta=0)"``, ``ew`` + ``max_norm={"beta": 0}`` -> ``"max_norm(beta=0)"``."""
    own = {k: v for k, v in kwargs.items() if k not in ("log_losses", "max_norm", "tasks", "seed")}
    halves = ["log_losses"] if kwargs.get("log_losses") else []
    if kwargs.get("max_norm"):
        halves.append("max_norm" + _options(kwargs["max_norm"]))
    parts = ([] if name == "ew" and halves and not own else [name + _options(own)]) + halves
    return "+".join(parts)


def variant_config(base: dict[str, Any], variant: Variant, seed: int, out: Path) -> Config:
    """The config of one run of the grid."""
    values = copy.deepcopy(base)
    values["method"] = variant.method
    values["seed"] = seed
    slug = variant.method if variant.alpha is None else f"{variant.method}_alpha{variant.alpha:g}"
    values["out"] = str(out / f"{slug}-seed{seed}")
    if variant.alpha is not None:
        values.setdefault("optim", {})["norm_lr_mult"] = variant.alpha
    return config_from_dict(values)


RECORD = "record.json"
"""What a grid writes into a run's folder when the run has finished: its row of the summary."""


def run_grid(
    base: dict[str, Any],
    variants: Sequence[Variant],
    seeds: Sequence[int],
    out: str | Path,
    log: Callable[[str], None] = print,
    resume: bool = False,
) -> GridResult:
    """Train every variant with every seed; returns their final test metrics and sizes.

    ``resume=True`` continues a grid in ``out`` that was interrupted: finished runs (those with a
    ``record.json``) are read back, not retrained; a run that stopped midway continues from its
    ``last.pt`` (bit-identical to an uninterrupted run); the others start.
    """
    out = Path(out)
    result = GridResult(out=out)
    start = time.perf_counter()
    for variant in variants:
        for seed in seeds:
            cfg = variant_config(base, variant, seed, out)
            done = Path(cfg.out) / RECORD
            if resume and done.is_file():
                record = json.loads(done.read_text())
                result.runs.setdefault(variant.label, []).append(record)
                result.lower_is_better |= set(record.get("lower_is_better", []))
                log(f"  {variant.label} seed {seed}: finished before, read from {done}")
                continue
            trainer = Trainer(cfg, log=log)
            # a run killed before its first checkpoint left only logs: it starts again
            checkpoint = (Path(cfg.out) / "last.pt").is_file()
            run = trainer.fit(resume=resume and checkpoint, overwrite=resume and not checkpoint)
            result.lower_is_better = set(trainer.lower_is_better)
            if run.status != "finished":
                raise KeyboardInterrupt
            record = {
                "method": variant.method,
                "alpha": variant.alpha,
                "seed": seed,
                "balancer": balancer_label(cfg.balancer, cfg.balancer_kwargs),
                "parameters": run.parameters,
                # forward FLOPs of all tasks on two inputs (paper's #F; ratios in the summary)
                "flops": profile(trainer.model, trainer.example_input().to(trainer.device)).flops,
                "metrics": run.metrics,
                "seconds": run.seconds,
                "out": str(run.out),
                "lower_is_better": sorted(trainer.lower_is_better),
            }
            if variant.method == "tssbn":
                from mtnorm.analysis.capacity import capacity_split, importance_vectors

                record["capacity"] = capacity_split(importance_vectors(trainer.model), trainer.tasks)
            done.write_text(json.dumps(record, indent=1) + "\n")
            result.runs.setdefault(variant.label, []).append(record)
            summary = ", ".join(f"{t}/{k}={v:.4f}" for t, m in run.metrics.items() for k, v in m.items())
            log(f"  {variant.label} seed {seed}: {summary} ({run.seconds:.0f}s)")
            if run.signal is not None:  # asked to stop during the run's final save: keep it, stop here
                raise KeyboardInterrupt
    result.seconds = time.perf_counter() - start
    return result


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def summarize(
    result: GridResult,
    baseline: str = "stl",
    columns: Sequence[str] | None = None,
    seeds_column: bool = False,
    delta_over: Sequence[str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """A Markdown table (#P relative to the baseline, every metric, Δm%) and its JSON form.

    ``columns`` (``"task/metric"`` names) picks the metric columns shown. Δm% is over every metric
    unless ``delta_over`` names the ones it uses (the paper's CelebA Δ% counts F1 only, not the
    accuracy beside it). ``seeds_column`` adds the seeds of each row (for grids with unequal rows).
    """
    labels = list(result.runs)
    first = result.runs[labels[0]][0]
    every = [(t, k) for t, m in first["metrics"].items() for k in m]
    columns = every if columns is None else _metric_names(columns, every, "metric column")
    lower = result.lower_is_better
    base_runs = result.runs.get(baseline)
    base_params = base_runs[0]["parameters"] if base_runs else None
    base_flops = base_runs[0].get("flops") if base_runs else None
    with_flops = all("flops" in runs[0] for runs in result.runs.values())  # grids from before #F
    counted = every if delta_over is None else _metric_names(delta_over, every, "Δm% metric")
    base_metrics = _only(_mean_metrics(base_runs), counted) if base_runs else None

    header = ["Method", *(["seeds"] if seeds_column else []), "#P", *(["#F"] if with_flops else [])]
    header += [f"{t} {k}" for t, k in columns]
    if base_runs:
        header.append(f"Δm% vs {baseline}")
    # per-epoch evaluations -> epochs to reach 95% of the final score (mtnorm.train.convergence)
    speed = {
        label: convergence.summarize_epochs([convergence.run_epochs_to_fraction(r, lower) for r in runs])
        for label, runs in result.runs.items()
    }
    if any(v is not None for v in speed.values()):
        header.append("epochs to 95%")
    rows, data = [], {}
    for label in labels:
        runs = result.runs[label]
        params = runs[0]["parameters"]
        seeds = [r["seed"] for r in runs]
        row = [label, *([",".join(map(str, seeds))] if seeds_column else [])]
        row.append(f"{params / base_params:.2f}" if base_params else str(params))
        entry: dict[str, Any] = {"parameters": params, "seeds": seeds, "metrics": {}}
        if with_flops:
            flops = runs[0]["flops"]
            row.append(f"{flops / base_flops:.2f}" if base_flops else f"{flops:.3g}")
            entry["flops"] = flops
        for t, k in every:
            mean, std = _mean_std([r["metrics"][t][k] for r in runs])
            entry["metrics"][f"{t}/{k}"] = {"mean": mean, "std": std}
        for t, k in columns:
            mean, std = entry["metrics"][f"{t}/{k}"].values()
            scale = 100.0 if _is_fraction(k) else 1.0
            digits = 2 if scale != 1.0 or abs(mean) >= 1 else 4  # small errors need more digits
            row.append(fmt(mean * scale, None if std is None else std * scale, digits))
        if base_runs:
            try:
                dm, dm_std = metrics.delta_m_over_seeds(
                    [_only(r["metrics"], counted) for r in runs], base_metrics, lower
                )
            except ValueError:  # a baseline metric of 0 (e.g. an untrained run): no relative gain
                dm, dm_std = math.nan, math.nan
            row.append(fmt(dm, dm_std if len(runs) > 1 else None))
            entry["delta_m"] = {"mean": dm, "std": dm_std if len(runs) > 1 else None}
        if "epochs to 95%" in header:
            conv = speed[label]
            row.append("—" if conv is None else fmt(conv["mean"], conv["std"], 1))
            entry["epochs_to_95"] = conv
        if "capacity" in runs[0]:
            entry["capacity"] = runs[0]["capacity"]
        rows.append(row)
        data[label] = entry
    return markdown_table(header, rows), data


def per_seed_delta_m(
    result: GridResult, baseline: str = "stl", delta_over: Sequence[str] | None = None
) -> tuple[str, dict[str, dict[int, float]]]:
    """Δm% of every run against the baseline's mean, one column per seed, and each row's rank per
    seed (1 = best): whether an ordering of the rows holds seed by seed or only on average.
    ``delta_over`` as in :func:`summarize`.

    Raises:
        KeyError: no runs of ``baseline``.
    """
    if baseline not in result.runs:
        raise KeyError(f"per_seed_delta_m: no {baseline!r} runs; the rows are {list(result.runs)}")
    base_runs = result.runs[baseline]
    every = [(t, k) for t, m in base_runs[0]["metrics"].items() for k in m]
    counted = every if delta_over is None else _metric_names(delta_over, every, "Δm% metric")
    base = _only(_mean_metrics(base_runs), counted)
    lower = result.lower_is_better
    values = {
        label: {r["seed"]: metrics.delta_m(_only(r["metrics"], counted), base, lower) for r in runs}
        for label, runs in result.runs.items()
    }
    seeds = sorted({seed for row in values.values() for seed in row})
    ranks: dict[int, dict[str, int]] = {}
    for seed in seeds:
        order = sorted((label for label in values if seed in values[label]), key=lambda lb: -values[lb][seed])
        ranks[seed] = {label: i + 1 for i, label in enumerate(order)}
    header = ["Method", *(f"seed {s}" for s in seeds), *(f"rank {s}" for s in seeds)]
    rows = [
        [
            label,
            *(fmt(row[s], None) if s in row else "—" for s in seeds),
            *(str(ranks[s][label]) if label in ranks[s] else "—" for s in seeds),
        ]
        for label, row in values.items()
    ]
    return markdown_table(header, rows), values


def seed_agreement(values: dict[str, dict[int, float]]) -> str:
    """One line on how far the seeds agree on the order of the rows: Kendall's W
    (:func:`mtnorm.metrics.kendall_w`) over every seed, on the rows that have all of them.
    ``values`` is :func:`per_seed_delta_m`'s second result."""
    seeds = sorted({seed for row in values.values() for seed in row})
    labels = [label for label, row in values.items() if set(row) == set(seeds)]
    if len(seeds) < 2 or len(labels) < 2:
        return f"Kendall's W: needs 2 rows that have every seed {seeds}; {len(labels)} of the rows do"
    w, p = metrics.kendall_w([[values[label][seed] for label in labels] for seed in seeds])
    left_out = len(values) - len(labels)
    return (
        f"Kendall's W over seeds {','.join(map(str, seeds))} of the {len(labels)} rows that have "
        f"all of them{f' ({left_out} left out)' if left_out else ''}: {w:.2f} (1 = every seed "
        f"orders the rows the same, 0 = no agreement; Friedman p = {p:.2g})"
    )


def _metric_names(names: Sequence[str], every: list[tuple[str, str]], what: str) -> list[tuple[str, str]]:
    """``"task/metric"`` strings as pairs, each checked against the runs' metrics."""
    unknown = [c for c in names if tuple(c.split("/", 1)) not in every]
    if unknown:
        have = ", ".join(f"{t}/{k}" for t, k in every)
        raise ValueError(f"unknown {what}(s) {unknown}; the runs have {have}")
    return [tuple(c.split("/", 1)) for c in names]  # type: ignore[misc]


def _mean_metrics(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return metrics.average_metrics([r["metrics"] for r in runs])


def _only(nested: dict[str, dict[str, float]], names: list[tuple[str, str]]) -> dict[str, dict[str, float]]:
    """The ``(task, metric)`` entries of ``names`` from ``{task: {metric: value}}``, in its order."""
    out: dict[str, dict[str, float]] = {}
    for task, name in names:
        out.setdefault(task, {})[name] = nested[task][name]
    return out


def _is_fraction(name: str) -> bool:
    """Metrics in [0, 1] that read better as percentages."""
    return name in ("accuracy", "miou", "pixel_acc", "f1") or name.startswith("within")


def write_summary(result: GridResult, table: str, data: dict[str, Any], base: dict[str, Any]) -> Path:
    """``summary.md`` and ``summary.json`` in the grid's folder; returns the folder."""
    result.out.mkdir(parents=True, exist_ok=True)
    (result.out / "summary.md").write_text(table + "\n")
    payload = {
        "config": base,
        "seconds": result.seconds,
        "lower_is_better": sorted(result.lower_is_better),
        "variants": data,
        "runs": result.runs,
    }
    (result.out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    return result.out


def load_grid(folder: str | Path, lower_is_better: Sequence[str] | None = None) -> GridResult:
    """The :class:`GridResult` of a finished grid from its ``summary.json`` (to summarize again).

    ``lower_is_better`` is read from the file when it was stored, else taken from the argument.
    """
    folder = Path(folder)
    payload = json.loads((folder / "summary.json").read_text())
    lower = payload.get("lower_is_better", lower_is_better or [])
    return GridResult(
        runs=payload["runs"], out=folder, seconds=payload["seconds"], lower_is_better=set(lower)
    )


def load_records(
    folder: str | Path | Sequence[str | Path], order: Sequence[str] = ()
) -> GridResult:
    """The :class:`GridResult` of the finished runs under ``folder`` (every ``*/record.json``), e.g.
    of a grid still running or stopped midway; several folders gather the runs of several grids
    (per-seed grids run in parallel, or a grid continued elsewhere).

    Rows follow ``order`` (variant labels, e.g. the ``--methods`` of the grid), then the remaining
    labels alphabetically; each row's runs are ordered by seed. A run with a balancer other than
    equal weighting is labelled ``<variant>+<balancer>`` (e.g. ``tssbn+db_mtl``), so grids that
    differ only in the balancer gather into separate rows (records without one count as ``ew``).

    Raises:
        FileNotFoundError: no finished run under any of the folders.
        ValueError: two folders hold the same variant and seed (the table would count it twice).
    """
    folders = [Path(folder)] if isinstance(folder, (str, Path)) else [Path(f) for f in folder]
    paths = [p for f in folders for p in sorted(f.glob("*/record.json"))]
    if not paths:
        raise FileNotFoundError(f"no finished runs (*/record.json) under {', '.join(map(str, folders))}")
    groups: dict[str, list[dict[str, Any]]] = {}
    where: dict[tuple[str, int], Path] = {}
    records = [(json.loads(p.read_text()), p) for p in paths]
    for record, path in records:
        # records copied away from their run (e.g. kept in docs/results with the run's metrics.jsonl):
        # the evaluation history is read beside the record
        own = record.get("out")
        moved = own is None or not (Path(own) / "metrics.jsonl").is_file()
        if moved and (path.parent / "metrics.jsonl").is_file():
            record["out"] = str(path.parent)
    for record, path in sorted(records, key=lambda rp: rp[0]["seed"]):
        label = Variant(record["method"], record.get("alpha")).label
        if record.get("balancer", "ew") != "ew":
            label += f"+{record['balancer']}"
        key = (label, record["seed"])
        if key in where:
            raise ValueError(f"{label} seed {record['seed']} is in both {where[key]} and {path}; keep one")
        where[key] = path
        groups.setdefault(label, []).append(record)
    rank = {label: i for i, label in enumerate(order)}
    labels = sorted(groups, key=lambda label: (rank.get(label, len(rank)), label))
    lower = {name for r, _ in records for name in r.get("lower_is_better", [])}
    return GridResult(runs={label: groups[label] for label in labels}, out=folders[0], lower_is_better=lower)


def at_epoch(result: GridResult, epoch: int) -> GridResult:
    """The grid as it stood after ``epoch``: each run's metrics replaced by its evaluation of that
    epoch (from ``metrics.jsonl``), e.g. to check whether the rows' order at a shorter budget
    survives a longer one, from the same runs. Epochs-to-95% are then of the full runs.

    Raises:
        ValueError: a run has no evaluation of ``epoch`` (no history, or it stopped before).
    """
    runs: dict[str, list[dict[str, Any]]] = {}
    for label, records in result.runs.items():
        runs[label] = []
        for record in records:
            history = dict(convergence.eval_history(record["out"])) if record.get("out") else {}
            if epoch not in history:
                have = sorted(history) or "none"
                raise ValueError(
                    f"{label} seed {record['seed']} has no evaluation of epoch {epoch} (epochs: {have})"
                )
            runs[label].append({**record, "metrics": history[epoch]})
    return GridResult(runs=runs, out=result.out, lower_is_better=result.lower_is_better)


def base_from_config(cfg: Config) -> dict[str, Any]:
    """A config as the base dict of a grid (method/seed/out are set per run)."""
    return to_dict(cfg)
