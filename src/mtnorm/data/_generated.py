"""The split logic the generated Fashion-MNIST benchmarks share: seeds, provenance, cache key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from mtnorm.data import _cache
from mtnorm.data.fashion import fingerprint, load_fashion_mnist

_SPLIT_ID = {"train": 0, "test": 1}

Builder = Callable[[np.ndarray, np.ndarray, int, np.random.Generator], dict[str, np.ndarray]]


def generated_split(
    name: str,
    split: str,
    n_train: int,
    n_test: int,
    seed: int,
    root: str | Path | None,
    cache: bool,
    build: Builder,
) -> dict[str, np.ndarray]:
    """Arrays of one split of a benchmark built from Fashion-MNIST by ``build``, cached.

    The test split is built only from the test images. The random stream depends on the seed
    and the split, and the cache key on the benchmark ``name`` (with its format version), the
    split, its size, the seed and a fingerprint of the source images, so any change regenerates.
    """
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    n = n_train if split == "train" else n_test
    src_images, src_labels = load_fashion_mnist(split, root)
    key = f"{name}-{split}-n{n}-seed{seed}-{fingerprint(src_images, src_labels)}"

    def make() -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, _SPLIT_ID[split]])
        return build(src_images, src_labels, n, rng)

    return _cache.cached(key, make, use_cache=cache)
