"""Shared reader for the MTAN-style dense layouts: ``<root>/<split>/<folder>/<i>.npy``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mtnorm.data._errors import DatasetLayoutError, require


def tree(root: Path, folders: tuple[str, ...], splits: tuple[str, ...]) -> str:
    """The expected layout, drawn as a small tree for error messages."""
    lines = [f"{root}/"]
    for s, split in enumerate(splits):
        last_split = s == len(splits) - 1
        lines.append(f"{'└' if last_split else '├'}── {split}/")
        pad = "    " if last_split else "│   "
        for f, folder in enumerate(folders):
            branch = "└" if f == len(folders) - 1 else "├"
            lines.append(f"{pad}{branch}── {folder}/0.npy, 1.npy, ...")
    return "\n".join(lines)


class NpyDenseDataset(Dataset):
    """Pairs an ``image`` folder with one folder per task, all holding ``<i>.npy`` files.

    Subclasses set ``folders`` ({task: folder}), ``splits`` and convert arrays in ``_convert``.
    The file indices must agree across folders; a missing folder or file raises
    :class:`DatasetLayoutError` naming it and showing the expected tree.
    """

    folders: dict[str, str] = {}
    splits: tuple[str, ...] = ("train", "val")
    split_aliases: dict[str, str] = {"test": "val"}

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root = Path(root).expanduser()
        split = self.split_aliases.get(split, split)
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")
        self.split = split
        expected = tree(self.root, ("image", *self.folders.values()), self.splits)
        base = require(self.root / split, expected)
        image_dir = require(base / "image", expected)
        self.indices = sorted(int(p.stem) for p in image_dir.glob("*.npy") if p.stem.isdigit())
        if not self.indices:
            raise DatasetLayoutError(image_dir / "0.npy", expected, "no <i>.npy files found")
        for folder in self.folders.values():
            task_dir = require(base / folder, expected)
            for i in self.indices:  # a cheap stat per file; catches partial copies up front
                require(task_dir / f"{i}.npy", expected)
        self._image_dir = image_dir
        self._task_dirs = {task: base / folder for task, folder in self.folders.items()}

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.folders)

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, folder: Path, i: int) -> np.ndarray:
        path = folder / f"{i}.npy"
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {path}: {err}") from err

    def _convert(self, task: str, array: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        i = self.indices[index]
        image = self._load(self._image_dir, i)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{self._image_dir / f'{i}.npy'}: expected [H,W,3], got {image.shape}")
        targets = {
            task: self._convert(task, self._load(folder, i))
            for task, folder in self._task_dirs.items()
        }
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(), targets


def hw_label(array: np.ndarray) -> torch.Tensor:
    """[H,W] (or [H,W,1]) class map -> long [H,W], ignore value kept as -1."""
    return torch.from_numpy(np.asarray(array).reshape(array.shape[:2]).astype(np.int64))


def chw(array: np.ndarray) -> torch.Tensor:
    """[H,W,C] or [H,W] float map -> float [C,H,W]."""
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
