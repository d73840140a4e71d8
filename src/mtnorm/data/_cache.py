"""On-disk cache of generated arrays: atomic writes, verified reads.

Layout: ``<cache dir>/<key>/<name>.npy`` plus ``manifest.json`` holding each array's shape, dtype
and BLAKE2 digest. The manifest is written last, so a run killed mid-write leaves no manifest and
the entry is simply regenerated; a file whose digest no longer matches is treated the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

_MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """The cache root: env ``MTNORM_CACHE`` if set, else ``~/.cache/mtnorm``."""
    root = os.environ.get("MTNORM_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mtnorm"


def digest(array: np.ndarray) -> str:
    """A content hash of an array (dtype, shape and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def _atomic_save(path: Path, array: np.ndarray) -> None:
    # Temp file in the same folder so os.replace is a rename on one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(key: str, arrays: dict[str, np.ndarray]) -> Path:
    """Store ``arrays`` under ``key`` atomically; returns the entry folder."""
    folder = cache_dir() / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _MANIFEST).unlink(missing_ok=True)
    manifest = {}
    for name, array in arrays.items():
        _atomic_save(folder / f"{name}.npy", array)
        manifest[name] = {
            "shape": list(array.shape),
            "dtype": array.dtype.str,
            "digest": digest(array),
        }
    fd, tmp = tempfile.mkstemp(prefix=_MANIFEST, suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, folder / _MANIFEST)
    return folder


def load(key: str) -> dict[str, np.ndarray] | None:
    """The arrays stored under ``key``, or None when absent, incomplete or corrupt."""
    folder = cache_dir() / key
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        arrays = {}
        for name, meta in manifest.items():
            array = np.load(folder / f"{name}.npy", allow_pickle=False)
            if (
                list(array.shape) != meta["shape"]
                or array.dtype.str != meta["dtype"]
                or digest(array) != meta["digest"]
            ):
                return None
            arrays[name] = array
        return arrays
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def cached(key: str, make: Callable[[], dict[str, np.ndarray]], use_cache: bool = True):
    """Load ``key`` from the cache, or call ``make`` and store its result."""
    if use_cache:
        hit = load(key)
        if hit is not None:
            return hit
        shutil.rmtree(cache_dir() / key, ignore_errors=True)
    arrays = make()
    if use_cache:
        try:
            save(key, arrays)
        except OSError as err:  # read-only or full disk: the data is still good, just not cached
            warnings.warn(f"could not cache {key} in {cache_dir()}: {err}", stacklevel=2)
    return arrays
