"""The card flash-image writes: what DEVICE is, every reason not to write to it, and the card
opened safely.

inspect_target refuses a partition, a disk that is mounted, holds the running system or swap in
use, is used by LVM, RAID or encryption, is read-only, has no medium or is not removable (a
regular file: only with --force, and never one in /dev). opened holds the card with O_EXCL and
a BSD lock, and checks it is still the disk inspected (not another card put in the same
reader): systemd-udevd does not probe or re-read a disk that is locked (systemd's block device
locking), so no automounter grabs a half-written card. Card writes with bounded writeback.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.errors import BuildError, UsageError
from builder.files import try_lock
from builder.log import human_size
from builder.mount import mount_table, probe
from builder.run import LIBC

WRITEBACK_WINDOW = 32 << 20   # bytes written but not yet on the card, at most
# Mount points whose disk is the running system's: never written, even with --force.
SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/boot/firmware", "/usr", "/var")

# ioctls on a block device (linux/fs.h).
BLKRRPART = 0x125F
BLKGETSIZE64 = 0x80081272
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
LIBC.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


@dataclass(frozen=True)
class Target:
    path: Path
    is_disk: bool               # a block device (else a regular file, with --force)
    size: int
    name: str = ""              # sdb
    model: str = ""
    transport: str = ""
    partitions: tuple[str, ...] = ()
    sysfs: Path | None = None
    rdev: int = 0
    diskseq: str = ""           # changes with every medium the kernel sees in a slot

    def describe(self) -> str:
        if not self.is_disk:
            return f"{self.path}: a regular file of {human_size(self.size)}"
        what = ", ".join(x for x in (self.model, self.transport) if x)
        lines = [f"{self.path}: {what}, {human_size(self.size)} ({_decimal(self.size)})"]
        lines += [f"    {p}" for p in self.partitions] or ["    (no partitions)"]
        return "\n".join(lines)


def inspect_target(path: Path, *, force: bool, writing: bool) -> Target:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        # DEVICE as typed names nothing: the command line is wrong (exit 2).
        raise UsageError(f"{path}: no such device (`lsblk -d -o NAME,SIZE,MODEL,TRAN` lists "
                         f"the disks; give the whole card, e.g. /dev/sdb)") from None
    if stat.S_ISREG(info.st_mode):
        if writing and path.resolve().is_relative_to("/dev"):
            raise BuildError(f"{path} is a regular file in /dev, not a device (a card that was "
                             f"removed, written to by mistake?): remove it and check lsblk")
        if writing and not force:
            raise BuildError(f"{path} is a regular file, not a card: pass --force to write the "
                             f"image into a file")
        return Target(path, False, info.st_size)
    if not stat.S_ISBLK(info.st_mode):
        raise UsageError(f"{path} is not a block device: give the whole card, e.g. /dev/sdb")
    sysfs = Path(f"/sys/dev/block/{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}").resolve()
    name = sysfs.name
    if (sysfs / "partition").exists():
        disk = sysfs.parent.name
        raise BuildError(f"{path} is partition {_read(sysfs / 'partition')} of /dev/{disk}: "
                         f"give the whole card, /dev/{disk}")
    size = int(_read(sysfs / "size") or 0) * 512
    if size == 0:
        raise BuildError(f"{path} has no medium (an empty card reader?): insert the card")
    parts = sorted(p for p in sysfs.iterdir() if (p / "partition").exists())
    target = Target(path, True, size, name, _model(sysfs), _transport(sysfs),
                    tuple(_describe_partition(p) for p in parts), sysfs, info.st_rdev,
                    _read(sysfs / "diskseq"))
    if not writing:
        return target
    _refuse_busy(path, sysfs, parts)
    if _read(sysfs / "ro") == "1":
        raise BuildError(f"{path} is read-only (an SD card's lock switch, in a reader that "
                         f"honours it?): slide the switch up and insert the card again")
    # An SD card in a built-in slot is "mmc" and says SD; a soldered eMMC says MMC (it may
    # hold the system of an ARM laptop or board).
    removable = _read(sysfs / "removable") == "1" or target.transport == "usb" or (
        target.transport == "mmc" and _read(sysfs / "device" / "type") != "MMC")
    if not removable and not force:
        kind = ", ".join(x for x in (target.transport or "unknown", target.model) if x)
        raise BuildError(f"{path} is not a removable, USB or MMC disk ({kind}): pass --force "
                         f"if it really is the card")
    if not os.access(path, os.W_OK):
        raise BuildError(f"{path}: permission denied: run flash-image with sudo")
    return target


def check_fits(target: Target, size: int | None) -> None:
    if target.is_disk and size is not None and target.size < size:
        raise BuildError(f"{target.path} holds {human_size(target.size)} "
                         f"({_decimal(target.size)}); the image needs {human_size(size)} "
                         f"({_decimal(size)}): use a larger card")


def _decimal(size: int) -> str:
    """Cards are sold in decimal units: a "32 GB" card holds 29.7 GiB."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _model(sysfs: Path) -> str:
    device = sysfs / "device"
    words = [_read(device / "vendor"), _read(device / "model") or _read(device / "name")]
    return " ".join(w for w in words if w)


