"""A record on disk of every privileged resource a build holds (loop devices, mounts, work files).

Context managers undo what they made when a build fails or is interrupted. A build killed
with SIGKILL runs no code at all: its record stays behind, and the next build (or
`build-image --cleanup`) undoes exactly what it lists, nothing found by guessing. Each entry
is written *before* the resource is made, so a kill between the two leaves an entry for
something that may not exist; undoing tolerates that.

The record lives in /run, which is emptied at boot, as are loop devices and mounts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from builder import log
from builder.cache import write_atomic

STATE_DIR = Path("/run/orangepi-jupyter")


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process: with the pid it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


class Ledger:
    def __init__(self, state_dir: Path = STATE_DIR) -> None:
        self.state_dir = state_dir
        self.path = state_dir / f"build-{os.getpid()}.json"
        self.entries: dict[int, dict[str, Any]] = {}
        self._next = 0

    def add(self, kind: str, **data: str | int) -> int:
        token = self._next
        self._next += 1
        self.entries[token] = {"kind": kind, **data}
        self._save()
        return token

    def remove(self, token: int) -> None:
        self.entries.pop(token, None)
        self._save()

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if not self.entries:
            self.path.unlink(missing_ok=True)
            return
        record = {"pid": os.getpid(), "start": _start_time(os.getpid()),
                  "entries": [self.entries[t] for t in sorted(self.entries)]}
        write_atomic(self.path, json.dumps(record, indent=1).encode())


def clean_stale(state_dir: Path = STATE_DIR) -> int:
    """Undo what builds that no longer run left behind; return how many records were undone.
    Records of builds still running are left alone."""
    undone = 0
    for record_path in sorted(state_dir.glob("build-*.json")):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        pid = int(record.get("pid", 0))
        if pid and _start_time(pid) is not None and _start_time(pid) == record.get("start"):
            continue  # that build is alive
        log.info(f"cleaning up after build {pid}, which was killed: {record_path}")
        for entry in reversed(record.get("entries", [])):
            _undo(entry)
        record_path.unlink(missing_ok=True)
        undone += 1
    return undone


def _undo(entry: dict[str, Any]) -> None:
    kind = entry.get("kind")
    if kind == "mount":
        unmount(str(entry["target"]))
    elif kind == "loop":
        for device in loops_of(str(entry["backing"]), int(entry.get("offset", 0))):
            detach_loop(device)
    elif kind == "path":
        path = Path(str(entry["path"]))
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.info(f"  removed {path}")


def is_mounted(target: str) -> bool:
    real = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def unmount(target: str) -> None:
    """Unmount, retrying while something still holds the filesystem; as a last resort detach
    it lazily so that the loop device under it can go."""
    for attempt in range(10):
        if not is_mounted(target):
            return
        proc = subprocess.run(["umount", target], capture_output=True, text=True)
        if proc.returncode == 0:
            log.debug(f"unmounted {target}")
            continue
        time.sleep(0.2 * (attempt + 1))
    if is_mounted(target):
        log.warn(f"{target} is busy; detaching it lazily")
        subprocess.run(["umount", "--lazy", target], check=False)


def loops_of(backing: str, offset: int) -> list[str]:
    proc = subprocess.run(["losetup", "--associated", backing, "--offset", str(offset),
                           "--noheadings", "--output", "NAME"], capture_output=True, text=True)
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def detach_loop(device: str) -> None:
    for attempt in range(10):
        proc = subprocess.run(["losetup", "--detach", device], capture_output=True, text=True)
        if proc.returncode == 0 or "No such device" in proc.stderr:
            log.debug(f"detached {device}")
            return
        time.sleep(0.2 * (attempt + 1))
    log.warn(f"could not detach {device}: {proc.stderr.strip()}")
