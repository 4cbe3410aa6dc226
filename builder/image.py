"""The image file: its partition table, its root partition, growing and shrinking it.

Only the partition table itself and the root partition are ever written. The gap between the
table and the first partition holds the board's bootloader (U-Boot at 8 KiB on Allwinner,
32 KiB on Rockchip) and is never touched.
"""

from __future__ import annotations

import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from builder import log
from builder.errors import BuildError
from builder.ext4 import superblock
from builder.inside import remove_entry
from builder.ledger import Ledger
from builder.mount import loop_device, probe
from builder.run import run

SECTOR = 512
# A GPT keeps a copy of itself in the last 33 sectors (header + 128 entries of 128 bytes).
GPT_BACKUP_SECTORS = 33


@dataclass(frozen=True)
class Partition:
    number: int
    start: int          # bytes
    size: int           # bytes
    type: str

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Table:
    label: str          # "dos" or "gpt"
    partitions: tuple[Partition, ...]

    @property
    def last(self) -> Partition:
        return max(self.partitions, key=lambda p: p.start)


# Smaller than this, a file holds no bootable system: a kernel alone takes several MiB.
MIN_IMAGE_SIZE = 1 << 20


def table_label(head: bytes) -> str | None:
    """What kind of partition table the first bytes of a disk show, without sfdisk (which a
    host that only fetches need not have): "gpt" (its header in the second sector, after the
    protective MBR; the fourth-KiB one of 4096-byte sectors too), "dos" (the MBR's boot
    signature 0x55 0xAA at byte 510), or None."""
    if head[SECTOR:SECTOR + 8] == b"EFI PART" or head[4096:4096 + 8] == b"EFI PART":
        return "gpt"
    if head[510:512] == b"\x55\xaa":
        return "dos"
    return None


