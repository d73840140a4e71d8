"""Office-31 and Office-Home with LibMTL's list files; every domain is a task.

Layout (paths in the list files are relative to ``<root>``)::

    <root>/
    ├── data_txt/<dataset>/<domain>_train.txt, <domain>_val.txt, <domain>_test.txt
    │       one "relative/path/img.jpg <label>" per line
    └── <the image folders the list files point to>

``dataset`` is ``office-31`` (domains amazon, dslr, webcam; 31 classes) or ``office-home`` (Art,
Clipart, Product, Real_World; 65 classes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from mtnorm.data._errors import require
from mtnorm.data._images import read_image

OFFICE_DOMAINS: dict[str, tuple[str, ...]] = {
    "office-31": ("amazon", "dslr", "webcam"),
    "office-home": ("Art", "Clipart", "Product", "Real_World"),
}
OFFICE_CLASSES = {"office-31": 31, "office-home": 65}
_SPLITS = ("train", "val", "test")


def _tree(root: Path, dataset: str) -> str:
    domains = OFFICE_DOMAINS.get(dataset, ("<domain>",))
    lines = [f"{root}/", "├── data_txt/", f"│   └── {dataset}/"]
    lines += [f"│       ├── {d}_train.txt, {d}_val.txt, {d}_test.txt" for d in domains]
    lines.append("└── <image folders named in the list files>")
    return "\n".join(lines)


class Office(Dataset):
    """One domain (= task) and split of Office-31 / Office-Home: ``(image [3,S,S], label)``."""

    def __init__(
        self,
        root: str | Path,
        dataset: str = "office-31",
        domain: str = "amazon",
        split: str = "train",
        image_size: int | None = 224,
    ) -> None:
        if dataset not in OFFICE_DOMAINS:
            raise ValueError(f"dataset must be one of {tuple(OFFICE_DOMAINS)}, got {dataset!r}")
        if domain not in OFFICE_DOMAINS[dataset]:
            raise ValueError(f"{dataset} domains are {OFFICE_DOMAINS[dataset]}, got {domain!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        self.root = Path(root).expanduser()
        tree = _tree(self.root, dataset)
        list_file = require(self.root / "data_txt" / dataset / f"{domain}_{split}.txt", tree)
        entries = []
        for n, line in enumerate(list_file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{list_file}:{n}: expected '<path> <label>', got {line!r}")
            entries.append((parts[0], int(parts[1])))
        if not entries:
            raise ValueError(f"{list_file} lists no images")
        self.dataset, self.domain, self.split = dataset, domain, split
        self.paths = [self.root / p for p, _ in entries]
        self.labels = torch.tensor([label for _, label in entries], dtype=torch.long)
        self.num_classes = OFFICE_CLASSES[dataset]
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes:
            raise ValueError(f"{list_file}: labels must be in 0..{self.num_classes - 1}")
        require(self.paths[0], tree, f"(first image listed in {list_file})")
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_image(self.paths[i], self.image_size), self.labels[i]


def load_office(
    root: str | Path, dataset: str = "office-31", split: str = "train", image_size: int = 224
) -> dict[str, Office]:
    """All domains of ``dataset`` for one split: ``{domain: Office}`` (one task per domain)."""
    if dataset not in OFFICE_DOMAINS:
        raise ValueError(f"dataset must be one of {tuple(OFFICE_DOMAINS)}, got {dataset!r}")
    return {
        d: Office(root, dataset, d, split, image_size) for d in OFFICE_DOMAINS[dataset]
    }


def office_task_specs(dataset: str = "office-31") -> dict:
    from mtnorm.data.spec import office_specs

    return office_specs(OFFICE_DOMAINS[dataset], OFFICE_CLASSES[dataset])
