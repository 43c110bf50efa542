"""A training run owns its output folder: ``.lock`` in the folder, held with ``flock`` while the run lives.

A second run on the folder is refused with the holder's process id and command. The operating system releases
the lock when its process ends, however it ends, so the lock of a killed run is taken over (with a note) rather
than blocking the folder forever; a process that exits normally (at the end, by an error or ``sys.exit``) releases
its locks, leaving nothing to take over. Within one process the lock is re-entrant: a recipe claims its folder before it
writes anything, and the training engine's own claim inside it is then a no-op. Another thread of the same
process is refused like another process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .config import TrainingError

LOCK_NAME = ".lock"
_held: dict[Path, tuple[int, int]] = {}  # folder -> (the open lock file, the thread that claimed it)
_holder = {"pid": os.getpid()}  # the process that claimed them (a forked child inherits _held, not the locks' runs)


class FolderInUse(TrainingError):
    """Another live process holds the output folder."""


def _key(folder: str | os.PathLike) -> Path:
    return Path(folder).resolve()


def claim(folder: str | os.PathLike) -> bool:
    """Hold ``folder`` for the rest of this process (or until `release`); False when this process already held it.
    Raises `FolderInUse` naming the holder when another live process has it."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; runs must keep to their own folders
        return False
    key = _key(folder)
    if key in _held:
        if _held[key][1] == threading.get_ident():
            return False
        raise FolderInUse(f"{key} is in use by another thread of this process (pid {os.getpid()}); give each run "
                          "its own output folder")
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise FolderInUse(f"{key} is in use by {holder}; wait for that run to end, stop it, or give another "
                          "--output-dir") from None
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if previous:  # a clean release empties the file: this holder ended without releasing
        print(f"note: taking over {key / LOCK_NAME} from {previous}, which is no longer running", file=sys.stderr)
    os.ftruncate(fd, 0)
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({command}), since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _held[key], _holder["pid"] = (fd, threading.get_ident()), os.getpid()
    return True


@atexit.register
def _release_all() -> None:
    """At a normal exit: a run that ended (finished, failed or was stopped by a signal it handled) is not a crash."""
    if os.getpid() == _holder["pid"]:
        for folder in list(_held):
            release(folder)


def release(folder: str | os.PathLike) -> None:
    """Let go of ``folder`` (emptying the lock file, so that the next run knows the release was clean)."""
    held = _held.pop(_key(folder), None)
    if held is not None:
        os.ftruncate(held[0], 0)
        os.close(held[0])


@contextlib.contextmanager
def holding(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder`` for the block, unless this process holds it already (then the outer claim stays)."""
    claimed = claim(folder)
    try:
        yield
    finally:
        if claimed:
            release(folder)
