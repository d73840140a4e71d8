"""Fixtures for the data tests: a private cache dir, tiny idx files, and the real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fashion_fixtures import make_fashion_dir

from mtnorm.data.fashion import DEBIAN_DIR, find_fashion_dir


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every data test caches into its own temp dir, never ~/.cache."""
    cache = tmp_path_factory.mktemp("mtnorm-cache")
    monkeypatch.setenv("MTNORM_CACHE", str(cache))
    return cache


@pytest.fixture
def fashion_dir(tmp_path) -> Path:
    return make_fashion_dir(tmp_path / "fashion")


@pytest.fixture
def real_fashion_dir() -> Path:
    """The installed Fashion-MNIST folder; missing files fail under CI=true, else skip."""
    folder = find_fashion_dir()
    if not (folder / "train-images-idx3-ubyte.gz").exists() and not (
        folder / "train-images-idx3-ubyte"
    ).exists():
        message = (
            f"Fashion-MNIST not found in {folder} (MTNORM_FASHION_DIR or {DEBIAN_DIR}); "
            "install with `apt-get install dataset-fashion-mnist`"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return folder
