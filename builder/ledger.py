"""A record on disk of every privileged resource a build holds (loop devices, mounts, work files).

Context managers undo what they made when a build fails or is interrupted. A build killed
with SIGKILL runs no code at all: its record stays behind, and the next build (or
`build-image --cleanup`) undoes exactly what it lists, nothing found by guessing. Each entry
is written *before* the resource is made, so a kill between the two leaves an entry for
something that may not exist; undoing tolerates that.

The record lives in /run, which is emptied at boot, as are loop devices and mounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from builder import log
from builder.cache import write_atomic
from builder.run import run

STATE_DIR = Path("/run/orangepi-jupyter")


SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


@contextmanager
def shielded() -> Iterator[None]:
    """Hold back SIGINT, SIGTERM and SIGHUP while cleaning up or publishing: a second Ctrl-C
    must not stop an unmount half-way. A signal that arrives meanwhile is delivered after."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


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


def kill_processes_under(path: Path) -> None:
    """Stop every process chrooted into `path` or below: a daemon a script started in the
    image keeps its filesystem busy and would write to it during a shrink. (Only the root
    directory counts, so a person's shell that merely has its cwd there is left alone.)"""
    real = os.path.realpath(path).rstrip("/")
    for _ in range(3):
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                target = os.path.realpath(entry / "root")
            except OSError:
                continue
            if target == real or target.startswith(real + "/"):
                found.append(int(entry.name))
        if not found:
            return
        for pid in found:
            log.warn(f"stopping process {pid}, left running in {path}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _mount_points() -> list[str]:
    """Every mount point, decoded: mountinfo writes a space as \\040, a tab as \\011."""
    with open("/proc/self/mountinfo") as f:
        fields = [line.split()[4] for line in f]
    return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) for p in fields]


def is_mounted(target: str) -> bool:
    return os.path.realpath(target) in _mount_points()


def mounts_under(path: Path) -> list[str]:
    real = os.path.realpath(path)
    return [p for p in _mount_points() if p == real or p.startswith(real.rstrip("/") + "/")]


def remove_path(path: Path) -> None:
    """Remove a work file or directory, never crossing into a mount: a workspace with the
    image's root still mounted holds a bind of the apt cache and proc, which must not be
    emptied. Refuses (with a warning) while anything is mounted below."""
    if path.is_dir() and not path.is_symlink():
        # Whatever is still mounted below (a build killed mid-way, a debootstrap stopped
        # before its own cleanup) is unmounted first, deepest first, its processes stopped.
        if mounts_under(path):
            kill_processes_under(path)
            for target in sorted(mounts_under(path), key=len, reverse=True):
                unmount(target, lazy=False)
        busy = mounts_under(path)
        if busy:
            log.warn(f"not removing {path}: still mounted there: {', '.join(busy)}")
            return
        run(["rm", "-rf", "--one-file-system", path], check=False)
    else:
        path.unlink(missing_ok=True)


def unmount(target: str, lazy: bool = True) -> bool:
    """Unmount, retrying while something still holds the filesystem. Returns whether it is
    unmounted for good; with `lazy`, a filesystem still busy after the retries is detached
    lazily (it lingers until its last user goes), which counts as not clean."""
    for attempt in range(10):
        if not is_mounted(target):
            return True
        proc = run(["umount", target], capture=True, check=False)
        if proc.returncode == 0:
            log.debug(f"unmounted {target}")
            continue
        time.sleep(0.2 * (attempt + 1))
    if not is_mounted(target):
        return True
    if lazy:
        log.warn(f"{target} is busy; detaching it lazily")
        run(["umount", "--lazy", target], capture=True, check=False)
    return False


def loops_of(backing: str, offset: int) -> list[str]:
    proc = run(["losetup", "--associated", backing, "--offset", str(offset), "--noheadings",
                "--output", "NAME"], capture=True, check=False)
    return [line.strip() for line in proc.stdout.decode().splitlines() if line.strip()]


def detach_loop(device: str) -> bool:
    """Detach, and check it is gone: the kernel accepts a detach of a device still in use
    and only marks it to go later (autoclear), which is not gone."""
    for attempt in range(10):
        proc = run(["losetup", "--detach", device], capture=True, check=False)
        if proc.returncode != 0 and b"No such device" not in proc.stderr:
            time.sleep(0.2 * (attempt + 1))
            continue
        shown = run(["losetup", "--noheadings", "--output", "BACK-FILE", device],
                    capture=True, check=False)
        if shown.returncode != 0 or not shown.stdout.strip():
            log.debug(f"detached {device}")
            return True
        time.sleep(0.2 * (attempt + 1))
    log.warn(f"could not detach {device}: it is still in use")
    return False
