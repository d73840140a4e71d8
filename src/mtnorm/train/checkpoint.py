"""Atomic, verified checkpoints and the random-number state they carry.

A checkpoint is written to a temporary file in the target's folder, flushed to disk and moved
over the target with ``os.replace``, which is atomic on POSIX and Windows: a crash, a full disk or
an exception mid-save leaves the previous checkpoint untouched, never a truncated one.

Integrity: the file is ``torch.save``'s zip archive followed by a fixed-size trailer
``\nmtnorm-sha256:<64 hex digits>\n`` holding the SHA-256 of the archive. ``torch.load`` still
reads the file (zip readers locate the archive from its end record), and :func:`load` recomputes
the digest, so a flipped byte anywhere (archive or trailer) or a truncated file is reported as
damaged instead of resuming a silently corrupted run. The payload records :data:`FORMAT`, so a
file whose trailer was damaged cannot pass for an old file without a digest.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 2
"""Checkpoint format: 2 = archive + SHA-256 trailer (1 = a bare ``torch.save`` archive)."""

_TRAILER_TAG = b"\nmtnorm-sha256:"
_TRAILER_LEN = len(_TRAILER_TAG) + 64 + 1


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not match the run; the message names the file."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)`` plus a digest trailer, such that ``path`` is either the old or the
    complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, dict):
        obj = {**obj, "format": FORMAT}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    archive = buffer.getvalue()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(archive)
            f.write(_TRAILER_TAG + _digest(archive).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # also on KeyboardInterrupt or a full disk: never leave a half-written temporary behind
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def verify(path: str | Path) -> str | None:
    """``None`` when the checkpoint at ``path`` is intact, else what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    data = path.read_bytes()
    if not data:
        return "empty file"
    tail = data[-_TRAILER_LEN:]
    if tail.startswith(_TRAILER_TAG) and tail.endswith(b"\n"):
        if _digest(data[:-_TRAILER_LEN]) != tail[len(_TRAILER_TAG) : -1].decode("ascii", "replace"):
            return "its SHA-256 digest does not match its contents (damaged or modified)"
        return None
    return "no integrity digest (truncated, damaged, or written by mtnorm before format 2)"


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, verifying its digest first.

    Raises :class:`CheckpointError` naming the file when it is missing, empty, truncated or its
    digest does not match. A file from before format 2 (no trailer) that still loads is accepted
    with a warning, since there is nothing to verify it against.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    problem = verify(path)
    data = path.read_bytes()
    legacy = problem is not None and problem.startswith("no integrity digest")
    if problem is not None and not legacy:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    archive = data if legacy else data[:-_TRAILER_LEN]
    try:
        # weights_only=False: checkpoints hold the config dict and RNG states, written by us, and the
        # digest above has already matched
        state = torch.load(io.BytesIO(archive), map_location=map_location, weights_only=False)
    except Exception as e:  # any unpickling failure means the same thing here: damaged
        reason = f"it cannot be read ({type(e).__name__})"
        raise CheckpointError(f"checkpoint {path} is damaged: {reason}") from None
    if legacy:
        if isinstance(state, dict) and state.get("format", 1) >= FORMAT:
            raise CheckpointError(f"checkpoint {path} is damaged: its integrity trailer is missing or broken")
        warnings.warn(f"{path} has no integrity digest (older mtnorm); loaded unverified", stacklevel=2)
    return state


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


RESUME_SAFE_KEYS = (
    "epochs",
    "out",
    "device",
    "progress",
    "tensorboard",
    "log_every",
    "save_every",
    "eval_every",
    "conflict_every",
    "data.eval_batch_size",
    "data.root",
)
"""Config keys that may change between a run and its ``--resume``: they do not alter the training
trajectory (more epochs, where files go, how often to log, evaluate or save). Any other change
would make the resumed run a different run and is refused."""


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("balancer_kwargs", "method_kwargs", "loss_weights"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, current value)`` for every key that differs and alters the run."""
    old, new = _flatten(stored), _flatten(current)
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if key not in RESUME_SAFE_KEYS and old.get(key) != new.get(key)
    ]
