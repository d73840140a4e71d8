"""Errors that tell the user which file is wrong and what the folder should look like."""

from __future__ import annotations

from pathlib import Path


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder does not have the expected layout.

    Subclasses FileNotFoundError so ``except FileNotFoundError`` keeps working; the message names
    the missing path and prints the expected tree.
    """

    def __init__(self, missing: str | Path, expected_tree: str, hint: str = "") -> None:
        self.missing = Path(missing)
        message = f"missing {self.missing}\nexpected layout:\n{expected_tree.rstrip()}"
        if hint:
            message += f"\n{hint}"
        super().__init__(message)


def require(path: str | Path, expected_tree: str, hint: str = "") -> Path:
    """Return ``path`` if it exists, else raise DatasetLayoutError naming it."""
    path = Path(path)
    if not path.exists():
        raise DatasetLayoutError(path, expected_tree, hint)
    return path
