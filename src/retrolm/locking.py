"""One writer per folder: an exclusive ``fcntl.flock`` on ``FOLDER/.lock``.

Every command that writes a database or a run folder holds this lock for as long as
it writes; a second writer fails at once with a ``LockedError`` naming the folder and
the holder's pid (written into the lock file after the lock is taken). Readers take
no lock. The kernel drops a ``flock`` when its holder dies, even by SIGKILL, so a lock
file left behind never blocks anyone: only a live holder does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from retrolm.errors import RetrolmError

try:
    import fcntl
except ImportError:  # not POSIX: no locking (retrolm targets Linux)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class LockedError(RetrolmError):
    """Another live process is writing to the same database or run folder."""


def _holder(fd: int) -> str:
    """The pid the holder wrote into the lock file ("unknown" if it has not yet)."""
    for _ in range(20):  # the holder writes its pid right after taking the lock
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


@contextmanager
def exclusive_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Hold the exclusive write lock of ``folder`` (created if missing) for the block.

    ``what`` names the folder's kind in the error ("database", "run"). Raises
    ``LockedError`` at once if another process holds the lock. A folder this call
    created and that holds nothing but the lock file on exit is removed again, so a
    command that fails before writing leaves no empty folder behind.
    """
    folder = Path(folder)
    created = not folder.exists()
    if fcntl is None:
        log.debug("no fcntl on this platform: %s is not locked", folder)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder / LOCK_FILE
        return
    fd, path = _acquire(folder, what)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        try:
            os.ftruncate(fd, 0)
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                # unlinked while still held: a process that opened the old file sees the
                # inode change after its flock and starts over (_acquire)
                path.unlink()
                folder.rmdir()
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the lock


def _acquire(folder: Path, what: str) -> tuple[int, Path]:
    """Open and flock ``folder/.lock``; returns (fd, path) of the file now held."""
    path = folder / LOCK_FILE
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise LockedError(
                f"{what} {folder} is being written by another retrolm process (pid {pid}); "
                "wait for it to finish or stop it, or use another folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, path
        os.close(fd)  # we locked a file its holder had just removed: take the new one
