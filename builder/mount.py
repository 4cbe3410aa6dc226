"""Where the image is mounted: loop devices and mounts as context managers.

Each one records itself in the build's ledger before it acts and undoes itself on the way out,
whatever the way out is; compose them with an ExitStack so they unwind in reverse.

Partitions get a loop device of their own (an offset and a size into the image file) rather
than the partition nodes of one loop device with --partscan: on hosts where the loop driver
has max_part=0, and in most containers, those nodes never appear (a common failure of other
image builders); a loop device with an offset works everywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from builder import log
from builder.entry import shielded
from builder.errors import BuildError
from builder.run import run

if TYPE_CHECKING:
    # The ledger undoes a killed build's mounts with the functions below: it imports them.
    from builder.ledger import Ledger


@contextmanager
def loop_device(ledger: Ledger, image: Path, offset: int, size: int,
                read_only: bool = False) -> Iterator[str]:
    """A loop device over `size` bytes of `image` from `offset`."""
    token = ledger.add("loop", backing=str(image), offset=offset)
    argv = ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    device = ""
    try:
        for attempt in range(10):
            # Another process can take the free device between --find and the attach.
            proc = run([*argv, image], capture=True, check=False)
            if proc.returncode == 0:
                device = proc.stdout.decode().strip()
                break
            if b"Device or resource busy" not in proc.stderr:
                stderr = proc.stderr.decode(errors="replace").strip()
                raise BuildError(f"could not attach a loop device to {image}: {stderr} "
                                 f"(in a container, run it with --privileged)")
            time.sleep(0.1 * (attempt + 1))
        else:
            raise BuildError(f"no free loop device for {image}: every one stayed busy")
        log.debug(f"{device} = {image} at {offset}")
        yield device
    finally:
        with shielded():
            # A signal between the attach and `device = ...` leaves the name unknown: the
            # ledger's backing file and offset still find it.
            devices = [device] if device else loops_of(str(image), offset)
            gone = True
            for dev in devices:
                # Flush first: a loop device detached with dirty buffers loses them.
                run(["blockdev", "--flushbufs", dev], check=False, capture=True)
                gone = detach_loop(dev) and gone
            if gone:
                ledger.remove(token)   # else it stays recorded for --cleanup


@contextmanager
def mounted(ledger: Ledger, source: str, target: Path, *, fstype: str | None = None,
            options: Sequence[str] = (), bind: bool = False) -> Iterator[Path]:
    """`source` mounted on `target`. Leaving normally with the filesystem still busy is an
    error: whatever comes next (a shrink, a detach) must not run under a live mount."""
    target.mkdir(parents=True, exist_ok=True)
    token = ledger.add("mount", target=str(target))
    argv = ["mount"]
    if bind:
        argv.append("--bind")
    if fstype:
        argv += ["-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    failed = False
    try:
        run([*argv, source, target], capture=True, what=f"mount {source} on {target}")
        yield target
    except BaseException:
        failed = True
        raise
    finally:
        with shielded():
            clean = unmount(str(target))
            if clean:
                ledger.remove(token)
        if not clean and not failed:
            raise BuildError(f"{target} is still in use and could not be unmounted: a "
                             f"process started by a customize script may still run there")


@contextmanager
def work_path(ledger: Ledger, path: Path) -> Iterator[Path]:
    """A file or directory that exists only while the build runs."""
    token = ledger.add("path", path=str(path))
    try:
        yield path
    finally:
        with shielded():
            remove_path(path)
            if not path.exists():
                ledger.remove(token)


def is_root() -> bool:
    return os.geteuid() == 0


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


class Mount(NamedTuple):
    device: int         # the mounted filesystem's device number (st_dev)
    source: str         # what was mounted: /dev/sda1, tmpfs, /dev/root...
    point: str


def mount_table() -> list[Mount]:
    """Every mount, decoded: mountinfo writes a space as \\040, a tab as \\011, a newline
    as \\012 and a backslash as \\134."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            major, minor = fields[2].split(":")
            # The optional fields end at "-"; the filesystem type and the source follow it.
            source = fields[fields.index("-", 6) + 2]
            found.append(Mount(os.makedev(int(major), int(minor)), _unescape(source),
                               _unescape(fields[4])))
    return found


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_points() -> list[str]:
    return [mount.point for mount in mount_table()]


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


def probe(device: str | Path) -> dict[str, str]:
    """What blkid finds on a device or image file by reading it (not from its cache):
    TYPE, LABEL, UUID, PTTYPE...; empty when it finds nothing."""
    proc = run(["blkid", "--probe", "--output", "export", device], capture=True, check=False)
    return dict(line.split("=", 1) for line in proc.stdout.decode(errors="replace").splitlines()
                if "=" in line)
