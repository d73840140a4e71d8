"""mtnorm: multi-task learning through task-specific normalization and dual balancing."""

from mtnorm.norm import *  # noqa: F403  (the core API; filled in as the core lands)
from mtnorm.norm import __all__ as _norm_all

__version__ = "0.1.0"

__all__ = list(_norm_all)