def _transport(sysfs: Path) -> str:
    name = sysfs.name
    for prefix, kind in (("mmcblk", "mmc"), ("loop", "loop"), ("nvme", "nvme"), ("md", "raid"),
                         ("dm-", "device-mapper"), ("zram", "zram")):
        if name.startswith(prefix):
            return kind
    device = str((sysfs / "device").resolve()) if (sysfs / "device").exists() else ""
    if "/usb" in device:
        return "usb"
    return "ata/scsi" if device else ""


def _describe_partition(sysfs: Path) -> str:
    size = int(_read(sysfs / "size") or 0) * 512
    node = Path("/dev") / sysfs.name
    fields = probe(node)
    label = f' "{fields["LABEL"]}"' if "LABEL" in fields else ""
    return f"{node}  {human_size(size)}  {fields.get('TYPE', '')}{label}".rstrip()


def _devices_of(sysfs: Path, parts: list[Path]) -> set[int]:
    """The device numbers of a disk, its partitions, and whatever is built on them (LVM,
    dm-crypt, RAID), followed through sysfs's holders."""
    numbers: set[int] = set()
    todo = [sysfs, *parts]
    while todo:
        node = todo.pop()
        major, _, minor = _read(node / "dev").partition(":")
        if major.isdigit() and minor.isdigit():
            number = os.makedev(int(major), int(minor))
            if number in numbers:
                continue
            numbers.add(number)
        holders = node / "holders"
        if holders.is_dir():
            todo += [h.resolve() for h in holders.iterdir()]
    return numbers


def _refuse_busy(path: Path, sysfs: Path, parts: list[Path]) -> None:
    numbers = _devices_of(sysfs, parts)

    def ours(number: int, source: str) -> bool:
        if number in numbers:
            return True
        # A btrfs or overlay root shows an anonymous device number: its source names the disk.
        try:
            return source.startswith("/dev/") and os.stat(source).st_rdev in numbers
        except OSError:
            return False

    mounted = [m for m in mount_table() if ours(m.device, m.source)]
    system = [m for m in mounted if m.point in SYSTEM_MOUNTS]
    if system:
        m = system[0]
        raise BuildError(f"{path} holds the running system ({m.point} is {m.source}): refusing "
                         f"to write it, with or without --force")
    swaps = Path("/proc/swaps").read_text().splitlines()[1:] if Path("/proc/swaps").exists() \
        else []
    for line in swaps:
        name = line.split()[0]
        if ours(0, name):
            raise BuildError(f"{path} holds swap in use ({name}): refusing to write it (swapoff "
                             f"{name} first, if it really is the card)")
    if mounted:
        m = mounted[0]
        raise BuildError(f"{path} is mounted ({m.source} on {m.point}): unmount it first "
                         f"(sudo umount {m.source}), then run flash-image again")
    held = [h.name for p in [sysfs, *parts] if (p / "holders").is_dir()
            for h in (p / "holders").iterdir()]
    if held:
        raise BuildError(f"{path} is in use by {', '.join(sorted(held))} (LVM, RAID or "
                         f"encryption): stop that first")


