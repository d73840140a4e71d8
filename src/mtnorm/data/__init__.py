"""Datasets: Fashion-MNIST-based CPU benchmarks and loaders for the standard MTL layouts."""

from mtnorm.data.fashion import (
    FASHION_CLASSES,
    FashionMNISTError,
    find_fashion_dir,
    load_fashion_mnist,
    read_idx,
)
from mtnorm.data.multifashion import MULTIFASHION_TASKS, MultiFashion, make_multifashion

__all__ = [
    "FASHION_CLASSES",
    "MULTIFASHION_TASKS",
    "FashionMNISTError",
    "MultiFashion",
    "find_fashion_dir",
    "load_fashion_mnist",
    "make_multifashion",
    "read_idx",
]
