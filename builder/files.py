"""File primitives every part shares: a file's sha256, a directory synced, and flock locks.

Standard library only: the card's first-boot bundle carries this module too.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CHUNK = 1 << 20


def sha256_of(path: Path, progress: Callable[[int], object] | None = None) -> str:
    """The file's sha256 in hex; `progress` gets the size of each piece read (a progress
    bar's update)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def sync_directory(directory: Path) -> None:
    """A directory's entries on disk: a file just renamed or removed there stays so through a
    power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take an flock on an open file without waiting: False when another holds it. The
    kernel drops it when the file is closed or its holder dies, so a killed program never
    leaves a lock that blocks the next."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def locked(path: Path, *, shared: bool = False, wait: bool = True,
           on_wait: Callable[[], object] | None = None) -> Iterator[bool]:
    """An flock on `path` (created if missing) for the block; yields whether it was had.
    Without `wait` it yields False at once when another holds it; with it, `on_wait` is
    called (to say why nothing happens) before waiting."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        had = try_lock(fd, shared=shared)
        if not had and wait:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            had = True
        yield had
    finally:
        os.close(fd)
