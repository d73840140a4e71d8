"""QM9 through torch_geometric (optional extra ``mtnorm[graph]``), imported lazily.

The 11 regression targets of the Nash-MTL / FAMO protocol, by column of
``torch_geometric.datasets.QM9``'s ``y``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

QM9_TARGETS: dict[str, int] = {
    "mu": 0,
    "alpha": 1,
    "homo": 2,
    "lumo": 3,
    "r2": 5,
    "zpve": 6,
    "U0": 12,
    "U": 13,
    "H": 14,
    "G": 15,
    "c_v": 11,
}


def load_qm9(root: str | Path) -> Any:
    """``torch_geometric.datasets.QM9(root)``; its ``y[:, QM9_TARGETS[name]]`` are the tasks.

    torch_geometric downloads the raw files into ``root`` itself when they are missing.
    """
    try:
        from torch_geometric.datasets import QM9
    except ImportError as err:
        raise ImportError(
            "load_qm9 needs torch_geometric, an optional dependency: "
            "`pip install torch_geometric` (or `pip install 'mtnorm[graph]'`)"
        ) from err
    return QM9(str(Path(root).expanduser()))


def qm9_task_specs() -> dict:
    from mtnorm.data.spec import qm9_specs

    return qm9_specs(tuple(QM9_TARGETS))
