"""The writer lock of a checkpoint directory: at most one writing process per directory.

The lock is an exclusive, non-blocking ``flock`` on the directory itself, so there is no lock file
to leave behind (or to race on when a chain is deleted). It is held by a process, not by an object:
every ``SparseCheckpointer`` of one process that writes into the directory shares it (they keep the
manifest consistent with the re-read check and the per-directory mutex), and it is released when
the last of them is closed or collected, or when the process dies (the kernel drops it, so a
kill -9 never leaves a directory locked). Where directories cannot be locked (e.g. some network
filesystems), a ``.fishkern-writer.lock`` file in the directory is locked instead; where nothing
can be locked, a warning says so and only the manifest re-read check protects the chain.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".fishkern-writer.lock"


@dataclass
class _Held:
    fd: int | None  # None: nothing could be locked here
    pid: int
    users: int = 0
    mutex: threading.RLock = field(default_factory=threading.RLock)  # one manifest update at a time


_held: dict[tuple[int, int], _Held] = {}
_guard = threading.Lock()


def _flock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: another process holds it


def _lock_directory(directory: str) -> int | None:
    """An fd holding the exclusive lock; ``BlockingIOError`` when another process holds it."""
    if fcntl is None:
        warnings.warn(f"cannot lock {directory} (no fcntl here): a second writing process would not be detected", stacklevel=4)
        return None
    try:
        return _locked_fd(directory, os.O_RDONLY)
    except BlockingIOError:
        raise
    except OSError:  # directories cannot be locked here: a lock file instead
        pass
    try:
        return _locked_fd(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT)
    except BlockingIOError:
        raise
    except OSError as e:
        warnings.warn(f"cannot lock {directory} ({e}): a second writing process would not be detected", stacklevel=4)
        return None


def _locked_fd(path: str, flags: int) -> int:
    """Open ``path`` and take its exclusive lock; the fd is closed again if that fails."""
    fd = os.open(path, flags, 0o644)
    try:
        _flock(fd)
    except OSError:
        os.close(fd)
        raise
    return fd


class WriterLock:
    """This object's share of the process's writer lock on one directory."""

    def __init__(self, directory: str):
        st = os.stat(directory)
        self._key = (st.st_dev, st.st_ino)
        with _guard:
            held = _held.get(self._key)
            if held is not None and held.pid != os.getpid():  # inherited through fork: the parent's
                _held.pop(self._key)
                if held.fd is not None:
                    os.close(held.fd)  # our copy only: the parent keeps its lock
                held = None
            if held is None:
                held = _held[self._key] = _Held(_lock_directory(directory), os.getpid())
            held.users += 1
        self._held: _Held | None = held

    @property
    def mutex(self) -> threading.RLock:
        if self._held is None:
            raise RuntimeError("the writer lock was released")
        return self._held.mutex

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        with _guard:
            held.users -= 1
            if held.users == 0 and _held.get(self._key) is held:
                del _held[self._key]
                if held.fd is not None:
                    os.close(held.fd)
