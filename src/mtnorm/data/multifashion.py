"""MultiFashion: two overlapping Fashion-MNIST items per canvas, one task per item.

The two-task classification benchmark of Lin et al. (2019), "Pareto Multi-Task Learning"
(MultiMNIST's recipe applied to Fashion-MNIST). Recipe used here:

* canvas 36x36, zeros;
* "left" item (28x28) pasted with its top-left corner at (dy, dx), dy, dx ~ U{0..4}, i.e. the
  top-left corner shifted by up to 4 pixels; "right" item at (dy, dx) ~ U{4..8} each, i.e. the
  bottom-right corner shifted by up to 4 pixels. The two overlap in the middle: pixel-wise max;
* the two items are distinct images drawn uniformly from the split's own source images, so test
  canvases are built only from Fashion-MNIST test images;
* everything is a function of ``seed`` (numpy PCG64 seeded with ``(seed, split)``).

Beside ``left`` and ``right`` the split carries ten image-level attributes ``has_<class>`` ("is an
item of this class on the canvas?", 0/1; 19 % positive on average), derived from the two labels.
Selected with ``data.tasks`` they make a 12-task classification problem in the regime of CelebA's
40 attributes, where soft sharing has to grow with the number of tasks and TSσBN does not.

Generation is vectorized: one slice assignment per offset pair (25 per item), never per sample.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mtnorm.data._generated import generated_split
from mtnorm.data.fashion import FASHION_CLASSES

CANVAS = 36
MAX_SHIFT = 4
MULTIFASHION_TASKS: tuple[str, ...] = ("left", "right")
MULTIFASHION_ATTRIBUTE_TASKS: tuple[str, ...] = tuple(f"has_{c}" for c in FASHION_CLASSES)
_VERSION = 1


def _paste(canvas: np.ndarray, items: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> None:
    """canvas[n, dy:dy+h, dx:dx+w] = max(canvas, items[n]); grouped by offset, not by sample."""
    h, w = items.shape[1:]
    for oy in np.unique(dy):
        for ox in np.unique(dx):
            sel = np.flatnonzero((dy == oy) & (dx == ox))
            if sel.size:
                window = canvas[sel, oy : oy + h, ox : ox + w]
                canvas[sel, oy : oy + h, ox : ox + w] = np.maximum(window, items[sel])


def has_class(left: torch.Tensor, right: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float 0/1 [N, num_classes]: column c is 1 where either item is of class c."""
    classes = torch.arange(num_classes)
    return ((left[:, None] == classes) | (right[:, None] == classes)).float()


def make_multifashion(
    images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Build ``n`` canvases from one split's ``images`` [M,28,28] uint8 and ``labels`` [M].

    Returns uint8 ``images`` [n,36,36], ``left``/``right`` labels [n] and ``source`` [n,2], the
    indices of the two items in the given split (kept so tests can check provenance).
    """
    m = len(images)
    if m < 2:
        raise ValueError(f"need at least 2 source images, got {m}")
    left = rng.integers(0, m, size=n)
    right = (left + rng.integers(1, m, size=n)) % m  # never the same image twice on a canvas
    shifts = rng.integers(0, MAX_SHIFT + 1, size=(4, n))
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    _paste(canvas, images[left], shifts[0], shifts[1])
    far = CANVAS - images.shape[1] - MAX_SHIFT  # right item's nominal offset before shifting
    _paste(canvas, images[right], far + shifts[2], far + shifts[3])
    return {
        "images": canvas,
        "left": labels[left].astype(np.int64),
        "right": labels[right].astype(np.int64),
        "source": np.stack([left, right], axis=1).astype(np.int64),
    }


class MultiFashion(Dataset):
    """MultiFashion split as a torch Dataset and as whole-split tensors.

    ``ds[i]`` is ``(image float [1,36,36] in [0,1], targets)`` with ``left`` / ``right`` long
    labels and the ``has_<class>`` float 0/1 scalars. ``ds.images`` (float32 [N,1,36,36]) and
    ``ds.targets`` (the same keys, batch first) hold the whole split for tensor slicing without a
    DataLoader; ``ds.source`` [N,2] gives the indices of the items in the source split.
    ``tasks`` is the default pair; ``all_tasks`` adds the attributes. Generated arrays are cached under
    ``$MTNORM_CACHE`` (default ``~/.cache/mtnorm``).
    """

    tasks = MULTIFASHION_TASKS
    attribute_tasks = MULTIFASHION_ATTRIBUTE_TASKS
    all_tasks = (*MULTIFASHION_TASKS, *MULTIFASHION_ATTRIBUTE_TASKS)
    classes = FASHION_CLASSES
    in_channels = 1
    image_size = (CANVAS, CANVAS)

    def __init__(
        self,
        split: str = "train",
        n_train: int = 120_000,
        n_test: int = 20_000,
        seed: int = 0,
        root: str | Path | None = None,
        cache: bool = True,
    ) -> None:
        arrays = generated_split(
            f"multifashion-v{_VERSION}", split, n_train, n_test, seed, root, cache, make_multifashion
        )
        self.split = split
        self.raw = torch.from_numpy(arrays["images"])  # uint8, 4x smaller than float
        self.targets = {t: torch.from_numpy(arrays[t]) for t in self.tasks}
        has = has_class(self.targets["left"], self.targets["right"], len(FASHION_CLASSES))
        self.targets.update({t: has[:, i] for i, t in enumerate(self.attribute_tasks)})
        self.source = torch.from_numpy(arrays["source"])
        self._images: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        """All canvases, float32 [N,1,36,36] in [0,1] (built on first access)."""
        if self._images is None:
            self._images = self.raw.unsqueeze(1).float().div_(255.0)
        return self._images

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = self.raw[i].unsqueeze(0).float() / 255.0
        return image, {t: value[i] for t, value in self.targets.items()}

    @classmethod
    def task_specs(cls, tasks: tuple[str, ...] | None = None) -> dict:
        """Per-task head/loss/metric description for trainers (see mtnorm.data.spec)."""
        from mtnorm.data.spec import multifashion_specs

        return multifashion_specs(tasks)
