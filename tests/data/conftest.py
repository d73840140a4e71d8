"""Fixtures for the data tests: a private cache dir, tiny idx files, and the real files."""

from __future__ import annotations

from pathlib import Path

import pytest
from fashion_fixtures import make_fashion_dir, require_real_fashion


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
    return require_real_fashion()
