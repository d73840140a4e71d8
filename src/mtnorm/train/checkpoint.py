"""Atomic checkpoints and the random-number state they carry.

A checkpoint is written to a temporary file in the target's folder and moved over the target with
``os.replace``, which is atomic on POSIX and Windows: a crash or exception mid-save leaves the
previous checkpoint untouched and at worst a stray ``.tmp`` file, never a truncated checkpoint.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` such that ``path`` is either the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # also on KeyboardInterrupt: never leave a half-written temporary behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (a clear error when it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # weights_only=False: checkpoints hold the config dict and RNG states, written by us
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool = True, device: torch.device | None = None) -> None:
    """Seed torch, numpy and python; on CUDA optionally ask for deterministic kernels.

    CPU kernels are already deterministic for a fixed thread count, so the process-wide
    ``torch.use_deterministic_algorithms`` switch is only flipped for CUDA runs.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic and device is not None and device.type == "cuda":
        # warn_only: some CUDA kernels have no deterministic version
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
