"""The shared primitives: a file's sha256, flock locks between processes, and the mount table
as the kernel writes it (escapes, device numbers)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from builder import files, mount


def test_sha256_reports_progress_piece_by_piece(tmp_path: Path) -> None:
    data = os.urandom(files.CHUNK * 2 + 5)
    path = tmp_path / "blob"
    path.write_bytes(data)
    pieces: list[int] = []
    assert files.sha256_of(path, pieces.append) == hashlib.sha256(data).hexdigest()
    assert pieces == [files.CHUNK, files.CHUNK, 5]


def held_elsewhere(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT)
    try:
        if files.try_lock(fd):
            files.unlock(fd)
            return False
        return True
    finally:
        os.close(fd)


def test_a_lock_held_by_another_process_is_waited_for_or_refused(tmp_path: Path) -> None:
    path = tmp_path / "entry.lock"
    holder = subprocess.Popen(["flock", str(path), "sleep", "1"])
    try:
        deadline = time.monotonic() + 10
        while not held_elsewhere(path):
            assert time.monotonic() < deadline, "flock(1) never took the lock"
            time.sleep(0.05)
        with files.locked(path, wait=False) as had:
            assert had is False
        said: list[str] = []
        started = time.monotonic()
        with files.locked(path, on_wait=lambda: said.append("waiting")) as had:
            assert had is True and said == ["waiting"]
            assert time.monotonic() - started > 0.2, "it waited for the holder to finish"
    finally:
        holder.wait()
    with files.locked(path, shared=True) as had, files.locked(path, shared=True,
                                                              wait=False) as again:
        assert had and again, "shared locks share"


@pytest.mark.root
def test_the_mount_table_decodes_what_the_kernel_escapes(tmp_path: Path) -> None:
    point = tmp_path / "a b\tc\\d"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "odd source", str(point)],
                   check=True)
    try:
        (found,) = [m for m in mount.mount_table() if m.point == str(point)]
        assert found.source == "odd source"
        assert found.device == os.stat(point).st_dev
        assert mount.mounts_under(tmp_path) == [str(point)]
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert mount.mounts_under(tmp_path) == []
