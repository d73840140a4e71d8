"""Tiny Fashion-MNIST files in the real idx format, shared by the data tests."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from mtnorm.data.fashion import DEBIAN_DIR, find_fashion_dir


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` (uint8) in the real idx layout: 0 0 0x08 ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def make_fashion_dir(folder: Path, n_train: int = 60, n_test: int = 30, gz: bool = True) -> Path:
    """Tiny Fashion-MNIST look-alike. Train items have pixel values in 1..127 and test items in
    128..255, so any canvas pixel tells which split it came from. Every image is a filled blob
    (covers most of the 28x28 square), labels cycle through the 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    yy, xx = np.mgrid[:28, :28]
    blob = ((yy - 13.5) ** 2 + (xx - 13.5) ** 2) < 12.5**2
    suffix = ".gz" if gz else ""
    for split, n, lo, hi in (("train", n_train, 1, 128), ("t10k", n_test, 128, 256)):
        images = rng.integers(lo, hi, size=(n, 28, 28)).astype(np.uint8) * blob
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images.astype(np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return folder


def require_real_fashion() -> Path:
    """The real Fashion-MNIST folder. Missing files fail the test when CI=true (CI must exercise
    the real data), and skip it with the reason otherwise."""
    folder = find_fashion_dir()
    if not any((folder / f"train-images-idx3-ubyte{s}").exists() for s in (".gz", "")):
        message = (
            f"Fashion-MNIST not found in {folder} (MTNORM_FASHION_DIR or {DEBIAN_DIR}); "
            "install with `apt-get install dataset-fashion-mnist`"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return folder
