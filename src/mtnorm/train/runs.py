"""Run folders: one run per folder, never replaced by accident, never shared by two processes.

A folder *holds a run* when it contains any of :data:`RUN_FILES`. ``mtnorm train`` into such a
folder must say what it means: ``--resume`` (continue the run) or ``--overwrite`` (delete its files
first, deliberately). A lock file (:class:`RunLock`) keeps a second process out while a run trains;
a lock left by a process that died on this host is taken over with a note.

``mtnorm run`` and ``mtnorm bench`` never reuse a folder: :func:`fresh_folder` gives every
invocation its own timestamped sub-folder.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from mtnorm.train.config import ConfigError

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "train.csv", "eval.csv", "conflict.jsonl")
"""Files whose presence means a folder already holds a run."""

RUN_DIRS = ("tb",)
LOCK_NAME = ".mtnorm.lock"


class RunFolderError(ConfigError):
    """The run folder cannot be used as asked; the message names it and the flag that fixes it."""


def holds_run(folder: str | Path) -> list[str]:
    """The run files present in ``folder`` (empty when it holds no run)."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]


def clear_run(folder: Path) -> None:
    """Delete a previous run's files (``--overwrite``); other files in the folder stay."""
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)


def check_folder(folder: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over an existing one unless told what to do with it."""
    folder = Path(folder)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: give one of them")
    found = holds_run(folder)
    if resume:
        if not (folder / "last.pt").is_file():
            best = " (best.pt exists: `mtnorm eval` it, or start again with --overwrite)" if (
                folder / "best.pt"
            ).is_file() else ""
            raise RunFolderError(
                f"--resume: no last.pt in {folder} to continue from{best}; without --resume a new run "
                "starts in an empty folder"
            )
        return
    if found and not overwrite:
        raise RunFolderError(
            f"{folder} already holds a run ({', '.join(found)}); add --resume to continue it, "
            "--overwrite to replace it, or choose another folder with --set out=..."
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class RunLock:
    """An exclusive lock file in a run folder (``O_CREAT | O_EXCL``), released on exit.

    The file records the holder's pid and host. A lock whose process no longer exists on this host
    is stale and is taken over; any other existing lock refuses the second process.
    """

    def __init__(self, folder: str | Path, note: Any = print) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._note = note
        self._held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                stale = holder is not None and holder.get("host") == me["host"] and not _pid_alive(
                    int(holder.get("pid", -1))
                )
                if not stale:
                    who = "another process"
                    if holder:
                        who = f"process {holder.get('pid')} on {holder.get('host')}"
                    raise RunFolderError(
                        f"{self.path.parent} is in use by {who} (lock file {self.path}); wait for it to "
                        "finish or use another folder; delete the lock file only if that process is gone"
                    ) from None
                self._note(f"taking over the stale lock of process {holder['pid']} in {self.path.parent}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise RunFolderError(f"could not lock {self.path.parent}; another process keeps taking the lock")

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def fresh_folder(parent: str | Path, now: datetime.datetime | None = None) -> Path:
    """A new, empty folder ``parent/<YYYY-mm-dd_HHMMSS>`` (``-2``, ``-3``... when taken)."""
    parent = Path(parent)
    stamp = (now or datetime.datetime.now()).strftime("%Y-%m-%d_%H%M%S")
    for n in range(1, 1000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return folder
    raise RunFolderError(f"could not create a new run folder under {parent}")
