"""`flash-image IMAGE DEVICE`: an image made by build-image onto a card, checked and personal.

The steps, in order; everything that can be refused is refused before the card is touched:

1. check_request: the image, its .bmap, the per-card settings (the exact preseed lines, read
   by the wizard's parser) and the programs needed.
2. inspect_target: what DEVICE is, and every reason not to write to it (a partition, mounted,
   the running system's disk, swap, in use, read-only, no medium, not removable).
3. check_image_checksum, measure_raw_size and check_fits: the image against its .sha256, and
   its size against the card's (a .zst without bmap is decompressed once to learn it).
4. confirm: the card's model, size and partitions, and a typed "yes".
5. opened: the card, exclusively, checked to be the one shown.
6. write_card: the card's first MiB is zeroed and synced first, then the image is written
   without its first MiB (only the bmap's ranges when there is one, each checked against the
   bmap as it streams), synced, and the first MiB comes last. A card interrupted at any point
   has no partition table and cannot boot as a half-written system.
7. finish_card: verify_card reads what was written back from the card itself (O_DIRECT, not
   the page cache) and compares it with the bmap's checksums or digests taken while writing;
   personalise_card writes the preseed into the card's ext4 root with debugfs, merged with any
   the image carries. If either fails, the first MiB is zeroed again.
8. The kernel re-reads the card's partition table.

The card is held with O_EXCL and a BSD lock throughout: systemd-udevd does not probe or re-read
a disk that is locked (systemd's block device locking), so no automounter grabs a half-written
card.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import fcntl
import getpass
import hashlib
import io
import mmap
import os
import re
import stat
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from builder import __version__, firstboot, log
from builder.compression import COMPRESSIONS, built_image_suffix
from builder.entry import run_reporting
from builder.errors import BuildError, Interrupted
from builder.ext4 import Ext4, find_root_fs
from builder.image import Table, read_table
from builder.log import human_size
from builder.preseed import load_preseed
from builder.run import LIBC, require_programs, run, spawn

EXIT_MISMATCH = 2
HEAD = 1 << 20            # zeroed first, written last
CHUNK = 4 << 20           # one read from the image, one write to the card
WRITEBACK_WINDOW = 32 << 20   # bytes written but not yet on the card, at most
PRESEED_PATH = "/" + firstboot.PRESEED
# Mount points whose disk is the running system's: never written, even with --force.
SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/boot/firmware", "/usr", "/var")
# Keys that replace each other: a per-card login password replaces the image's hash.
KEY_GROUPS = ({"login_password", "login_password_hash"},
              {"jupyter_password", "jupyter_password_hash"},
              {"wifi_ssid", "wifi_key"})
CARD_LEFT_INVALID = ("the card was left without a partition table (it will not boot): "
                     "flash it again")

# ioctls on a block device (linux/fs.h).
BLKRRPART = 0x125F
BLKGETSIZE64 = 0x80081272
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
LIBC.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flash-image",
        description="Write an image made by build-image to an SD card or USB disk, verify it "
                    "and give the card its own settings for the first boot. Only the blocks "
                    "the .bmap beside the image lists are written. The card's first MiB is "
                    "written last, so an interrupted card does not look bootable.")
    p.add_argument("image", type=Path, help="an .img, .img.xz or .img.zst made by build-image")
    p.add_argument("device", type=Path,
                   help="the whole card, e.g. /dev/sdb or /dev/mmcblk0 (`lsblk` lists disks)")
    p.add_argument("-y", "--yes", action="store_true",
                   help="do not ask before writing (for scripts)")
    p.add_argument("--force", action="store_true",
                   help="also write to a disk that is not removable, USB or MMC (a loop "
                        "device), or to a regular file; never to a mounted or system disk")
    bmap = p.add_mutually_exclusive_group()
    bmap.add_argument("--bmap", type=Path, metavar="FILE",
                      help="the block map (default: IMAGE's .bmap beside it, if there is one)")
    bmap.add_argument("--no-bmap", action="store_true",
                      help="write every block of the image, even with a .bmap beside it")
    check = p.add_mutually_exclusive_group()
    check.add_argument("--no-verify", action="store_true",
                       help="do not read the card back after writing")
    check.add_argument("--verify-only", action="store_true",
                       help="write nothing: compare the card with the image (a card that has "
                            "booted, or was personalised, differs)")
    card = p.add_argument_group("this card's settings (written as its first-boot preseed "
                                "file, /boot/jupyter-firstboot.conf)")
    card.add_argument("--hostname", help="the card's hostname")
    card.add_argument("--preseed", type=Path, metavar="FILE",
                      help="a preseed file (passwords, time zone, ...); the flags above win "
                           "over its lines, and both over what the image carries")
    card.add_argument("--ssh-key", type=Path, action="append", default=[], metavar="FILE",
                      help="public key(s) for jupyter's ~/.ssh/authorized_keys (repeatable)")
    card.add_argument("--wifi", metavar="SSID",
                      help="join this Wi-Fi network; its key is asked for (or read from "
                           "stdin when it is not a terminal; empty: an open network)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--debug", action="store_true", help="show commands and tracebacks")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args = parser().parse_args(argv)
    log.setup(quiet=args.quiet, debug=args.debug)

    def body() -> int:
        try:
            return _main(args)
        except Mismatch as exc:
            if args.debug:
                raise
            print(f"flash-image: error: {exc}", file=sys.stderr)
            return EXIT_MISMATCH

    return run_reporting("flash-image", body, debug=args.debug,
                         after_interrupt="the card is closed")


# The image, its block map and the per-card settings.


@dataclass(frozen=True)
class Range:
    """Bytes [start, end) of the image, with the digest they must have."""

    start: int
    end: int
    digest: str | None          # None: a bmap without checksums; taken while writing
    name: str
    algorithm: str = "sha256"   # hashlib's name

    def describe(self) -> str:
        span = (f"bytes {self.start}-{self.end - 1}, "
                f"MiB {self.start / 2**20:.1f}-{self.end / 2**20:.1f}")
        return f"{self.name} ({span})" if self.name else span


@dataclass(frozen=True)
class BlockMap:
    path: Path
    image_size: int
    block_size: int
    ranges: tuple[Range, ...]

    @property
    def mapped(self) -> int:
        return sum(r.end - r.start for r in self.ranges)


@dataclass(frozen=True)
class Preseed:
    """The lines this card gets, and the keys whose lines in the image's preseed they replace."""

    lines: tuple[tuple[str, str], ...] = ()
    replaces: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.lines)

    def text(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        return "\n".join([f"# flash-image {__version__}, {stamp}: this card's own settings",
                          *(f"{key} = {value}" for key, value in self.lines)]) + "\n"


@dataclass(frozen=True)
class Request:
    image: Path
    suffix: str                 # a key of COMPRESSIONS
    size: int | None            # the raw image's size, when the file or bmap tells it
    bmap: BlockMap | None
    preseed: Preseed
    verify: bool
    verify_only: bool


def check_request(args: argparse.Namespace) -> Request:
    image: Path = args.image
    suffix = built_image_suffix(image)
    bmap = None
    if not args.no_bmap:
        path = args.bmap or _bmap_beside(image)
        if path is not None:
            bmap = read_bmap(path)
    size = _raw_size(image, suffix)
    if bmap is not None and size is not None and size != bmap.image_size:
        raise BuildError(f"{bmap.path} is for an image of {bmap.image_size} bytes, but "
                         f"{image.name} holds {size}: it belongs to another image (pass the "
                         f"right --bmap, or --no-bmap)")
    if args.verify_only and (args.hostname or args.preseed or args.ssh_key or args.wifi):
        raise BuildError("--verify-only writes nothing: drop --hostname, --preseed, "
                         "--ssh-key and --wifi")
    preseed = check_preseed(args)
    # Every program is there before the card is wiped: one missing halfway would leave it so.
    programs = [COMPRESSIONS[suffix][0], "blkid"]
    if preseed:
        programs += ["sfdisk", "debugfs", "dumpe2fs"]
    require_programs(*programs)
    return Request(image=image, suffix=suffix, size=bmap.image_size if bmap else size,
                   bmap=bmap, preseed=preseed, verify=not args.no_verify,
                   verify_only=args.verify_only)


def _bmap_beside(image: Path) -> Path | None:
    """bmaptool's names for the map of X.img.xz: X.img.xz.bmap, X.img.bmap, X.bmap."""
    stem = image.name
    candidates = [stem]
    for end in (".xz", ".zst", ".gz", ".img"):
        if stem.endswith(end):
            stem = stem[: -len(end)]
            candidates.append(stem)
    for name in candidates:
        path = image.with_name(name + ".bmap")
        if path.is_file():
            return path
    return None


def read_bmap(path: Path) -> BlockMap:
    """A bmap file (bmaptool's format 1.x or 2.x), its own checksum verified."""
    try:
        text = path.read_bytes()
        root = ET.fromstring(text)
    except OSError as exc:
        raise BuildError(f"{path}: {exc.strerror}") from None
    except ET.ParseError as exc:
        raise BuildError(f"{path}: not a bmap file ({exc}): pass --no-bmap to write "
                         f"every block") from None

    def field(name: str) -> str:
        value = root.findtext(name)
        if value is None:
            raise BuildError(f"{path}: no <{name}> in it: not a bmap file (pass --no-bmap)")
        return value.strip()

    try:
        version = tuple(int(part) for part in (root.get("version") or "").split(".")[:2])
    except ValueError:
        version = ()
    if root.tag != "bmap" or not (1, 0) <= version < (3, 0):
        raise BuildError(f"{path}: not a bmap file of a version flash-image knows (1.x, 2.x): "
                         f"pass --no-bmap")
    # bmaptool's formats: 1.4 and later name their checksum type; 1.3 has SHA-1 only, under
    # other names; older ones have no checksums (what was written is digested instead).
    if version >= (1, 4):
        checksum, attribute, own = field("ChecksumType"), "chksum", "BmapFileChecksum"
    elif version == (1, 3):
        checksum, attribute, own = "sha1", "sha1", "BmapFileSHA1"
    else:
        checksum, attribute, own = "sha256", "", ""
    if checksum not in ("sha1", "sha256"):
        raise BuildError(f"{path}: unknown checksum type {checksum!r} (pass --no-bmap)")
    expected = root.findtext(own) if own else None
    if expected is not None:
        # The file's checksum is taken with its own value replaced by zeros.
        blank = text.replace(expected.strip().encode(), b"0" * len(expected.strip()), 1)
        if hashlib.new(checksum, blank).hexdigest() != expected.strip():
            raise BuildError(f"{path} is damaged (its own checksum does not match): fetch it "
                             f"again with the image, or pass --no-bmap")
    try:
        image_size, block_size = int(field("ImageSize")), int(field("BlockSize"))
        blocks = int(field("BlocksCount"))
    except ValueError:
        raise BuildError(f"{path}: ImageSize, BlockSize or BlocksCount is not a number") from None
    if block_size <= 0 or blocks != -(-image_size // block_size):
        raise BuildError(f"{path}: {blocks} blocks of {block_size} bytes do not make an "
                         f"image of {image_size} bytes: the file is damaged")
    ranges: list[Range] = []
    last = -1
    for element in root.iterfind("BlockMap/Range"):
        text_range = (element.text or "").strip()
        first_s, _, last_s = text_range.partition("-")
        try:
            first, final = int(first_s), int(last_s or first_s)
        except ValueError:
            raise BuildError(f"{path}: bad range {text_range!r}: the file is damaged") from None
        if first <= last or final < first or final >= blocks:
            raise BuildError(f"{path}: range {text_range} overlaps or leaves the image: the "
                             f"file is damaged")
        last = final
        name = f"blocks {first}-{final}" if final > first else f"block {first}"
        digest = element.get(attribute) if attribute else None
        ranges.append(Range(first * block_size, min((final + 1) * block_size, image_size),
                            digest.strip().lower() if digest else None, name, checksum))
    return BlockMap(path, image_size, block_size, tuple(ranges))


def _raw_size(image: Path, suffix: str) -> int | None:
    """The decompressed size, where the file says it: a raw image, and xz (its index)."""
    if suffix == ".img":
        return image.stat().st_size
    if suffix == ".img.xz":
        proc = run(["xz", "--robot", "--list", image], capture=True, check=False)
        for line in proc.stdout.decode(errors="replace").splitlines():
            fields = line.split("\t")
            if fields[0] == "totals" and len(fields) > 4 and fields[4].isdigit():
                return int(fields[4])
        raise BuildError(f"{image}: not a complete .xz file (xz --list: "
                         f"{proc.stderr.decode(errors='replace').strip()}): download it again")
    return None


def measure_raw_size(request: Request) -> Request:
    """A .zst or .gz with no bmap does not say how large it is: decompress it once (seconds
    for zstd), so that a card too small is refused before it is touched."""
    if request.size is not None:
        return request
    size = 0
    view = memoryview(bytearray(CHUNK))
    with raw_stream(request) as stream, log.progress(f"measuring {request.image.name}",
                                                     None) as bar:
        while n := _fill(stream, view):
            size += n
            bar.update(n)
    return dataclasses.replace(request, size=size)


def check_image_checksum(image: Path) -> None:
    """The .sha256 build-image writes beside its image, checked before the card is touched:
    a corrupt or truncated download is refused without harming the card."""
    sums = image.with_name(image.name + ".sha256")
    if not sums.is_file():
        log.warn(f"no {sums.name} beside the image: its integrity is checked only by the "
                 f"decompressor and the bmap")
        return
    words = sums.read_text(errors="replace").split()
    if not words or len(words[0]) != 64:
        raise BuildError(f"{sums}: not a sha256sum line (`<64 hex digits>  <name>`)")
    if len(words) > 1 and words[1].lstrip("*") != image.name:
        raise BuildError(f"{sums} is for {words[1].lstrip('*')}, not {image.name}")
    digest = hashlib.sha256()
    with open(image, "rb") as f, log.progress(f"checking {image.name}",
                                              image.stat().st_size) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != words[0].lower():
        raise BuildError(f"{image} does not match {sums.name} (corrupt or truncated): download "
                         f"or build it again; the card was not touched")
    log.info(f"{image.name}: sha256 matches {sums.name}")


def check_preseed(args: argparse.Namespace) -> Preseed:
    """This card's preseed lines from --preseed, --hostname, --ssh-key and --wifi, each
    checked with the wizard's own rules; the flags win over the file's lines."""
    lines: list[tuple[str, str]] = []
    given: set[str] = set()
    if args.preseed is not None:
        data, _ = load_preseed(args.preseed)
        for raw in data.decode("utf-8-sig").splitlines():
            key, sep, value = raw.strip().partition("=")
            if sep and not raw.strip().startswith("#"):
                lines.append((key.strip().lower(), value.strip()))
    flags: list[tuple[str, str]] = []
    if args.hostname is not None:
        flags.append(("hostname", _checked("--hostname", args.hostname, firstboot.check_hostname)))
    for path in args.ssh_key:
        flags.extend(("ssh_key", _quoted(key)) for key in _ssh_keys(path))
    if args.wifi is not None:
        if _LINE_BREAK.search(args.wifi):
            raise BuildError(f"--wifi {args.wifi!r}: an SSID with a line break cannot be "
                             f"written to a preseed file")
        flags.append(("wifi_ssid", _quoted(_checked("--wifi", args.wifi, firstboot.check_ssid))))
        key = _ask_wifi_key(args.wifi)
        if key:
            flags.append(("wifi_key", _quoted(key)))
    for key, _ in flags:
        given |= next((g for g in KEY_GROUPS if key in g), {key})
    lines = [(k, v) for k, v in lines if k not in given or k == "ssh_key"] + flags
    replaces = frozenset(k for key, _ in lines if key != "ssh_key"
                         for k in next((g for g in KEY_GROUPS if key in g), {key}))
    preseed = Preseed(tuple(lines), replaces)
    # The very lines the card will get, read back as the wizard will read them.
    _, problems = firstboot.parse_preseed(preseed.text(), Path("/"), firstboot.Settings())
    if problems:
        raise BuildError(f"this card's preseed would not be accepted by the wizard: "
                         f"{problems[0]}")
    return preseed


_LINE_BREAK = re.compile(r"[\r\n]")


def _checked(flag: str, value: str, check: Callable[[str], str], *,
             secret: bool = False) -> str:
    try:
        return check(value)
    except ValueError as exc:
        shown = "" if secret else f" {value!r}"
        raise BuildError(f"{flag}{shown}: {exc}") from None


def _quoted(value: str) -> str:
    """A value as a preseed line keeps it: quoted when spaces at its ends or a # after a
    space would be lost or misread."""
    if value != value.strip() or re.search(r"\s#", value) or value[:1] in "\"'":
        return f'"{value}"'
    return value


def _ssh_keys(path: Path) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise BuildError(f"--ssh-key {path}: {exc.strerror}") from None
    if "PRIVATE KEY" in text:
        raise BuildError(f"--ssh-key {path} is a private key: give the public one "
                         f"({path}.pub), and keep this one off every card")
    keys = [_checked(f"--ssh-key {path}: a line", line.strip(), firstboot.check_ssh_key)
            for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not keys:
        raise BuildError(f"--ssh-key {path}: no key in it (give a .pub file)")
    return keys


def _ask_wifi_key(ssid: str) -> str:
    """Asked on the terminal, never echoed; from stdin when that is not a terminal."""
    if sys.stdin.isatty():
        key = getpass.getpass(f"Key of Wi-Fi network {ssid!r} (Enter: an open network): ")
    else:
        key = sys.stdin.readline().rstrip("\r\n")
    if key:
        _checked(f"the key of Wi-Fi network {ssid!r}", key, firstboot.check_wifi_key,
                 secret=True)
    return key


# The target.


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


@dataclass
class _Mount:
    device: int                 # st_dev of the filesystem
    source: str
    point: str


def inspect_target(path: Path, *, force: bool, writing: bool) -> Target:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise BuildError(f"{path}: no such device (`lsblk -d -o NAME,SIZE,MODEL,TRAN` lists "
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
        raise BuildError(f"{path} is not a block device: give the whole card, e.g. /dev/sdb")
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
    probe = run(["blkid", "-p", "-o", "export", node], capture=True, check=False)
    fields = dict(line.split("=", 1) for line in probe.stdout.decode(errors="replace")
                  .splitlines() if "=" in line)
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


def _mounts() -> list[_Mount]:
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        dash = fields.index("-")
        major, minor = fields[2].split(":")
        point = fields[4].replace("\\040", " ")
        mounts.append(_Mount(os.makedev(int(major), int(minor)), fields[dash + 2], point))
    return mounts


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

    mounted = [m for m in _mounts() if ours(m.device, m.source)]
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


def confirm(request: Request, target: Target) -> None:
    size = human_size(request.size) if request.size else "unknown size"
    mapped = (f", {human_size(request.bmap.mapped)} of it in use"
              if request.bmap else "")
    print(f"About to write {request.image.name} ({size}{mapped}) to\n{target.describe()}",
          file=sys.stderr)
    if not sys.stdin.isatty():
        raise BuildError("no terminal to confirm on: pass --yes to write without asking")
    print(f"Everything on {target.path} will be lost. Type yes to go on: ", end="",
          file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer != "yes":
        raise BuildError(f"not confirmed ({answer or 'no answer'!r}): nothing was written")


# The card.


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
        if write:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BuildError(f"{target.path} is locked by another program (another "
                                 f"flash-image, a partitioner?): wait for it") from None
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


# Writing.


@contextmanager
def raw_stream(request: Request) -> Iterator[IO[bytes]]:
    """The raw image, read front to back: the file itself, or a decompressor's output."""
    with open(request.image, "rb") as src:
        if request.suffix == ".img":
            yield src
            return
        what = f"decompress {request.image}: the file is corrupt or truncated"
        with spawn(COMPRESSIONS[request.suffix], stdin=src, what=what) as proc:
            assert proc.stdout is not None
            yield proc.stdout


def _fill(stream: IO[bytes], view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def _skip(stream: IO[bytes], count: int, scratch: memoryview) -> int:
    if count <= 0:
        return 0
    if stream.seekable():
        stream.seek(count, io.SEEK_CUR)
        return count
    skipped = 0
    while skipped < count:
        n = _fill(stream, scratch[: min(len(scratch), count - skipped)])
        if not n:
            break
        skipped += n
    return skipped


@dataclass
class Written:
    size: int = 0                                   # the raw image's size, as streamed
    bytes: int = 0                                  # written to the card
    seconds: float = 0.0
    checks: list[Range] = field(default_factory=list)


def write_card(request: Request, card: Card | None) -> Written:
    """Stream the image onto the card (card None: only take the digests of a raw image, for
    --verify-only without a bmap)."""
    bmap = request.bmap
    total = bmap.mapped if bmap else request.size
    result = Written()
    head = bytearray(min(HEAD, request.size) if request.size else HEAD)
    started = time.monotonic()
    what = "writing" if card else "reading"
    view = memoryview(bytearray(CHUNK))
    try:
        if card is not None:
            _invalidate(card)
        with raw_stream(request) as stream, log.progress(f"{what} {request.image.name}",
                                                         total) as bar:
            position = 0
            ranges = bmap.ranges if bmap else (Range(0, 1 << 62, None, ""),)
            for wanted in ranges:
                skipped = _skip(stream, wanted.start - position, view)
                position += skipped
                if position < wanted.start:
                    break
                digest = hashlib.new(wanted.algorithm)
                while position < wanted.end:
                    n = _fill(stream, view[: min(CHUNK, wanted.end - position)])
                    if n == 0:
                        break
                    _check_fits(card, position + n)
                    data = view[:n]
                    if bmap is None:
                        # Without a bmap, each 4 MiB is checked on its own: a mismatch is
                        # then named to within 4 MiB.
                        result.checks.append(Range(position, position + n,
                                                   hashlib.sha256(data).hexdigest(), ""))
                    else:
                        digest.update(data)
                    if card is not None:
                        if position < HEAD:
                            keep = min(n, HEAD - position)
                            head[position:position + keep] = data[:keep]
                            if n > keep:
                                card.write(data[keep:], position + keep)
                        else:
                            card.write(data, position)
                    position += n
                    bar.update(n)
                if bmap is not None and position == wanted.end:
                    result.checks.append(_checked_range(request, bmap, wanted, digest))
            # The rest is read too: the decompressor's exit code says whether the image was
            # whole, and the size must match the bmap's.
            if stream.seekable():
                position = stream.seek(0, io.SEEK_END)
            while n := _fill(stream, view):
                position += n
            result.size = position
        if bmap is not None and position != bmap.image_size:
            raise BuildError(f"{request.image.name} holds {position} bytes, but {bmap.path.name} "
                             f"is for {bmap.image_size}: it belongs to another image")
        if card is not None:
            card.sync()
            card.write(bytes(head[:min(HEAD, position)]), 0)
            card.sync()
    except BuildError as exc:
        if card is None:
            raise
        raise BuildError(f"{exc}; {CARD_LEFT_INVALID}") from None
    except Interrupted:
        if card is not None:
            log.warn(CARD_LEFT_INVALID)
        raise
    result.bytes = card.written if card else 0
    result.seconds = time.monotonic() - started
    return result


def _checked_range(request: Request, bmap: BlockMap, wanted: Range,
                   digest: hashlib._Hash) -> Range:
    """A range as streamed, against the bmap's checksum, before the card's first MiB makes
    it bootable: an image that is not the bmap's is found here, not blamed on the card."""
    found = digest.hexdigest()
    if wanted.digest is None:
        return dataclasses.replace(wanted, digest=found)
    if found != wanted.digest:
        raise BuildError(f"{request.image.name} does not match {bmap.path.name} in "
                         f"{wanted.describe()}: the image is corrupt or the bmap is another "
                         f"build's (pass the right --bmap, or --no-bmap)")
    return wanted


def _invalidate(card: Card) -> None:
    """Zero the card's first MiB (partition table, boot loader) before anything else, and the
    last one where an old GPT keeps its backup copy."""
    zeros = bytes(HEAD)
    card.write(zeros, 0)
    if card.target.is_disk and card.target.size >= 2 * HEAD:
        card.write(zeros, card.target.size - HEAD)
    card.sync()
    card.written = 0


def _check_fits(card: Card | None, end: int) -> None:
    if card is not None and card.target.is_disk and end > card.target.size:
        raise BuildError(f"the image is larger than {card.target.path} "
                         f"({human_size(card.target.size)}): use a larger card")


# Verifying.


class Mismatch(BuildError):
    """The card does not hold the image."""


def verify_card(source: Path, shown: Path, checks: Sequence[Range], *,
                just_written: bool) -> float:
    """Read every range back from the card itself and compare its digest; returns seconds."""
    hint = ("the card did not keep what was written (failing, or a fake capacity?): do not use "
            "it" if just_written else "it holds another image, was changed (booted, "
            "personalised) since, or is failing")
    started = time.monotonic()
    total = sum(r.end - r.start for r in checks)
    view = memoryview(mmap.mmap(-1, CHUNK))     # page-aligned, as O_DIRECT needs
    fd, direct = _open_uncached(source)
    try:
        with log.progress(f"verifying {shown}", total) as bar:
            for wanted in checks:
                digest = hashlib.new(wanted.algorithm)
                position = wanted.start
                while position < wanted.end:
                    n = min(CHUNK, wanted.end - position)
                    try:
                        got = _pread(fd, view, position, n, direct)
                    except OSError as exc:
                        raise Mismatch(f"reading {shown} back failed at byte {position} "
                                       f"({exc.strerror}): the card may be failing") from None
                    digest.update(view[:got])
                    bar.update(got)
                    position += n
                    if got < n:
                        break
                if digest.hexdigest() != wanted.digest:
                    raise Mismatch(f"{shown} differs from the image in "
                                   f"{wanted.describe()}: {hint}")
    finally:
        os.close(fd)
    return time.monotonic() - started


def _open_uncached(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:       # a file system without O_DIRECT (tmpfs)
            raise
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd, False


def _pread(fd: int, view: memoryview, offset: int, length: int, direct: bool) -> int:
    """Read `length` bytes at `offset`; O_DIRECT reads whole 4 KiB blocks, so the length is
    rounded up and the extra dropped."""
    ask = -(-length // 4096) * 4096 if direct else length
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:ask]], offset + got)
        if n <= 0:
            break
        got += n
    return min(got, length)


# Personalising.


def personalise_card(card: Card, preseed: Preseed) -> str:
    """Write this card's preseed into its ext4 root (where the wizard reads it at first boot),
    merged with the one the image carries. Returns the path written."""
    table = read_table(card.handle)
    fs, path = _preseed_location(card.handle, table)
    old = fs.read(path) or b""
    kept = []
    for raw in old.decode("utf-8-sig", errors="replace").splitlines():
        key = raw.strip().partition("=")[0].strip().lower()
        if raw.strip().startswith("#") or key not in preseed.replaces:
            kept.append(raw)
    if kept and kept[-1].strip():
        kept.append("")
    text = "\n".join(kept) + ("\n" if kept else "") + preseed.text()
    _, problems = firstboot.parse_preseed(text.encode(), Path("/"), firstboot.Settings())
    if problems:
        raise BuildError(f"the preseed for the card does not check out ({problems[0]}); the "
                         f"image was written and verified, but the card has no preseed")
    with tempfile.TemporaryDirectory(prefix="flash-image.") as work:
        fs.write(path, text.encode(), 0o600, Path(work))
    return path


def _preseed_location(device: Path, table: Table) -> tuple[Ext4, str]:
    """The root filesystem's /boot/jupyter-firstboot.conf, or the file at the top of /boot's
    own partition when the image has one (an ext4 one: debugfs writes nothing else)."""
    root = find_root_fs(device, table)
    fstab = (root.read("/etc/fstab") or b"").decode(errors="replace")
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1].rstrip("/") == "/boot":
            for part in table.partitions:
                if part == root.partition:
                    continue
                fs = Ext4(device, part)
                if _matches(fs, fields[0]):
                    return fs, "/" + PRESEED_PATH.rsplit("/", 1)[1]
            raise BuildError(f"the image mounts /boot from {fields[0]}, which is not an ext4 "
                             f"partition on {device}: write jupyter-firstboot.conf onto it by "
                             f"hand (see README)")
    return root, PRESEED_PATH


def _matches(fs: Ext4, spec: str) -> bool:
    proc = run(["dumpe2fs", "-h", fs.spec], capture=True, check=False)
    if proc.returncode != 0:
        return False
    info = {}
    for line in proc.stdout.decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    kind, _, value = spec.partition("=")
    return (kind == "UUID" and info.get("Filesystem UUID") == value) or \
        (kind == "LABEL" and info.get("Filesystem volume name") == value)


# The command.


def _main(args: argparse.Namespace) -> int:
    request = check_request(args)
    target = inspect_target(args.device, force=args.force, writing=not request.verify_only)
    check_image_checksum(request.image)
    if request.verify_only:
        return _verify_only(request, target)
    request = measure_raw_size(request)
    check_fits(target, request.size)
    if not args.yes:
        confirm(request, target)
    with opened(target, write=True) as card:
        written = write_card(request, card)
        log.info(f"wrote {human_size(written.bytes)} of {human_size(written.size)} in "
                 f"{written.seconds:.1f} s ({_rate(written.bytes, written.seconds)})"
                 + (f", only the blocks {request.bmap.path.name} lists" if request.bmap else ""))
        finish_card(request, card, written)
        card.reread_partitions()
    log.result(f"{target.path}: ready; put the card in the board and power it")
    return 0


def finish_card(request: Request, card: Card, written: Written) -> None:
    """Verify the card, then personalise it. A card that fails either, or is interrupted
    meanwhile, loses its first MiB again: a card that cannot be trusted must not boot."""
    try:
        if request.verify:
            seconds = verify_card(card.handle, card.target.path, written.checks,
                                  just_written=True)
            log.info(f"verified: the card holds the image ({seconds:.1f} s)")
        if request.preseed:
            path = personalise_card(card, request.preseed)
            card.sync()
            keys = ", ".join(dict.fromkeys(k for k, _ in request.preseed.lines))
            log.info(f"this card's settings ({keys}) are in {path}, readable by root only, "
                     f"and are applied at its first boot")
    except BuildError as exc:
        _invalidate(card)
        raise type(exc)(f"{exc}; {CARD_LEFT_INVALID}") from None
    except Interrupted:
        _invalidate(card)
        log.warn(CARD_LEFT_INVALID)
        raise


def _verify_only(request: Request, target: Target) -> int:
    if request.size is not None and target.size < request.size:
        raise Mismatch(f"{target.path} ({human_size(target.size)}) is smaller than the image "
                       f"({human_size(request.size)}): it cannot hold it")
    if request.bmap is not None and all(r.digest for r in request.bmap.ranges):
        checks = list(request.bmap.ranges)
    else:
        checks = write_card(request, None).checks      # digests of the image, streamed
    with opened(target, write=False) as card:
        seconds = verify_card(card.handle, target.path, checks, just_written=False)
    log.result(f"{target.path} holds {request.image.name} ({seconds:.1f} s)")
    return 0


def _rate(count: int, seconds: float) -> str:
    return f"{human_size(count / seconds)}/s" if seconds > 0 else "-"


if __name__ == "__main__":
    sys.exit(main())
