"""Where results go: a JSONL + CSV (+ optional TensorBoard) logger, and Markdown tables."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def flatten(metrics: Mapping[str, Mapping[str, float]], prefix: str = "") -> dict[str, float]:
    """``{task: {name: v}}`` -> ``{"prefix<task>/<name>": v}``."""
    return {f"{prefix}{t}/{k}": v for t, m in metrics.items() for k, v in m.items()}


class MetricsLogger:
    """Appends one record per call to ``metrics.jsonl`` and ``metrics.csv`` in ``folder``.

    The CSV's columns are fixed by the first record of each kind (train vs eval go to separate
    files, ``train.csv`` and ``eval.csv``) so that every row lines up. TensorBoard is imported only
    when asked for and installed.
    """

    def __init__(self, folder: str | Path, tensorboard: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._columns: dict[str, list[str]] = {}
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                import warnings

                warnings.warn("tensorboard is not installed; logging to JSONL/CSV only", stacklevel=2)
            else:
                self._tb = SummaryWriter(str(self.folder / "tb"))

    def log(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
        """Record ``values`` of ``kind`` (``"train"`` or ``"eval"``) at global ``step``."""
        record = {"kind": kind, "step": step, **values}
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        path = self.folder / f"{kind}.csv"
        columns = self._columns.get(kind)
        if columns is None:
            if path.exists():  # a resumed run keeps the existing header
                with open(path) as f:
                    columns = next(csv.reader(f), None)
            columns = columns or list(record)
            self._columns[kind] = columns
            if not path.exists():
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerow(columns)
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow([record.get(c, "") for c in columns])
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def fmt(mean: float, std: float | None = None, digits: int = 2) -> str:
    """``"12.34"`` or ``"12.34 ± 0.56"``; NaN as ``"—"``."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if round(mean, digits) == 0:
        mean = 0.0  # no "-0.00" for a baseline compared with itself
    text = f"{mean:.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table, columns padded for reading in a terminal."""
    cells = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])
