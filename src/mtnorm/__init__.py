"""mtnorm: multi-task learning through task-specific normalization and dual balancing.

The core (``mtnorm.norm``) is imported eagerly; the heavier subpackages (``balance``, ``data``,
``metrics``, ``models``, ``train``, ``analysis``) load on first attribute access, so
``import mtnorm`` stays cheap and ``mtnorm.balance.get("db_mtl")`` still works without an import.
"""

from __future__ import annotations

import importlib
from typing import Any

from mtnorm.norm import *  # noqa: F403  (the core API)
from mtnorm.norm import __all__ as _norm_all

__version__ = "0.1.0"

_SUBPACKAGES = ("analysis", "balance", "data", "metrics", "models", "train")

__all__ = [*_norm_all, *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"mtnorm.{name}")
    raise AttributeError(f"module 'mtnorm' has no attribute {name!r}")
