"""Datasets: Fashion-MNIST-based CPU benchmarks and loaders for the standard MTL layouts.

Every benchmark exposes ``tasks`` and ``task_specs()`` ({task: TaskSpec}, see
:mod:`mtnorm.data.spec`) so a trainer can build heads, losses and metrics from it.
"""

from mtnorm.data._cache import cache_dir
from mtnorm.data._errors import DatasetLayoutError
from mtnorm.data.celeba import CelebA
from mtnorm.data.cityscapes import CITYSCAPES_CLASSES, CITYSCAPES_TASKS, Cityscapes
from mtnorm.data.fashion import (
    FASHION_CLASSES,
    FashionMNISTError,
    find_fashion_dir,
    load_fashion_mnist,
    read_idx,
)
from mtnorm.data.multifashion import MULTIFASHION_TASKS, MultiFashion, make_multifashion
from mtnorm.data.nyuv2 import NYUV2_CLASSES, NYUV2_TASKS, NYUv2
from mtnorm.data.office import (
    OFFICE_CLASSES,
    OFFICE_DOMAINS,
    Office,
    load_office,
    office_task_specs,
)
from mtnorm.data.qm9 import QM9_TARGETS, load_qm9, qm9_task_specs
from mtnorm.data.scenes import (
    ATTRIBUTE_TASKS,
    SCENE_TASKS,
    FashionScenes,
    make_scenes,
    render_scenes,
    sample_scene_params,
)
from mtnorm.data.spec import TaskSpec

__all__ = [
    "ATTRIBUTE_TASKS",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_TASKS",
    "FASHION_CLASSES",
    "MULTIFASHION_TASKS",
    "NYUV2_CLASSES",
    "NYUV2_TASKS",
    "OFFICE_CLASSES",
    "OFFICE_DOMAINS",
    "QM9_TARGETS",
    "SCENE_TASKS",
    "CelebA",
    "Cityscapes",
    "DatasetLayoutError",
    "FashionMNISTError",
    "FashionScenes",
    "MultiFashion",
    "NYUv2",
    "Office",
    "TaskSpec",
    "cache_dir",
    "find_fashion_dir",
    "load_fashion_mnist",
    "load_office",
    "load_qm9",
    "make_multifashion",
    "make_scenes",
    "office_task_specs",
    "qm9_task_specs",
    "read_idx",
    "render_scenes",
    "sample_scene_params",
]