# The card, open.


class Card:
    """The open target: exclusive, locked, written with bounded writeback so progress is the
    card's own speed and the page cache is not filled with gigabytes of dirty data."""

    def __init__(self, target: Target, fd: int) -> None:
        self.target = target
        self.fd = fd
        self._flight: deque[tuple[int, int]] = deque()
        self._in_flight = 0
        self.written = 0

    def write(self, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise BuildError(f"writing {self.target.path} failed at byte {offset + done} "
                                 f"({exc.strerror}): the card may be failing") from None
        self.written += len(view)
        self._sync_range(offset, len(view), SYNC_FILE_RANGE_WRITE)
        self._flight.append((offset, len(view)))
        self._in_flight += len(view)
        while self._in_flight > WRITEBACK_WINDOW:
            start, length = self._flight.popleft()
            self._in_flight -= length
            self._sync_range(start, length, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                             | SYNC_FILE_RANGE_WAIT_AFTER)
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)

    def _sync_range(self, offset: int, length: int, flags: int) -> None:
        if LIBC.sync_file_range(self.fd, offset, length, flags) != 0:
            code = ctypes.get_errno()
            if code not in (errno.ENOSYS, errno.ESPIPE, errno.EINVAL):
                raise BuildError(f"writing {self.target.path} failed near byte {offset} "
                                 f"({os.strerror(code)}): the card may be failing")

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise BuildError(f"{self.target.path}: the card did not take the data "
                             f"({exc.strerror}): it may be failing or removed") from None
        self._flight.clear()
        self._in_flight = 0
        # Clean pages go too: verification must read the card, not memory.
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    @property
    def handle(self) -> Path:
        """A path that opens this very card (not whatever DEVICE names by then): for the
        read-back and for debugfs."""
        return Path(f"/proc/{os.getpid()}/fd/{self.fd}")

    def reread_partitions(self) -> None:
        if self.target.is_disk:
            try:
                fcntl.ioctl(self.fd, BLKRRPART)
            except OSError as exc:
                # A loop device without partition scanning says EINVAL; nothing to re-read.
                if exc.errno != errno.EINVAL:
                    log.warn(f"the kernel could not re-read {self.target.path}'s partition "
                             f"table ({exc.strerror}): remove and insert the card")


@contextmanager
def opened(target: Target, *, write: bool) -> Iterator[Card]:
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
    if write and target.is_disk:
        flags |= os.O_EXCL      # fails while anything has it mounted or claimed
    try:
        fd = os.open(target.path, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise BuildError(f"{target.path} is in use (mounted, or claimed by another "
                             f"program): close what uses it and run flash-image again") from None
        if exc.errno == errno.ENOMEDIUM:
            raise BuildError(f"{target.path} has no medium: insert the card") from None
        raise BuildError(f"{target.path}: {exc.strerror}") from None
    try:
        if target.is_disk:
            _check_same_card(target, fd)
        if write and not try_lock(fd):
            raise BuildError(f"{target.path} is locked by another program (another "
                             f"flash-image, a partitioner?): wait for it")
        yield Card(target, fd)
    finally:
        os.close(fd)


def _check_same_card(target: Target, fd: int) -> None:
    """The device opened is the one inspected and shown: not another card put in meanwhile."""
    size = bytearray(8)
    fcntl.ioctl(fd, BLKGETSIZE64, size)
    now = (os.fstat(fd).st_rdev, int.from_bytes(size, sys.byteorder),
           _read(target.sysfs / "diskseq") if target.sysfs else "")
    if now != (target.rdev, target.size, target.diskseq):
        raise BuildError(f"{target.path} is not the disk it was when it was checked (another "
                         f"card?): run flash-image again")
