"""CelebA (aligned) as 40 binary tasks, images resized to 64x64 as in FAMO (Liu et al. 2023).

Layout::

    <root>/
    ├── img_align_celeba/000001.jpg, 000002.jpg, ...
    ├── list_attr_celeba.txt       (count line, 40 attribute names, then "<file> ±1 x40")
    └── list_eval_partition.txt    ("<file> 0|1|2" = train|val|test)

Attributes -1/1 become 0/1. Items: image float [3,64,64] in [0,1] and ``{attribute: float 0/1}``;
``.attributes`` holds the whole split as a float [N,40] tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mtnorm.data._errors import require
from mtnorm.data._images import read_image

_SPLITS = {"train": 0, "val": 1, "test": 2}
_TREE = """<root>/
├── img_align_celeba/000001.jpg, 000002.jpg, ...
├── list_attr_celeba.txt
└── list_eval_partition.txt"""


def read_attributes(path: Path) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """Parse list_attr_celeba.txt: (attribute names, file names, int8 [N,A] in {0,1})."""
    lines = path.read_text().split("\n")
    try:
        count = int(lines[0].strip())
        names = tuple(lines[1].split())
        rows = [line.split() for line in lines[2 : 2 + count]]
        files = [r[0] for r in rows]
        values = np.array([r[1:] for r in rows], dtype=np.int8)
    except (IndexError, ValueError) as err:
        raise ValueError(f"{path}: not in list_attr_celeba.txt format ({err})") from err
    if values.shape != (count, len(names)) or not np.isin(values, (-1, 1)).all():
        raise ValueError(f"{path}: expected {count} rows of {len(names)} values in {{-1, 1}}")
    return names, files, (values > 0).astype(np.int8)


class CelebA(Dataset):
    """CelebA split with one binary task per attribute (see module docstring for the layout)."""

    def __init__(
        self, root: str | Path, split: str = "train", image_size: int | None = 64
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        self.root = Path(root).expanduser()
        tree = _TREE.replace("<root>", str(self.root))
        self.image_dir = require(self.root / "img_align_celeba", tree)
        attr_path = require(self.root / "list_attr_celeba.txt", tree)
        part_path = require(self.root / "list_eval_partition.txt", tree)
        names, files, values = read_attributes(attr_path)
        rows = [line.split() for line in part_path.read_text().splitlines() if line.strip()]
        if any(len(r) != 2 for r in rows):
            raise ValueError(f"{part_path}: expected '<file> <0|1|2>' on every line")
        partition = dict(rows)
        missing = [f for f in files if f not in partition]
        if missing:
            raise ValueError(f"{part_path}: no partition for {missing[:3]} ...")
        keep = np.array([int(partition[f]) == _SPLITS[split] for f in files], dtype=bool)
        self.split = split
        self.tasks: tuple[str, ...] = names
        self.files = [f for f, k in zip(files, keep, strict=True) if k]
        self.attributes = torch.from_numpy(values[keep].astype(np.float32))
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = read_image(self.image_dir / self.files[i], self.image_size)
        row = self.attributes[i]
        return image, {task: row[j] for j, task in enumerate(self.tasks)}

    def task_specs(self) -> dict:
        from mtnorm.data.spec import celeba_specs

        return celeba_specs(self.tasks)
