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
from pathlib import Path
from typing import Any

from builder import log
from builder.cache import write_atomic
from builder.mount import detach_loop, kill_processes_under, loops_of, remove_path, unmount

STATE_DIR = Path("/run/orangepi-jupyter")


def alive(pid: int, start: str | None) -> bool:
    return start is not None and _start_time(pid) == start


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
        if pid and alive(pid, record.get("start")):
            continue  # that build is alive
        log.info(f"cleaning up after build {pid}, which was killed: {record_path}")
        left = [entry for entry in reversed(record.get("entries", [])) if not _undo(entry)]
        if left:
            # Kept for the next try, with only what could not be undone yet.
            record["entries"] = list(reversed(left))
            write_atomic(record_path, json.dumps(record, indent=1).encode())
            log.warn(f"could not undo everything build {pid} left; see {record_path}")
        else:
            record_path.unlink(missing_ok=True)
            undone += 1
    return undone


def _undo(entry: dict[str, Any]) -> bool:
    """Undo one resource of a killed build; whether it is gone now."""
    kind = entry.get("kind")
    if kind == "mount":
        target = str(entry["target"])
        # Its scripts' processes outlive a SIGKILL of the builder (they have sessions of
        # their own) and keep the filesystem busy: they go first.
        kill_processes_under(Path(target))
        return unmount(target, lazy=False)
    if kind == "loop":
        devices = loops_of(str(entry["backing"]), int(entry.get("offset", 0)))
        return all([detach_loop(device) for device in devices])
    if kind == "path":
        path = Path(str(entry["path"]))
        remove_path(path)
        log.info(f"  removed {path}")
        return not path.exists()
    return True


