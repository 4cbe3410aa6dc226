"""Where the image is mounted: loop devices and mounts as context managers.

Each one records itself in the build's ledger before it acts and undoes itself on the way out,
whatever the way out is; compose them with an ExitStack so they unwind in reverse.

Partitions get a loop device of their own (an offset and a size into the image file) rather
than the partition nodes of one loop device with --partscan: on hosts where the loop driver
has max_part=0, and in most containers, those nodes never appear (a common failure of other
image builders); a loop device with an offset works everywhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from builder import log
from builder.errors import BuildError
from builder.ledger import Ledger, detach_loop, loops_of, remove_path, shielded, unmount
from builder.run import run


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
