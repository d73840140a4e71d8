"""NYUv2 in the MTAN preprocessed layout (Liu et al. 2019), 288x384, 13 classes.

``<root>/{train,val}/image/<i>.npy`` float [288,384,3]; ``label/<i>.npy`` [288,384] with classes
0..12 and -1 = ignore; ``depth/<i>.npy`` [288,384,1], 0 = invalid; ``normal/<i>.npy``
[288,384,3], zero vector = invalid. Items are CHW tensors: image [3,H,W], ``segmentation`` long
[H,W], ``depth`` [1,H,W], ``normal`` [3,H,W]. ``split="test"`` means ``val`` (MTAN evaluates on it).
"""

from __future__ import annotations

import numpy as np
import torch

from mtnorm.data._npy_dense import NpyDenseDataset, chw, hw_label

NYUV2_TASKS: tuple[str, ...] = ("segmentation", "depth", "normal")
NYUV2_CLASSES = 13


class NYUv2(NpyDenseDataset):
    """NYUv2 3-task dataset (segmentation, depth, normal) read from MTAN's .npy files."""

    folders = {"segmentation": "label", "depth": "depth", "normal": "normal"}

    def _convert(self, task: str, array: np.ndarray) -> torch.Tensor:
        return hw_label(array) if task == "segmentation" else chw(array)

    @classmethod
    def task_specs(cls) -> dict:
        from mtnorm.data.spec import nyuv2_specs

        return nyuv2_specs()