def read_table(image: Path) -> Table:
    proc = run(["sfdisk", "--json", image], capture=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{image} has no partition table (sfdisk: "
                         f"{proc.stderr.decode(errors='replace').strip()}): is it a disk image?")
    table = json.loads(proc.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", SECTOR))
    parts = []
    for p in table.get("partitions", []):
        number = int(re.sub(r".*?(\d+)$", r"\1", p["node"]))
        parts.append(Partition(number, int(p["start"]) * sector, int(p["size"]) * sector,
                               str(p.get("type", ""))))
    if not parts:
        raise BuildError(f"{image} has a partition table but no partitions: not a system image")
    return Table(str(table["label"]), tuple(parts))


@dataclass(frozen=True)
class RootFs:
    partition: Partition
    label: str


def find_root(ledger: Ledger, image: Path, table: Table) -> RootFs:
    """The root partition, by what is in it: ext4 holding /etc/os-release; Armbian's label
    armbi_root first. Not by number: boards with a separate /boot partition put root second."""
    candidates: list[RootFs] = []
    for part in table.partitions:
        with loop_device(ledger, image, part.start, part.size, read_only=True) as dev:
            fields = probe(dev)
            if fields.get("TYPE") != "ext4":
                continue
            # debugfs reads the filesystem without mounting it.
            found = run(["debugfs", "-R", "stat /etc/os-release", dev], capture=True,
                        check=False)
            if b"Inode:" not in found.stdout:
                continue
            candidates.append(RootFs(part, fields.get("LABEL", "")))
    if not candidates:
        raise BuildError(f"{image} has no ext4 partition with an operating system in it "
                         f"(/etc/os-release): not an Armbian or Debian image")
    candidates.sort(key=lambda r: (r.label != "armbi_root", r.partition.number))
    root = candidates[0]
    log.info(f"root filesystem: partition {root.partition.number} "
             f"({root.label or 'no label'}, {root.partition.size >> 20} MiB)")
    return root


def check_fs(device: str, *, strict: bool = False) -> None:
    """e2fsck -f, which resize2fs insists on. On the base image, exit 1 (errors fixed) is
    accepted; after the build (`strict`) any error means the build damaged the filesystem
    (a full host disk, a process writing during the unmount) and the image is not shipped."""
    proc = run(["e2fsck", "-f", "-y", device], capture=True, check=False)
    if proc.returncode == 0 or (proc.returncode == 1 and not strict):
        return
    detail = proc.stdout.decode(errors="replace").strip().splitlines()
    if strict:
        raise BuildError(f"the root filesystem had errors after customizing (e2fsck exited "
                         f"{proc.returncode}: {detail[-1] if detail else ''}): not writing it "
                         f"out; check the host's free space and the build log")
    raise BuildError(f"the root filesystem has errors e2fsck cannot repair "
                     f"(e2fsck exited {proc.returncode}): the base image is damaged")


def grow(ledger: Ledger, image: Path, table: Table, root: RootFs, headroom: int) -> Partition:
    """Make the image file `headroom` bytes larger, the root partition (the last one) up to
    the new end, and the filesystem to fill it."""
    if root.partition != table.last:
        raise BuildError(f"the root filesystem is partition {root.partition.number}, but the "
                         f"last partition is {table.last.number}: it cannot grow")
    headroom -= headroom % (1 << 20)
    old_size = image.stat().st_size
    try:
        # Allocated, not just a longer sparse file: a full disk must fail here, not later as
        # writes the loop device silently loses.
        with open(image, "r+b") as f:
            os.posix_fallocate(f.fileno(), old_size, headroom)
    except OSError as exc:
        raise BuildError(f"cannot enlarge {image} by {headroom >> 20} MiB: {exc.strerror}; "
                         f"free space or lower image.headroom") from None
    if table.label == "gpt":
        # The backup GPT must sit at the very end of the disk, which just moved.
        run(["sfdisk", "--no-reread", "--no-tell-kernel", "--relocate", "gpt-bak-std", image],
            capture=True, what=f"move the backup GPT of {image}")
    _resize_partition(image, root.partition.number, None)
    grown = _partition(image, root.partition.number)
    with loop_device(ledger, image, grown.start, grown.size) as dev:
        check_fs(dev)
        run(["resize2fs", dev], capture=True, what="grow the root filesystem")
    log.info(f"grew the root filesystem by {headroom >> 20} MiB to {grown.size >> 20} MiB")
    return grown


def clear_free_space(mountpoint: Path) -> None:
    """Make the filesystem's free blocks zeros: they compress to nothing, are left out of the
    bmap, and no file deleted during the build can be read back from the image.

    fstrim punches them out of the image file as holes. Where the loop device cannot discard,
    a file of zeros is written until the disk is full and deleted again."""
    proc = run(["fstrim", mountpoint], capture=True, check=False)
    if proc.returncode == 0:
        return
    log.warn(f"fstrim {mountpoint} failed ({proc.stderr.decode(errors='replace').strip()}); "
             f"writing zeros over the free space instead")
    filler = mountpoint / ".build-image-zeros"
    zeros = bytes(1 << 20)
    # The image could hold a link by that name: never written through, to the host.
    remove_entry(filler)
    try:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "wb") as f:
            while True:
                f.write(zeros)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        filler.unlink(missing_ok=True)


def sync_fs(mountpoint: Path) -> None:
    """Write out the filesystem, and hear about it if that fails (a full host disk under a
    sparse image shows up here, as lost writes)."""
    run(["sync", "--file-system", mountpoint], capture=True,
        what=f"write the image's filesystem to disk ({mountpoint})")


def current_partition(image: Path, number: int) -> Partition:
    return _partition(image, number)


def _partition(image: Path, number: int) -> Partition:
    return next(p for p in read_table(image).partitions if p.number == number)


def _resize_partition(image: Path, number: int, size: int | None) -> None:
    """Set partition `number` to `size` bytes (None: up to the end of the disk), keeping its
    start, type and every other partition."""
    spec = "+" if size is None else str(size // SECTOR)
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", "-N", str(number), image],
        input=f", {spec}\n".encode(), capture=True, what=f"resize partition {number} of {image}")


def shrink(ledger: Ledger, image: Path, root: Partition, free: int) -> int:
    """Shrink the root filesystem to its contents plus `free` bytes, the partition to the
    filesystem and the file to the partition (plus the backup GPT). Returns the new size.

    Armbian grows the root partition to the card at first boot, so a small image costs the
    user nothing."""
    with loop_device(ledger, image, root.start, root.size) as dev:
        check_fs(dev, strict=True)
        block_size, used_blocks = _fs_usage(dev)
        target = used_blocks * block_size + free
        target += (1 << 20) - target % (1 << 20)  # whole MiB
        if target < root.size:
            run(["resize2fs", dev, f"{target // 1024}K"], capture=True,
                what="shrink the root filesystem")
        else:
            target = root.size
    table = read_table(image)
    if target < root.size:
        _resize_partition(image, root.number, target)
    end = root.start + target
    new_size = end + (GPT_BACKUP_SECTORS * SECTOR if table.label == "gpt" else 0)
    if table.label == "gpt":
        # A GPT whose last usable sector lies past the end of the file is invalid, and sfdisk
        # then sees only the protective MBR (--relocate would write that back, losing the GPT).
        # So the same table is written anew for the shorter file: same disk and partition
        # GUIDs, types, names and positions, the backup at the new end.
        dump = run(["sfdisk", "--dump", image], capture=True).stdout.decode()
        dump = "\n".join(line for line in dump.splitlines()
                         if not line.startswith(("last-lba:", "device:")))
        with open(image, "r+b") as f:
            f.truncate(new_size)
        run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", "--wipe", "never",
             "--wipe-partitions", "never", image], input=dump.encode() + b"\n", capture=True,
            what=f"rewrite the GPT of {image} for its new size")
    else:
        with open(image, "r+b") as f:
            f.truncate(new_size)
    log.info(f"shrank the image to {new_size >> 20} MiB")
    return new_size


def _fs_usage(device: str) -> tuple[int, int]:
    """Block size and blocks in use (incl. metadata) of an ext4 filesystem, from its
    superblock; what resize2fs -P estimates is the minimum with room for its own needs."""
    fields = superblock(device)
    if "Block size" not in fields:
        raise BuildError(f"dumpe2fs could not read the root filesystem on {device}")
    block_size = int(fields["Block size"])
    minimum = run(["resize2fs", "-P", device], capture=True).stdout.decode(errors="replace")
    match = re.search(r"(\d+)\s*$", minimum.strip())
    used = int(match.group(1)) if match else int(fields["Block count"]) - int(
        fields["Free blocks"])
    return block_size, used


def copy_sparse(source: Path, target: Path) -> None:
    """Copy keeping holes (and sharing blocks where the filesystem can)."""
    run(["cp", "--sparse=always", "--reflink=auto", source, target], capture=True,
        what=f"copy {source} to {target}")
    os.chmod(target, 0o644)
