"""Fashion-MNIST from its idx files, parsed with numpy.

Lookup order for the folder: the ``root`` argument, env ``MTNORM_FASHION_DIR``, then Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``). Each file may be gzipped
(``*.gz``) or plain.

idx format (big-endian): two zero bytes, a type code (0x08 = uint8), the number of dimensions,
one uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

FASHION_CLASSES: tuple[str, ...] = (
    "t_shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "Get Fashion-MNIST with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) "
    "or set MTNORM_FASHION_DIR to a folder holding the four idx files "
    "(train/t10k-images-idx3-ubyte[.gz], train/t10k-labels-idx1-ubyte[.gz])."
)


class FashionMNISTError(FileNotFoundError):
    """A Fashion-MNIST file is missing or unreadable; the message names it and how to get it."""


def find_fashion_dir(root: str | Path | None = None) -> Path:
    """The folder holding the idx files: ``root``, else $MTNORM_FASHION_DIR, else Debian's path."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("MTNORM_FASHION_DIR")
    return Path(env).expanduser() if env else DEBIAN_DIR


def _locate(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FashionMNISTError(f"Fashion-MNIST file not found: {folder / stem}[.gz]. {_HOW_TO_GET}")


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one idx file (plain or .gz) into a uint8 array, checking header and size."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        # gzip raises BadGzipFile (an OSError) or EOFError on a truncated stream.
        raise FashionMNISTError(f"cannot read {path}: {err}. {_HOW_TO_GET}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise FashionMNISTError(
            f"{path} is not a uint8 idx file (bad magic number {raw[:4].hex() or 'empty'}). "
            f"{_HOW_TO_GET}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise FashionMNISTError(f"{path}: truncated idx header. {_HOW_TO_GET}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise FashionMNISTError(
            f"{path}: header says {dims} = {expected} bytes of data, file has {len(raw) - header}. "
            f"{_HOW_TO_GET}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def load_fashion_mnist(
    split: str = "train", root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N,28,28] and labels uint8 [N] of one split ("train" or "test")."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_dir(root)
    image_stem, label_stem = _FILES[split]
    image_path, label_path = _locate(folder, image_stem), _locate(folder, label_stem)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise FashionMNISTError(
            f"{image_path} / {label_path}: expected [N,H,W] images and [N] labels, "
            f"got {images.shape} and {labels.shape}. {_HOW_TO_GET}"
        )
    if images.shape[0] != labels.shape[0]:
        raise FashionMNISTError(
            f"{image_path} has {images.shape[0]} images but {label_path} has {labels.shape[0]} "
            f"labels. {_HOW_TO_GET}"
        )
    if labels.size and labels.max() >= len(FASHION_CLASSES):
        raise FashionMNISTError(f"{label_path}: label {labels.max()} out of range 0..9.")
    return images, labels


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """A short content hash of a source split, so caches built from other files never collide."""
    from mtnorm.data._cache import digest

    return digest(labels)[:8] + digest(images[:: max(1, len(images) // 512)])[:8]
