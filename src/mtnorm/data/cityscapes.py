"""Cityscapes in the MTAN release layout: 128x256, 7 classes, depth.

``<root>/{train,val}/image/<i>.npy`` float [H,W,3]; ``label_7/<i>.npy`` [H,W] with classes 0..6
and -1 = ignore; ``depth/<i>.npy`` [H,W,1] (0 = invalid). Items: image [3,H,W], ``segmentation``
long [H,W], ``depth`` [1,H,W]. ``split="test"`` means ``val``.
"""

from __future__ import annotations

import numpy as np
import torch

from mtnorm.data._npy_dense import NpyDenseDataset, chw, hw_label

CITYSCAPES_TASKS: tuple[str, ...] = ("segmentation", "depth")
CITYSCAPES_CLASSES = 7


class Cityscapes(NpyDenseDataset):
    """Cityscapes 2-task dataset (7-class segmentation, depth) read from MTAN's .npy files."""

    folders = {"segmentation": "label_7", "depth": "depth"}

    def _convert(self, task: str, array: np.ndarray) -> torch.Tensor:
        return hw_label(array) if task == "segmentation" else chw(array)

    @classmethod
    def task_specs(cls) -> dict:
        from mtnorm.data.spec import cityscapes_specs

        return cityscapes_specs()
